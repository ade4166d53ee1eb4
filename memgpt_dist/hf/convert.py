"""Start a run from a local Hugging Face checkpoint (`init.from_hf`): GPT2LMHeadModel or LlamaForCausalLM.

Two halves. `model_fields(DIR)` reads `DIR/config.json` (plain JSON, no torch) and says which
`model.*` values the checkpoint fixes; `config.load_config` takes them, and a different value given
in the YAML or on the command line is an error naming the key. `load_hf_weights(model, DIR)` copies
the checkpoint's tensors into a freshly initialised `GPT` under our names:

* GPT-2: learned positions (the first `segment_len` rows of wpe: positions restart in every
  segment), layernorm, GPT-2's tanh GELU (`mlp: gelu_tanh`), biases everywhere, tied head; its
  Conv1D weights are (in, out) and are transposed; c_attn is split into q, k, v.
* Llama (SmolLM, TinyLlama, Llama-3.x shapes without rope scaling): rope with its rope_theta,
  rmsnorm, SwiGLU with the checkpoint's intermediate_size, grouped-query attention, tied or untied.
  HF's rotate_half pairs the two halves of a head exactly as `apply_rope` does, so q, k copy as is.

The memory is added on top so that the step-0 outputs equal the base model's: the memory's value
projection starts at zero, so every read is exactly zero (the value part of the memory is a sum
of zero vectors; the delta rule's update is zero too), and the attention output projection of
head h is divided by (1 - g_h), the share the mix leaves to the local attention
(y = g read + (1 - g) local), so o_proj((1 - g) local) is the base model's o_proj(local). The
mix gate and the memory's q, k projections keep their init; the value projection gets a gradient
from the first step (the read's gradient is g_h o_proj^T dL/dout), and continued pretraining teaches
the memory, the ARMT/RMT recipe.

Weights are streamed one tensor at a time from the memory-mapped safetensors file(s) into the
parameters the rank builds anyway (`train.run.build_model`): before TP slicing, and under ZeRO-3
(without TP) into the model built partitioned by `zero.Init` (`memgpt_dist.parallel.model_build`),
each parameter gathered whole only while its tensor is copied; the import adds at most one tensor
to the rank's peak memory, and with ZeRO-3 no rank ever holds the whole model (at 7B).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional

GPT2, LLAMA = "GPT2LMHeadModel", "LlamaForCausalLM"
GELU = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


class HFImportError(ValueError):
    """A checkpoint this importer cannot map; the message says what is unsupported."""


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """DIR/config.json as a dict; a clear error when DIR is not a saved HF model."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise HFImportError(f"init.from_hf={path}: {file} not found; pass a directory written by save_pretrained")
    return json.loads(file.read_text())


def architecture(hf: dict[str, Any], path: str | Path) -> str:
    archs = hf.get("architectures") or []
    kind = {"gpt2": GPT2, "llama": LLAMA}.get(hf.get("model_type", ""))
    for arch in archs:
        if arch in (GPT2, LLAMA):
            return arch
    if kind is not None:
        return kind
    raise HFImportError(f"init.from_hf={path}: architectures {archs} (model_type {hf.get('model_type')!r}) are not "
                       f"supported; import a {GPT2} or a {LLAMA}")


def model_fields(path: str | Path) -> dict[str, Any]:
    """The `model.*` values the checkpoint in `path` fixes (ModelConfig field -> value)."""
    hf = read_hf_config(path)
    arch = architecture(hf, path)
    return _gpt2_fields(hf, path) if arch == GPT2 else _llama_fields(hf, path)


def _gpt2_fields(hf: dict[str, Any], path) -> dict[str, Any]:
    act = hf.get("activation_function", "gelu_new")
    if act not in GELU:
        raise HFImportError(f"init.from_hf={path}: GPT-2 activation_function {act!r} is not supported "
                           f"(one of {sorted(GELU)})")
    n_embd = hf["n_embd"]
    return {"vocab_size": hf["vocab_size"], "n_layer": hf["n_layer"], "n_head": hf["n_head"], "n_embd": n_embd,
            "n_kv_head": 0, "position": "learned", "norm": "layernorm", "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
            "mlp": GELU[act], "mlp_hidden": hf.get("n_inner") or 4 * n_embd, "bias": True,
            "tie_embeddings": hf.get("tie_word_embeddings", True)}


