"""bf16 mixed precision on CPU, through DeepSpeed's bf16 config and its CPU accelerator (the code the
GPU path runs): weights in bf16, the memory state and its arithmetic in fp32, losses within a stated
tolerance of fp32 over 50 steps, and a checkpoint that restores every tensor."""
from __future__ import annotations

import pytest
import torch

import memgpt_dist.model.gpt as gpt
from inprocess import Batches, assert_same_leaves, flatten, full_params, make_trainer, optimizer_state
from memgpt_dist.parallel.dist import init_distributed

STEPS = 50
# measured (ZeRO-1, this config, lr 1e-2): fp32 falls 4.880 -> 2.489 over 50 steps, bf16 ends at 2.510;
# per-step |bf16 - fp32| is 0.012 on average and 0.049 at most (step 23). bf16 keeps 8 bits of
# mantissa, so the stated bound: every step within 3% of the fp32 loss, on average within 0.02
REL_TOLERANCE = 0.03
MEAN_TOLERANCE = 0.02
# a loss that moves within 50 steps; a carried memory, so the state crosses steps (and the checkpoint)
EXTRA = (f"train.max_steps={STEPS}", "train.carry_memory=true", "optim.lr=1e-2", "optim.min_lr=1e-3")


class Counting(Batches):
    """Learnable batches: each sample counts up from a random start (mod vocab), so the loss falls
    well below ln(vocab) within 50 steps and the two precisions are compared on a moving target."""

    def __next__(self):
        g = torch.Generator().manual_seed(self.i)
        self.i += 1
        B, K, N, V = (self.cfg.parallel.micro_batch_size, self.cfg.data.n_segments, self.cfg.model.segment_len,
                      self.cfg.model.vocab_size)
        ids = (torch.randint(0, V, (B, 1), generator=g) + torch.arange(K * N + 1)) % V  # (B, K*N + 1)
        reset = torch.zeros(B, K, dtype=torch.bool)
        reset[:, 0] = True
        return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "reset": reset}


@pytest.fixture(scope="module")
def topo():
    return init_distributed()


def trained(topo, root, precision: str):
    t = make_trainer(topo, root, stage=1, batches=Counting, extra=(f"parallel.precision={precision}", *EXTRA))
    losses = [t.train_step().loss for _ in range(STEPS)]
    return t, losses


@pytest.fixture(scope="module")
def runs(topo, tmp_path_factory):
    scans = []
    head_scan = gpt.SCANS["head"]

    def spy(q, k, v, *args):
        read, state = head_scan(q, k, v, *args)
        scans.append((q.dtype, read.dtype, state.A.dtype, state.z.dtype))
        return read, state

    gpt.SCANS["head"] = spy
    try:
        bf16, bf16_losses = trained(topo, tmp_path_factory.mktemp("bf16"), "bf16")
    finally:
        gpt.SCANS["head"] = head_scan
    _, fp32_losses = trained(topo, tmp_path_factory.mktemp("fp32"), "fp32")
    return bf16, bf16_losses, fp32_losses, scans


def test_weights_are_bf16_and_the_memory_is_fp32(runs):
    bf16, _, _, scans = runs
    assert {p.dtype for p in bf16.engine.module.parameters()} == {torch.bfloat16}
    assert scans and set(scans) == {(torch.bfloat16, torch.float32, torch.float32, torch.float32)}
    carried = bf16.step.carry.state(bf16.cfg.model.n_layer)
    assert {t.dtype for s in carried for t in s if t is not None} == {torch.float32}  # None: no window cache


def test_bf16_losses_follow_fp32_within_tolerance(runs):
    _, bf16_losses, fp32_losses, _ = runs
    deltas = [abs(a - b) for a, b in zip(bf16_losses, fp32_losses)]
    assert fp32_losses[-1] < 0.6 * fp32_losses[0]  # the comparison is on a falling loss
    print(f"fp32 {fp32_losses[0]:.4f} -> {fp32_losses[-1]:.4f}; bf16 {bf16_losses[-1]:.4f}; max |bf16 - fp32| "
          f"{max(deltas):.4f} (relative {max(d / f for d, f in zip(deltas, fp32_losses)):.4f}), "
          f"mean {sum(deltas) / STEPS:.4f}")
    worst = max(range(STEPS), key=lambda i: deltas[i] / fp32_losses[i])
    assert deltas[worst] < REL_TOLERANCE * fp32_losses[worst], f"step {worst + 1}: {deltas[worst]:.4f}"
    assert sum(deltas) / STEPS < MEAN_TOLERANCE


def test_a_bf16_checkpoint_restores_every_tensor(runs, topo):
    bf16 = runs[0]
    bf16.save()
    fresh = make_trainer(topo, bf16.checkpointer.root.parent, seed=7, stage=1, batches=Counting,
                         extra=("parallel.precision=bf16", *EXTRA))
    fresh.restore(STEPS)
    assert_same_leaves(full_params(bf16.engine), full_params(fresh.engine))
    assert_same_leaves(optimizer_state(bf16.engine), optimizer_state(fresh.engine))
    assert_same_leaves(flatten(bf16.step.carry.state_dict()), flatten(fresh.step.carry.state_dict()))
