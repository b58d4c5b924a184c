"""Tiny random-weight models (a local byte-level BPE tokenizer and a 2-layer Llama) for fast, exact engine tests.

Everything is built locally in a few seconds, with no hub access, and deterministically (same seed, same bytes).
Weights are fp32 and drawn wider than the usual 0.02 init so that attention patterns and next-token
distributions are far from uniform: a steering or batching bug then shows up as a clear logprob difference.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
BOS_ID, EOS_ID, PAD_ID, IM_START_ID, IM_END_ID = range(len(SPECIAL_TOKENS))
VOCAB_SIZE = 2048
# ChatML. The template writes BOS itself because chat prompts are tokenized without special tokens
# (HF apply_chat_template and vLLM chat both do that); plain prompts get BOS from the post-processor.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_LLAMA = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32,  # vLLM's CPU attention needs head_dim >= 32
    vocab_size=VOCAB_SIZE, max_position_embeddings=1024, tie_word_embeddings=False, rms_norm_eps=1e-5,
    bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
)
LINEAR_STD, EMBED_STD, NORM_JITTER = 0.15, 0.5, 0.1
_MARKER = ".tiny-complete"
_BUILD_VERSION = 1  # bump when the recipe changes, so cached builds are redone


def _corpus() -> list[str]:
    """Training text: the system's licence texts (sorted, so the order is stable), else a generated corpus."""
    files = sorted(p for p in Path("/usr/share/common-licenses").glob("*") if p.is_file() and not p.is_symlink())
    texts = [p.read_text(errors="replace") for p in files]
    if sum(len(t) for t in texts) > 100_000:
        return texts
    words = ("the model server returns tokens for each request and the steering vector changes attention "
             "heads layers experts adapters logits prompt completion chat user assistant system").split()
    return [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(40)) + f" {i}.\n" for i in range(5000)]


@functools.cache
def _tokenizer_json() -> str:
    # Trained once per process; every tiny model in a test session shares it.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B:1", special_tokens=[("<|bos|>", BOS_ID)])
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    return tok.to_str()


def build_tokenizer(dir: str | Path) -> Path:
    """Write a PreTrainedTokenizerFast (byte-level BPE, 2048 tokens, BOS-prepending, ChatML template) into `dir`."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    out = Path(dir)
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), bos_token="<|bos|>",
                                   eos_token="<|eos|>", pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    # Also spell the class and template the way transformers 4.x (and any reader of tokenizer_config.json) expects.
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE,
              model_input_names=["input_ids", "attention_mask"], model_max_length=TINY_LLAMA["max_position_embeddings"])
    for key in ("is_local", "local_files_only"):
        tc.pop(key, None)
    tc_path.write_text(json.dumps(tc, indent=2) + "\n")
    return out


def build_tiny_llama(dir: str | Path, seed: int = 0, **overrides) -> Path:
    """A random fp32 LlamaForCausalLM (plus tokenizer) in `dir`; `overrides` go into the LlamaConfig.

    Reuses `dir` if it already holds a complete build with the same recipe, seed and overrides.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    return _build(dir, "llama", seed, overrides, lambda: LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides})))


_ATTN = {k: TINY_LLAMA[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                   "vocab_size", "max_position_embeddings", "tie_word_embeddings", "rms_norm_eps",
                                   "bos_token_id", "eos_token_id", "pad_token_id")}
# Tiny MoE configs, within vLLM-CPU's limits (docs/models.md).
# Qwen3-MoE: layer 0 dense (mlp_only_layers), no top-k renormalisation.
# DeepSeek-V3: MLA with the latent size vLLM-CPU's MLA kernel needs (kv_lora_rank 512 + rope 64), grouped
# top-k over sigmoid scores with a correction bias ("noaux_tc"), layer 0 dense.
TINY_MOE = {
    "mixtral": dict(_ATTN, num_hidden_layers=2, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2),
    "qwen3_moe": dict(_ATTN, num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=64, num_experts=8,
                      num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[0], norm_topk_prob=False),
    "deepseek_v3": dict(_ATTN, num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=64,
                        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
                        first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
                        q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32,
                        v_head_dim=32, num_key_value_heads=4, head_dim=64),
    # GLM-4.5 style: the DeepSeek-V3 router (grouped top-k over sigmoid scores with a correction bias) behind plain
    # GQA attention, so vLLM-CPU runs it in fp32 and it can be compared with HF exactly.
    "glm4_moe": dict(_ATTN, num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=64,
                     n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=4, topk_group=2,
                     first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5, use_qk_norm=False),
}