def _llama_fields(hf: dict[str, Any], path) -> dict[str, Any]:
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, n_embd // n_head):
        raise HFImportError(f"init.from_hf={path}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads; "
                           f"the model needs head_dim = n_embd / n_head")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFImportError(f"init.from_hf={path}: hidden_act {hf['hidden_act']!r}; only silu (SwiGLU) is supported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise HFImportError(f"init.from_hf={path}: rope scaling {rope.get('rope_type', rope.get('type'))!r} is not "
                           f"supported (only plain rope)")
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
        raise HFImportError(f"init.from_hf={path}: attention_bias and mlp_bias differ; model.bias covers both")
    return {"vocab_size": hf["vocab_size"], "n_layer": hf["num_hidden_layers"], "n_head": n_head, "n_embd": n_embd,
            "n_kv_head": hf.get("num_key_value_heads") or n_head, "position": "rope", "rope_theta": float(theta),
            "norm": "rmsnorm", "norm_eps": hf.get("rms_norm_eps", 1e-6), "mlp": "swiglu",
            "mlp_hidden": hf["intermediate_size"], "bias": bool(hf.get("attention_bias", False)),
            "tie_embeddings": hf.get("tie_word_embeddings", False)}


def check_segment_len(path: str | Path, segment_len: int) -> None:
    """GPT-2's learned positions: a segment may not be longer than the table."""
    hf = read_hf_config(path)
    if architecture(hf, path) == GPT2 and segment_len > hf.get("n_positions", 1024):
        raise HFImportError(f"model.segment_len={segment_len} exceeds the GPT-2 checkpoint's n_positions="
                           f"{hf.get('n_positions')}; use model.segment_len <= {hf.get('n_positions')}")


# --------------------------------------------------------------------------------- weights
def _tensors(path: Path) -> Iterator[tuple[str, Any]]:
    """(name, tensor) of every tensor of the checkpoint, one at a time (safetensors, memory-mapped;
    or pytorch_model.bin)."""
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
        return
    import torch

    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise HFImportError(f"init.from_hf={path}: no *.safetensors or pytorch_model*.bin weights")
    for f in bins:
        yield from torch.load(f, map_location="cpu", weights_only=True, mmap=True).items()


def _gpt2_targets(name: str, t, C: int, segment_len: int) -> list[tuple[str, Any]]:
    """Our (name, tensor) pairs for one GPT-2 tensor; [] for buffers (attn.bias) and the tied head."""
    name = name.removeprefix("transformer.")
    if name == "wpe.weight":
        return [(name, t[:segment_len])]
    if name in ("wte.weight", "ln_f.weight", "ln_f.bias"):
        return [(name, t)]
    if not name.startswith("h."):
        return []  # lm_head.weight (tied to wte)
    _, i, rest = name.split(".", 2)
    pre = f"blocks.{i}."
    simple = {"ln_1.weight": "ln1.weight", "ln_1.bias": "ln1.bias", "ln_2.weight": "ln2.weight",
              "ln_2.bias": "ln2.bias", "attn.c_proj.bias": "attn.o_proj.bias", "mlp.c_fc.bias": "mlp.up_proj.bias",
              "mlp.c_proj.bias": "mlp.down_proj.bias"}
    conv1d = {"attn.c_proj.weight": "attn.o_proj.weight", "mlp.c_fc.weight": "mlp.up_proj.weight",
              "mlp.c_proj.weight": "mlp.down_proj.weight"}
    if rest in simple:
        return [(pre + simple[rest], t)]
    if rest in conv1d:
        return [(pre + conv1d[rest], t.t())]  # Conv1D holds (in, out)
    if rest == "attn.c_attn.weight":
        return [(pre + f"attn.{p}_proj.weight", w.t()) for p, w in zip("qkv", t.split(C, dim=1))]
    if rest == "attn.c_attn.bias":
        return [(pre + f"attn.{p}_proj.bias", b) for p, b in zip("qkv", t.split(C))]
    return []  # attn.bias / attn.masked_bias buffers of older checkpoints


