"""Generation speed: new tokens/s after a long prompt, ours against transformers' GPT-2 in the same run.

Rows, each greedy, for batch 1 and 8 (prompts of `--prompt` tokens, `--new` tokens each):
  memgpt (cache)      memgpt_dist.generate.generate_tokens: prefill, then one `GPT.step` per token
  memgpt (recompute)  the previous memgpt-generate: the open segment re-read for every token
  export generate()   the Hugging Face export (remote code, MemGPTCache) through GenerationMixin
  gpt2 generate()     GPT2LMHeadModel.generate() with its KV cache, same width/depth/vocab
Times cover the prompt and the new tokens; tokens/s counts new tokens of every row. The ratio
column is each row's tokens/s over GPT-2's at the same batch (issue 14's target: >= 1.0x).

    python benchmarks/generate_throughput.py                                  # tiny config
    python benchmarks/generate_throughput.py --config configs/tiny.yaml --model.segment_len=256
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from memgpt_dist.config import load_config
from memgpt_dist.generate import SamplingConfig, generate_tokens
from memgpt_dist.model import GPT


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def recompute_generate(model: GPT, prompts: torch.Tensor, new: int) -> None:
    """memgpt-generate before the cache: the open segment is read again for every token."""
    N = model.cfg.segment_len
    ids = prompts
    done = ((ids.shape[1] - 1) // N) * N
    state = model(ids[:, :done]).state if done else None
    for _ in range(new):
        out = model(ids[:, done:], state=state)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        if ids.shape[1] - done == N:
            state, done = out.state, done + N
        ids = torch.cat([ids, nxt], dim=1)


def build_models(cfg):
    from transformers import GPT2Config, GPT2LMHeadModel

    from memgpt_dist.hf.export import hf_model

    torch.manual_seed(0)
    ours = GPT(cfg.model, cfg.memory)
    ours.init_weights()
    ours.eval()
    export = hf_model(ours.state_dict(), cfg, eos_id=0, pad_id=0)
    m = cfg.model
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=m.vocab_size, n_embd=m.n_embd, n_layer=m.n_layer, n_head=m.n_head,
                                      n_positions=8192, bos_token_id=0, eos_token_id=0)).eval()
    for model in (export, gpt2):
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
    return ours, export, gpt2


def measure(cfg, prompt_len: int, new: int, batch: int, recompute: bool) -> list[tuple[str, float]]:
    ours, export, gpt2 = build_models(cfg)
    prompts = torch.randint(1, cfg.model.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    greedy = SamplingConfig(max_new_tokens=new, temperature=0.0)
    hf_kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    _timed(lambda: generate_tokens(ours, prompts[:, :8], SamplingConfig(max_new_tokens=4, temperature=0.0)))  # warm-up
    rows = [("memgpt (cache)", _timed(lambda: generate_tokens(ours, prompts, greedy)))]
    if recompute:
        rows.append(("memgpt (recompute)", _timed(lambda: recompute_generate(ours, prompts, new))))
    with torch.no_grad():
        rows.append(("export generate()", _timed(lambda: export.generate(prompts, **hf_kwargs))))
        rows.append(("gpt2 generate()", _timed(lambda: gpt2.generate(prompts, **hf_kwargs))))
    return [(name, batch * new / seconds) for name, seconds in rows]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml", help="model and memory shape to measure")
    p.add_argument("--prompt", type=int, default=2048, help="prompt tokens")
    p.add_argument("--new", type=int, default=512, help="new tokens per row")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-recompute", action="store_true", help="skip the slow recompute baseline")
    args, overrides = p.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, overrides)
    m = cfg.model
    print(f"# n_layer={m.n_layer} n_embd={m.n_embd} n_head={m.n_head} vocab={m.vocab_size} segment_len="
          f"{m.segment_len} memory={cfg.memory.enabled}; prompt {args.prompt}, {args.new} new tokens, greedy, "
          f"{args.threads} thread(s), {'cpu'}")
    print(f"| {'generator':<20} | batch | new tokens/s | vs gpt2 |")
    print(f"|{'-' * 22}|-------|--------------|---------|")
    for batch in (int(b) for b in args.batches.split(",")):
        rows = measure(cfg, args.prompt, args.new, batch, not args.no_recompute)
        base = dict(rows)["gpt2 generate()"]
        for name, tps in rows:
            print(f"| {name:<20} | {batch:>5} | {tps:>12.1f} | {tps / base:>6.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
