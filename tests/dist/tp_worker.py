"""One rank of tests/dist/test_tensor_parallel.py: 5 steps of a small memory model through the
real loader wiring (launch/train.py), model plan, engine, trainer step and checkpointer, at any
layout; dumps what the test compares with a single-process run to OUT/rank_XXXXX.pt.

    python tests/dist/tp_worker.py OUT DATA [--key=value ...]             one process
    deepspeed --num_gpus N tests/dist/tp_worker.py OUT DATA [...]         N ranks

Dumped per rank: layout coordinates and stream ids; per step the loss, gradient norm and the
gradients (ZeRO-gathered, this rank's TP shard) of `GRAD_NAMES` before the optimizer step
(and, at ZeRO-0, `unsharded_grad_norm`); the names of the parameters marked TP-sharded;
every parameter's ZeRO-gathered TP shard after step 3 (saved then, in OUT/checkpoints) and after
step 5, with the carried memory state; the losses of steps 4-5 again after restoring the step-3
checkpoint into the same engine.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import deepspeed  # noqa: E402
import torch  # noqa: E402
from deepspeed.utils import safe_get_full_grad  # noqa: E402

from launch.train import loaders_for  # noqa: E402
from memgpt_dist.config import load_config  # noqa: E402
from memgpt_dist.model import GPT  # noqa: E402
from memgpt_dist.model.carry import MemoryCarry  # noqa: E402
from memgpt_dist.parallel.dist import init_distributed, shutdown  # noqa: E402
from memgpt_dist.parallel.engine import build_engine  # noqa: E402
from memgpt_dist.parallel.plan import apply_plan  # noqa: E402
from memgpt_dist.parallel.tensor_parallel import unsharded_grad_norm  # noqa: E402
from memgpt_dist.train.checkpoint import CheckpointDir  # noqa: E402
from memgpt_dist.train.metrics import MetricsLogger  # noqa: E402
from memgpt_dist.train.run import build_trainer  # noqa: E402
from memgpt_dist.train.steps import DenseStep  # noqa: E402
from memgpt_dist.train.state import seed_everything  # noqa: E402

STEPS, SAVE_AT = 5, 3
GRAD_NAMES = ("blocks.0.attn.q_proj.weight", "blocks.0.attn.o_proj.weight", "blocks.1.mlp.up_proj.bias",
              "blocks.1.mlp.down_proj.weight", "blocks.0.attn.mem_k_proj.weight", "blocks.0.attn.mem_write_gate.weight",
              "blocks.0.attn.mem_beta", "blocks.1.attn.mem_v_conv.weight", "blocks.0.ln1.weight", "wte.weight")


def build_model_with_distinct_heads(cfg, tp_rank: int) -> GPT:
    """`memgpt_dist.train.run.build_model`, except that the per-head parameters which start
    equal for every head (mix gates, identity convolution taps) are made to differ by head
    before the plan slices them, so a rank holding another rank's heads cannot go unnoticed."""
    seed_everything(cfg.train.seed)
    model = GPT(cfg.model, cfg.memory)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mem_beta", "_conv.weight")):
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return apply_plan(model, cfg.parallel, tp_rank)


def record_grads_before_step(engine, topo, grads: list, norms: list) -> None:
    """Wrap engine.step so that the averaged, unclipped gradients are recorded first (collective:
    every rank gathers the same parameters in the same order), and without a ZeRO optimizer
    their norm as `unsharded_grad_norm` computes it."""
    params = dict(engine.module.named_parameters())
    step = engine.step

    def recording_step(*args, **kwargs):
        if engine.is_gradient_accumulation_boundary():
            grads.append({n: safe_get_full_grad(params[n]).detach().clone() for n in GRAD_NAMES})
            if engine.zero_optimization_stage() == 0:
                norms.append(unsharded_grad_norm(engine.module, topo.tp_group))
        return step(*args, **kwargs)

    engine.step = recording_step


def gathered_params(engine) -> dict[str, torch.Tensor]:
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=engine.zero_optimization_stage() == 3):
        return {n: p.detach().clone() for n, p in params.items()}


def main(out: Path, data: Path, overrides: list[str]) -> None:
    cfg = load_config(None, [f"data.path={data}", f"run_dir={out}", *overrides])
    topo = init_distributed(tp=cfg.parallel.tp, pp=cfg.parallel.pp)
    engine, _ = build_engine(build_model_with_distinct_heads(cfg, topo.tp_rank), cfg, topo)
    grads, norms = [], []
    record_grads_before_step(engine, topo, grads, norms)
    loader = loaders_for(cfg, topo)[0]
    step = DenseStep(engine, topo, MemoryCarry(cfg.train.carry_memory), cfg.data.n_segments, cfg.model.n_layer)
    trainer = build_trainer(cfg, topo, step, loader, None, CheckpointDir(out / "checkpoints", topo, keep_last=2),
                            MetricsLogger(None, enabled=False, tensorboard=False))
    results, saved_params = [], None
    for step in range(1, STEPS + 1):
        results.append(trainer.train_step())
        if step == SAVE_AT:
            trainer.save()
            saved_params = gathered_params(engine)
    params, memory = gathered_params(engine), {k: v.clone() for k, v in trainer.step.carry.state_dict().items()}
    trainer.restore(SAVE_AT)
    resumed = [trainer.train_step().loss for _ in range(SAVE_AT, STEPS)]
    torch.save({"losses": [r.loss for r in results], "grad_norms": [r.grad_norm for r in results], "grads": grads,
                "unsharded_grad_norms": norms, "params": params,
                "tp_sharded": [n for n, p in engine.module.named_parameters() if getattr(p, "tensor_model_parallel", False)], "saved_params": saved_params, "memory": memory, "resumed_losses": resumed},
               out / f"rank_{topo.rank:05d}.pt")
    shutdown()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(Path(args[0]), Path(args[1]), [a.lstrip("-") for a in args[2:]])
