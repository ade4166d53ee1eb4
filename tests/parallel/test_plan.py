"""Activation checkpointing changes memory use, not results or parameter names."""
import torch

from memgpt_dist.config import load_config
from memgpt_dist.train.run import build_model
from memgpt_dist.train.batch import token_loss_sum

OVR = ["model.vocab_size=97", "model.n_embd=32", "model.n_head=2", "model.segment_len=8"]


def loss_and_grads(activation_checkpointing: bool):
    cfg = load_config(None, OVR + [f"parallel.activation_checkpointing={str(activation_checkpointing).lower()}"])
    model = build_model(cfg)
    ids = torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(0))
    out = model(ids[:, :-1])
    loss = token_loss_sum(out.logits, ids[:, 1:])
    loss.backward()
    return model, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_gives_same_loss_and_gradients():
    m0, l0, g0 = loss_and_grads(False)
    m1, l1, g1 = loss_and_grads(True)
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


def test_activation_checkpointing_keeps_parameter_names():
    m0, _, _ = loss_and_grads(False)
    m1, _, _ = loss_and_grads(True)
    assert list(m0.state_dict()) == list(m1.state_dict())


def test_activation_checkpointing_recomputes_blocks_in_backward():
    calls = {}
    for ac in (False, True):
        cfg = load_config(None, OVR + [f"parallel.activation_checkpointing={str(ac).lower()}"])
        model = build_model(cfg)
        n = [0]
        mlp = model.blocks["0"].mlp
        inner = mlp.forward

        def counting_forward(x, inner=inner):  # hooks do not fire during recomputation; count calls
            n[0] += 1
            return inner(x)
        mlp.forward = counting_forward
        ids = torch.randint(0, 97, (2, 16))
        token_loss_sum(model(ids).logits, ids).backward()
        calls[ac] = n[0]
    assert calls == {False: 1, True: 2}
