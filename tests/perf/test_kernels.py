"""Fused kernels: the selection (on CPU: the PyTorch path, saying why), the PyTorch path's own loss,
and liger-kernel's fused linear cross-entropy equal to it wherever it runs (CUDA)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memgpt_dist.perf.kernels import linear_cross_entropy_sum, select_linear_cross_entropy
from memgpt_dist.train.batch import IGNORE, token_loss_sum


def test_on_cpu_the_pytorch_path_is_chosen_and_says_why():
    choice = select_linear_cross_entropy("cpu")
    assert choice.name == "torch"
    assert "needs CUDA" in choice.reason


def test_without_liger_installed_the_pytorch_path_is_chosen(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_liger(name, *args, **kw):
        if name.startswith("liger_kernel"):
            raise ImportError("No module named 'liger_kernel'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_liger)
    choice = select_linear_cross_entropy("cuda")
    assert choice.name == "torch" and "not installed" in choice.reason and "memgpt-dist[fused]" in choice.reason


def test_the_pytorch_path_is_the_training_loss_of_the_logits():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 7, 16, generator=g), torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 50, (2, 7), generator=g)
    labels[0, :3] = IGNORE
    torch.testing.assert_close(linear_cross_entropy_sum(h, w, labels), token_loss_sum(F.linear(h, w), labels))


def test_an_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="unknown linear cross-entropy kernel 'triton'"):
        linear_cross_entropy_sum(torch.zeros(1, 4), torch.zeros(3, 4), torch.zeros(1, dtype=torch.long), "triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="liger-kernel runs on CUDA only")
def test_liger_fused_linear_cross_entropy_equals_pytorch_with_its_gradients():
    pytest.importorskip("liger_kernel")
    assert select_linear_cross_entropy("cuda").name == "liger"
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(4, 256, 512, device="cuda", dtype=torch.bfloat16, generator=g)
    w = (torch.randn(8192, 512, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02)
    labels = torch.randint(0, 8192, (4, 256), device="cuda", generator=g)
    labels[:, :10] = IGNORE
    out = {}
    for kernel in ("torch", "liger"):
        hk, wk = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = linear_cross_entropy_sum(hk, wk, labels, kernel)
        loss.backward()
        out[kernel] = (loss.detach(), hk.grad.float(), wk.grad.float())
    torch.testing.assert_close(out["liger"][0], out["torch"][0], rtol=1e-2, atol=0.0)
    for a, b in zip(out["liger"][1:], out["torch"][1:]):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2 * b.abs().max().item())
