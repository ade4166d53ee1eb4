"""Write a checkpoint of any layout as a directory `transformers` loads with `trust_remote_code=True`.

The weights come from `memgpt_dist.generate.load_model` (which consolidates ZeRO-0..3, TP, PP and
TP x PP checkpoints) under the GPT's own names, prefixed `model.`; the modeling code is the copy in
`remote/`, kept equal to `memgpt_dist.model` by tests/hf/test_export.py. The export is built in a
temporary sibling directory and moved into place, so an interrupted export leaves the old one whole.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from memgpt_dist.config import TrainConfig

log = logging.getLogger("memgpt_dist")

REMOTE = Path(__file__).parent / "remote"
CODE_FILES = ("configuration_memgpt.py", "modeling_memgpt.py")
MODEL_TYPE = "memgpt"
AUTO_MAP = {"AutoConfig": "configuration_memgpt.MemGPTConfig",
            "AutoModelForCausalLM": "modeling_memgpt.MemGPTForCausalLM"}
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"  # data_pipeline/bpe_tokenizer.py's special tokens


class ExportError(ValueError):
    pass


def export_run(checkpoint: Path, out: Path, step: Optional[int] = None, tokenizer_file: Optional[Path] = None,
               max_shard_size: str = "2GB") -> Path:
    """Export the newest (or `step`'s) committed checkpoint of `checkpoint` to `out`; returns the
    step directory exported."""
    from memgpt_dist.generate import find_checkpoint, load_model

    check_out_dir(out)
    ckpt = find_checkpoint(Path(checkpoint), step)
    tok_file = Path(tokenizer_file) if tokenizer_file else ckpt.parent.parent / "tokenizer.json"
    if not tok_file.is_file():
        raise ExportError(f"{tok_file} not found; pass --tokenizer DATA_DIR/tokenizer.json")
    model, cfg = load_model(ckpt)
    write_export(model.state_dict(), cfg, tok_file, out, max_shard_size, source=str(ckpt))
    return ckpt


def check_out_dir(out: Path) -> None:
    """Refuse a non-empty `out` that is not an export of ours (it would be replaced)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not is_export(out):
        raise ExportError(f"{out} exists and is not a memgpt export (no config.json with model_type "
                          f"'{MODEL_TYPE}'); pass an empty or new --out directory")


def is_export(path: Path) -> bool:
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def hf_config(cfg: TrainConfig, eos_id: int, pad_id: int):
    from memgpt_dist.hf.remote.configuration_memgpt import MemGPTConfig

    m, mem = cfg.model, cfg.memory
    config = MemGPTConfig(vocab_size=m.vocab_size, n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd,
                          segment_len=m.segment_len, position=m.position, rope_theta=m.rope_theta,
                          mlp_ratio=m.mlp_ratio, bias=m.bias, mem_enabled=mem.enabled, mem_kind=mem.kind,
                          mem_nu=mem.nu, mem_eps=mem.eps, mem_conv=mem.conv, eos_token_id=eos_id, pad_token_id=pad_id,
                          n_kv_head=m.kv_heads, norm=m.norm, norm_eps=m.norm_eps, mlp=m.mlp,
                          mlp_hidden=m.mlp_hidden_size, tie_word_embeddings=m.tie_embeddings,
                          attention=m.attention, mem_decay=mem.enabled and mem.decay,
                          mem_layers=list(mem.memory_layers(m.n_layer)),
                          architectures=["MemGPTForCausalLM"])
    config.auto_map = dict(AUTO_MAP)
    return config


def hf_model(state: dict, cfg: TrainConfig, eos_id: int, pad_id: int):
    """The transformers model holding the GPT's weights (fp32, eval mode)."""
    from memgpt_dist.hf.remote.modeling_memgpt import MemGPTForCausalLM

    model = MemGPTForCausalLM(hf_config(cfg, eos_id, pad_id))
    model.model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


def hf_tokenizer(tok_file: Path):
    """A PreTrainedTokenizerFast over the run's tokenizer.json; pads on the left for generation."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_file(str(tok_file))
    if raw.token_to_id(EOS_TOKEN) is None:
        raise ExportError(f"{tok_file} has no {EOS_TOKEN} token; export needs the tokenizer memgpt-prepare wrote")
    pad = PAD_TOKEN if raw.token_to_id(PAD_TOKEN) is not None else EOS_TOKEN
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=EOS_TOKEN, pad_token=pad, padding_side="left")
    return tok, raw.token_to_id(EOS_TOKEN), raw.token_to_id(pad)


def write_export(state: dict, cfg: TrainConfig, tok_file: Path, out: Path, max_shard_size: str = "2GB",
                 source: str = "") -> None:
    out = Path(out)
    tokenizer, eos_id, pad_id = hf_tokenizer(tok_file)
    model = hf_model(state, cfg, eos_id, pad_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        for name in CODE_FILES:
            shutil.copyfile(REMOTE / name, tmp / name)
        (tmp / "memgpt_export.json").write_text(json.dumps({"source": source}, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)  # checked above: empty or an export of ours
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("exported %s to %s", source, out)