def build_tiny_moe(dir: str | Path, kind: str, seed: int = 0, **overrides) -> Path:
    """A random fp32 MoE model of `kind` (a key of TINY_MOE) plus tokenizer in `dir`, built like the tiny Llama."""
    import transformers

    def make():
        cls = {"mixtral": ("MixtralConfig", "MixtralForCausalLM"), "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
               "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
               "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM")}[kind]
        cfg = getattr(transformers, cls[0])(**{**TINY_MOE[kind], **overrides})
        return getattr(transformers, cls[1])(cfg)

    # transformers 5 writes neither; vLLM reads both (and would default to softmax scoring)
    extra = {"topk_method": "noaux_tc", "scoring_func": "sigmoid"} if kind == "deepseek_v3" else {}
    return _build(dir, kind, seed, overrides, make, extra)


def _build(dir: str | Path, kind: str, seed: int, overrides: dict, make, extra_config: dict | None = None) -> Path:
    import torch

    out = Path(dir)
    recipe = {"version": _BUILD_VERSION, "seed": seed, "overrides": overrides}
    if kind != "llama":
        recipe["kind"] = kind
    try:
        if json.loads((out / _MARKER).read_text()) == json.loads(json.dumps(recipe)):
            return out
    except (OSError, ValueError):
        pass

    model = make().float()
    # Overwrite every parameter from our own generator: the result does not depend on transformers' init code.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:  # not all-ones, so a checkpoint loader that drops norm weights gets caught
                p.copy_(1 + NORM_JITTER * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(EMBED_STD * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(LINEAR_STD * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():  # DeepSeek-V3's e_score_correction_bias is a buffer
            if "correction_bias" in name:
                b.copy_(LINEAR_STD * torch.randn(b.shape, generator=gen))

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(stage, safe_serialization=True)
        cfg_path = stage / "config.json"
        cfg_json = json.loads(cfg_path.read_text())
        cfg_json["torch_dtype"] = "float32"  # transformers 4.x spelling, next to 5.x's "dtype"
        if "rope_theta" in (cfg_json.get("rope_parameters") or {}):
            cfg_json.setdefault("rope_theta", cfg_json["rope_parameters"]["rope_theta"])
        cfg_json.update(extra_config or {})
        cfg_path.write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
        build_tokenizer(stage)
        (stage / _MARKER).write_text(json.dumps(recipe) + "\n")  # last: marks the build complete
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_tiny_lora(dir: str | Path, base_dir: str | Path, seed: int = 1, rank: int = 8,
                    targets: tuple[str, ...] = LORA_TARGETS, std: float = 0.1) -> Path:
    """A PEFT LoRA adapter for the model in `base_dir`, with random A *and* B (PEFT starts B at zero, which
    would make the adapter a no-op), saved as adapter_config.json + adapter_model.safetensors in `dir`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = Path(dir)
    if (out / "adapter_model.safetensors").is_file():
        return out
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_iapt(dir: str | Path, base_dir: str | Path, seed: int = 1, bottleneck: int = 16,
                    shared: bool = False, scale: float = 1.0) -> Path:
    """A random IAPT adapter (steering/iapt.py) for the model in `base_dir`. Every tensor is random, with an
    output projection large enough (`scale` ~ the stream's size) that the soft tokens visibly change the model."""
    import json

    import torch

    from steerserve.steering.iapt import IaptConfig, IaptModel

    out = Path(dir)
    config = json.loads((Path(base_dir) / "config.json").read_text())
    model = IaptModel(IaptConfig(str(base_dir), config["hidden_size"], config["num_hidden_layers"], bottleneck,
                                 shared=shared))
    gen = torch.Generator().manual_seed(seed)
    model.reset_parameters(gen)
    with torch.no_grad():
        model.tensor("up.weight").normal_(0, scale / bottleneck ** 0.5, generator=gen)
        model.tensor("up.bias").normal_(0, 0.1 * scale, generator=gen)
        model.tensor("act.num").add_(0.1 * torch.randn(model.tensor("act.num").shape, generator=gen))
        model.tensor("act.den").normal_(0, 0.1, generator=gen)
    model.save(out)
    return out
