"""Fused kernels from well-kept libraries, chosen once: optional, used where installed and working,
with the PyTorch path as the reference they are tested against.

The one kernel so far is liger-kernel's fused linear cross-entropy: the LM head's matmul and the
loss in chunks, so the (B, T, vocab) logits are never materialised (at vocab 50K and 8K tokens per
micro-batch they are 1.6 GB in fp32, plus their gradient). It runs on CUDA only (triton);
install it with `pip install 'memgpt-dist[fused]'`. The model imports only torch: this is
passed in from outside (`train/run.py: fused_loss_fn`, `GPT.forward(loss_fn=)`) and applied to
the final hidden state and the LM head's weight inside the model's forward.
"""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memgpt_dist.train.batch import IGNORE, token_loss_sum


@dataclass(frozen=True)
class KernelChoice:
    """Which implementation runs (`name`: "torch" or the library's) and why, for the run's log."""

    name: str
    reason: str


def select_linear_cross_entropy(device_type: str) -> KernelChoice:
    """liger-kernel's fused linear cross-entropy on CUDA when it imports and passes a small call
    that matches the PyTorch path; the PyTorch path everywhere else, saying why."""
    if device_type != "cuda":
        return KernelChoice("torch", f"PyTorch linear + cross_entropy: liger-kernel needs CUDA (device: {device_type})")
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy  # noqa: F401
    except ImportError as exc:
        return KernelChoice("torch", f"PyTorch linear + cross_entropy: liger-kernel is not installed ({exc}); "
                                     f"pip install 'memgpt-dist[fused]'")
    problem = _smoke_test("liger")
    if problem:
        return KernelChoice("torch", f"PyTorch linear + cross_entropy: liger-kernel failed its check ({problem})")
    version = importlib.metadata.version("liger-kernel")
    return KernelChoice("liger", f"liger-kernel {version} fused linear cross-entropy (no (B, T, vocab) logits)")


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             kernel: str = "torch") -> torch.Tensor:
    """Summed next-token cross entropy of the logits `hidden @ weight.T` over positions whose
    label is not IGNORE. hidden: (..., C); weight: (vocab, C); labels: (...). The loss is fp32."""
    h = hidden.reshape(-1, hidden.size(-1))  # (B*T, C)
    y = labels.reshape(-1)  # (B*T,)
    if kernel == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(h, weight, y, ignore_index=IGNORE, reduction="sum").float()
    if kernel != "torch":
        raise ValueError(f"unknown linear cross-entropy kernel {kernel!r}; use 'torch' or 'liger'")
    return token_loss_sum(F.linear(h, weight), y)  # the training step's own loss, on the logits


def _smoke_test(kernel: str) -> str:
    """'' when `kernel` matches the PyTorch path on a small bf16 CUDA problem, else what went wrong."""
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(1000, 128, device="cuda", dtype=torch.bfloat16, generator=g) * 0.05
    y = torch.randint(0, 1000, (64,), device="cuda", generator=g)
    try:
        got = linear_cross_entropy_sum(h, w, y, kernel)
    except Exception as exc:  # a broken install (triton, driver) must not stop training
        return f"{type(exc).__name__}: {exc}"
    want = linear_cross_entropy_sum(h, w, y, "torch")
    if not torch.allclose(got, want, rtol=2e-2):
        return f"loss {float(got):.4f} != PyTorch {float(want):.4f}"
    return ""