LLAMA_BLOCK = {"input_layernorm.weight": "ln1.weight", "post_attention_layernorm.weight": "ln2.weight",
               **{f"self_attn.{p}_proj.{w}": f"attn.{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")},
               **{f"mlp.{p}_proj.{w}": f"mlp.{p}_proj.{w}" for p in ("gate", "up", "down") for w in ("weight", "bias")}}


def _llama_targets(name: str, t, tied: bool) -> list[tuple[str, Any]]:
    if name == "model.embed_tokens.weight":
        return [("wte.weight", t)]
    if name == "model.norm.weight":
        return [("ln_f.weight", t)]
    if name == "lm_head.weight":
        return [] if tied else [("lm_head.weight", t)]
    if name.startswith("model.layers."):
        _, _, i, rest = name.split(".", 3)
        if rest in LLAMA_BLOCK:
            return [(f"blocks.{i}.{LLAMA_BLOCK[rest]}", t)]
    return []  # rotary inv_freq buffers of older checkpoints


def load_hf_weights(model, path: str | Path, materialize: Optional[Callable[[list], ContextManager]] = None) -> list[str]:
    """Copy the checkpoint in `path` into `model` (a freshly initialised `GPT`) and start its
    memory at zero (see the module docstring). Every base parameter must be set: returns the names
    set, raises naming the ones a checkpoint left out. `materialize(params)`: a context in which
    partitioned parameters are whole (ZeRO-3's zero.Init: `memgpt_dist.parallel.model_build`); each
    tensor is then copied inside it, one at a time."""
    import torch

    path = Path(path)
    arch = architecture(read_hf_config(path), path)
    params = dict(model.named_parameters())
    whole = materialize or _whole
    cfg = model.cfg
    done: set[str] = set()
    with torch.no_grad():
        for name, t in _tensors(path):
            pairs = (_gpt2_targets(name, t, cfg.n_embd, cfg.segment_len) if arch == GPT2
                     else _llama_targets(name, t, cfg.tie_embeddings))
            for ours, value in pairs:
                if ours not in params:
                    raise HFImportError(f"init.from_hf={path}: {ours} has no place in the model (model.* differs "
                                        f"from the checkpoint)")
                if params[ours].is_meta:  # another pipeline stage's (memgpt_dist.parallel.model_build)
                    done.add(ours)
                    continue
                with whole([params[ours]]):
                    _copy(params[ours], ours, value, path)
                done.add(ours)
        missing = sorted(n for n in params if n not in done and ".mem_" not in n)
        if missing:
            raise HFImportError(f"init.from_hf={path}: the checkpoint has no weights for {missing[:6]}")
        start_memory_at_zero(model, whole)
    return sorted(done)


def _whole(params: list) -> ContextManager:
    return contextlib.nullcontext()


def _copy(p, ours: str, value, path) -> None:
    if tuple(p.shape) != tuple(value.shape):
        raise HFImportError(f"init.from_hf={path}: {ours} is {tuple(value.shape)} in the checkpoint, "
                           f"{tuple(p.shape)} in the model")
    p.copy_(value.to(p.dtype))


def start_memory_at_zero(model, materialize: Optional[Callable[[list], ContextManager]] = None) -> None:
    """Zero the memory's value projections and divide each head's o_proj columns by (1 - g_h), so
    that the model with memory computes what the base model computes (module docstring)."""
    import torch

    whole = materialize or _whole
    hd = model.cfg.head_dim
    for block in model.blocks.values():
        attn = block.attn
        if attn.mem is None or attn.o_proj.weight.is_meta:  # no memory, or another pipeline stage's block
            continue
        with whole([attn.mem_v_proj.weight, attn.mem_beta, attn.o_proj.weight]):
            attn.mem_v_proj.weight.zero_()
            keep = 1 - torch.sigmoid(attn.mem_beta.detach().float())  # (H,): the local attention's share
            scale = keep.repeat_interleave(hd).to(attn.o_proj.weight.dtype)  # (C,) over the o_proj inputs
            attn.o_proj.weight.div_(scale)
