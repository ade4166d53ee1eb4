"""Per-head associative memory: DPFP features, normalised read, gated delta-rule write.

The rule is ARMT's (Rodkin et al. 2024) placed inside every attention head (the `hdpfp` variant
of /work/shared/research/memory_smoke_test.py). For a segment s of a document, per head:

    read      o_t = phi(q_t) A_{s-1} / (phi(q_t) . z_{s-1} + eps)            every token t of s
    retrieve  r_t = phi(k_t) A_{s-1} / (phi(k_t) . z_{s-1} + eps)
    write     A_s = A_{s-1} + sum_t b_t phi(k_t)^T (v_t - r_t)
              z_s = z_{s-1} + sum_t b_t phi(k_t)

so a segment reads only what earlier segments wrote (causal at the segment level) and the write
stores only what the memory did not already return for that key (delta rule).

`memory.kind: delta` (`delta_scan`) is the exact, token-sequential delta rule of DeltaNet with
unit-length keys and an unnormalised read, computed a segment at a time with one triangular
solve; the rule above corrects only against earlier segments, this one also within a segment.

`memory.decay: true` adds Gated DeltaNet's forgetting gate: per token and head a data-dependent
alpha_t in (0, 1) (initialised near 1) multiplies the state before the token's write,
A_t = alpha_t A_{t-1} + (token t's write), so old associations fade instead of piling up. In the
segment form above this is A_s = G_s A_{s-1} + sum_t (G_s / G_t) b_t phi(k_t)^T (v_t - r_t) with
G_t the product of the segment's alphas up to t (and z alike); reads still see A_{s-1}. The
ratios G_s / G_t <= 1 are taken as exp of differences of cumulative log-alphas, never as a
division, so long segments cannot overflow. `decay_logit` (B, T, H) is the gate's pre-sigmoid.

Numerics: the state and all of its arithmetic are fp32 with autocast disabled, whatever the
activation dtype; sums over hundreds of segments in bf16 would drift. The state is a tuple of
per-layer `LayerState(A, z)` namedtuples: plain tensors in tuples, which DeepSpeed's module hooks
pass through, kept out of buffers and `state_dict` because it is per sample, not a weight.
Everything here is per head, so sharding heads across tensor-parallel ranks shards the state
with them and needs no communication.
"""
from __future__ import annotations

from typing import Collection, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


class LayerState(NamedTuple):
    """What one layer carries from a forward to the next, for a batch. A: (B, H, dk, hd)
    associations, z: (B, H, dk) normaliser (None without memory); with `model.attention: window`
    also the last segment's attention keys and values k, v (B, H, N, hd) and which of their slots
    hold a token, kv_valid (B, H, N) bool (`window.WindowCache`; None otherwise)."""

    A: Optional[Tensor]
    z: Optional[Tensor]
    k: Optional[Tensor] = None
    v: Optional[Tensor] = None
    kv_valid: Optional[Tensor] = None


STATE_FIELDS = ("A", "z", "k", "v", "kv_valid")  # saved as "layer<i>.<field>" where not None


# One entry per layer, in layer order: a LayerState, or None for a layer that carries nothing (a
# block without memory, `memory.layers`, under segment or full attention). With window attention
# such a block's entry is a LayerState with A = z = None and the window's k, v, kv_valid.
MemoryState = tuple[Optional[LayerState], ...]


def feature_dim(head_dim: int, nu: int) -> int:
    """Size of the key space: dk = 2 * nu * head_dim DPFP features, or head_dim for nu = 0 (raw
    unit-length keys, `memory.kind: delta` only; see `delta_features`)."""
    return 2 * nu * head_dim if nu > 0 else head_dim


def dpfp(x: Tensor, nu: int) -> Tensor:
    """Deterministic parameter-free projection (Schlag et al. 2021) of the last dimension.

    r = [relu(x), relu(-x)] is non-negative, so every feature (a product of two entries of r)
    is too and the normaliser phi(q) . z stays positive. (..., hd) -> (..., 2 * nu * hd).
    """
    r = F.relu(torch.cat([x, -x], dim=-1))  # (..., 2 * hd)
    L = r.shape[-1]
    # feature block j is r * roll(r, j), i.e. r_i * r_{(i - j) mod L}; every roll is a slice of
    # one copy of r with its last nu entries in front: rr[nu - j + i] = r_{(i - j) mod L}. Whole
    # (L,)-wide products, not two per block of widths j and L - j, whose narrow strided slices
    # made dpfp 1.25x (forward) to 1.34-1.42x (forward and backward) slower on CPU
    rr = torch.cat([r[..., L - nu:], r], dim=-1)  # (..., L + nu)
    rolled = [rr[..., nu - j:nu - j + L] for j in range(1, nu + 1)]  # nu x (..., L)
    if torch.is_grad_enabled() and r.requires_grad:
        return torch.cat([r * rolled_j for rolled_j in rolled], dim=-1)  # (..., 2 * nu * hd)
    # without autograd (evaluation, streaming, decoding) the products go straight to their place:
    # the cat's extra pass over every feature was a tenth of a streamed read
    out = r.new_empty(*r.shape[:-1], nu * L)  # (..., 2 * nu * hd)
    for j, rolled_j in enumerate(rolled):
        torch.mul(r, rolled_j, out=out[..., j * L:(j + 1) * L])
    return out


def zero_layer_state(batch: int, n_head: int, head_dim: int, nu: int,
                     device: Optional[torch.device] = None) -> LayerState:
    """The empty memory of one layer (document start), always fp32."""
    dk = feature_dim(head_dim, nu)
    return LayerState(A=torch.zeros(batch, n_head, dk, head_dim, device=device, dtype=torch.float32),
                      z=torch.zeros(batch, n_head, dk, device=device, dtype=torch.float32))


def zero_state(n_layer: int, batch: int, n_head: int, head_dim: int, nu: int,
               device: Optional[torch.device] = None, layers: Optional[Collection[int]] = None) -> MemoryState:
    """The empty memory of a whole model; equivalent to passing `state=None`. `layers`: the
    blocks that have the memory (`GPT.memory_layers`; None: every block); the others get None."""
    return tuple(zero_layer_state(batch, n_head, head_dim, nu, device) if layers is None or i in layers else None
                 for i in range(n_layer))


def _map_fields(s: Optional[LayerState], fn) -> Optional[LayerState]:
    if s is None:  # a layer that carries nothing
        return None
    return LayerState(*(None if t is None else fn(name, t) for name, t in zip(STATE_FIELDS, s)))


def detach_state(state: Optional[MemoryState]) -> Optional[MemoryState]:
    """Cut the graph at a state (truncated BPTT between optimizer steps)."""
    if state is None:
        return None
    return tuple(_map_fields(s, lambda _, t: t.detach()) for s in state)


def move_state(state: Optional[MemoryState], device: torch.device | str) -> Optional[MemoryState]:
    """Move a state to `device`, keeping the memory fp32 whatever it was cast to on the way (the
    window's keys and values keep their dtype, its mask stays bool)."""
    if state is None:
        return None

    def move(name: str, t: Tensor) -> Tensor:
        return t.to(device=device, dtype=torch.float32) if name in ("A", "z") else t.to(device)

    return tuple(_map_fields(s, move) for s in state)


def state_to_dict(state: MemoryState) -> dict[str, Tensor]:
    """Flat `{"layer{i}.A": ..., "layer{i}.z": ...}` (and `.k`, `.v`, `.kv_valid` with a window)
    that `torch.load(weights_only=True)` accepts; a layer that carries nothing has no key."""
    out: dict[str, Tensor] = {}
    for i, s in enumerate(state):
        for name, t in zip(STATE_FIELDS, s if s is not None else ()):
            if t is not None:
                out[f"layer{i}.{name}"] = t
    return out


def state_from_dict(tensors: dict[str, Tensor], n_layer: Optional[int] = None) -> MemoryState:
    """Inverse of `state_to_dict`: `n_layer` entries (None for the layers without a key; without
    `n_layer`, up to the last layer that has one, which is short when the last blocks carry
    nothing: `memory.layers`)."""
    saved = {int(key.split(".")[0][len("layer"):]) for key in tensors}
    n = n_layer if n_layer is not None else max(saved, default=-1) + 1
    return tuple(LayerState(*(tensors.get(f"layer{i}.{name}") for name in STATE_FIELDS)) if i in saved else None
                 for i in range(n))


def reset_where(state: LayerState, reset: Tensor) -> LayerState:
    """Zero the memory of the samples where `reset` (B,) is True.

    `torch.where` selects exact zeros (no multiply by 0, which would keep NaN/Inf and a gradient
    path), so nothing of the previous document survives, in values or in gradients.
    """
    keep = ~reset.view(-1, 1, 1)  # (B, 1, 1)
    return LayerState(A=torch.where(keep.unsqueeze(-1), state.A, 0.0), z=torch.where(keep, state.z, 0.0))


def normalised_read(phi_x: Tensor, state: LayerState, eps: float) -> Tensor:
    """phi(x) A / (phi(x) . z + eps). phi_x: (B, H, n, dk) -> (B, H, n, hd)."""
    numerator = phi_x @ state.A  # (B, H, n, hd)
    denominator = phi_x @ state.z.unsqueeze(-1)  # (B, H, n, 1)
    return numerator / (denominator + eps)


def delta_write(phi_k: Tensor, v: Tensor, b: Tensor, retrieved: Tensor, state: LayerState) -> LayerState:
    """Gated delta-rule update from one segment. phi_k: (B, H, n, dk), v/retrieved: (B, H, n, hd), b: (B, H, n, 1)."""
    gated_k = b * phi_k  # (B, H, n, dk)
    A = state.A + gated_k.transpose(-1, -2) @ (v - retrieved)  # (B, H, dk, hd)
    z = state.z + gated_k.sum(dim=2)  # (B, H, dk)
    return LayerState(A, z)


def reference_scan(q: Tensor, k: Tensor, v: Tensor, write_logit: Tensor, state: Optional[LayerState],
                   reset: Optional[Tensor], segment_len: int, nu: int, eps: float,
                   decay_logit: Optional[Tensor] = None) -> tuple[Tensor, LayerState]:
    """The equations above written out one by one (with decay: token by token, the recurrence
    A_t = alpha_t A_{t-1} + b_t phi(k_t)^T (v_t - r_t)); `memory_scan` is its fused form and is
    tested against it. Same arguments and results as `memory_scan`."""
    B, T, H, hd = q.shape
    with torch.autocast(device_type=q.device.type, enabled=False):
        phi_q = dpfp(q.float().transpose(1, 2), nu)  # (B, H, T, dk)
        phi_k = dpfp(k.float().transpose(1, 2), nu)  # (B, H, T, dk)
        v = v.float().transpose(1, 2)  # (B, H, T, hd)
        b = torch.sigmoid(write_logit.float()).transpose(1, 2).unsqueeze(-1)  # (B, H, T, 1)
        if state is None:
            state = zero_layer_state(B, H, hd, nu, device=q.device)
        reads = []
        segments = zip(*(t.split(segment_len, dim=2) for t in (phi_q, phi_k, v, b)))
        for s, (phi_q_s, phi_k_s, v_s, b_s) in enumerate(segments):
            if reset is not None:
                state = reset_where(state, reset[:, s])
            reads.append(normalised_read(phi_q_s, state, eps))  # (B, H, n, hd)
            retrieved = normalised_read(phi_k_s, state, eps)  # (B, H, n, hd)
            if decay_logit is None:
                state = delta_write(phi_k_s, v_s, b_s, retrieved, state)
                continue
            alpha = torch.sigmoid(decay_logit[:, s * segment_len:(s + 1) * segment_len].float())  # (B, n, H)
            for t in range(phi_k_s.shape[2]):
                a_t = alpha[:, t].view(B, H, 1, 1)  # (B, H, 1, 1)
                decayed = LayerState(a_t * state.A, a_t[..., 0] * state.z)
                state = delta_write(phi_k_s[:, :, t:t + 1], v_s[:, :, t:t + 1], b_s[:, :, t:t + 1],
                                    retrieved[:, :, t:t + 1], decayed)
        read = torch.cat(reads, dim=2).transpose(1, 2)  # (B, T, H, hd)
    return read, LayerState(state.A, state.z)


def memory_scan(q: Tensor, k: Tensor, v: Tensor, write_logit: Tensor, state: Optional[LayerState],
                reset: Optional[Tensor], segment_len: int, nu: int, eps: float,
                decay_logit: Optional[Tensor] = None) -> tuple[Tensor, LayerState]:
    """Read and write the memory of one layer over every segment of a sequence.

    q, k, v: (B, T, H, hd) memory projections; write_logit: (B, T, H) pre-sigmoid write gates;
    state: the layer's memory before the first segment (None: empty); reset: (B, S) bool, True
    where segment s starts a new document; decay_logit: (B, T, H) pre-sigmoid forgetting gates
    (None: no decay). Returns the reads (B, T, H, hd) in fp32 and the state after the last
    segment. Gradients flow through the state across all segments.

    Fused form of `reference_scan`, which is the readable one. z rides along as an extra column
    of A, so one matmul gives numerator and denominator, and the read of q and the retrieval of
    k share it ([q of s; k of s] against [A | z]); one more matmul (the gates times values with
    a column of ones) writes both A and z. Gates and values are computed for all segments at
    once, the DPFP features a segment at a time inside the loop (the same values): the features
    are 2 * nu times wider than the heads, and one segment's stay in cache for its two matmuls,
    while all segments' at once went through memory and their gradients were stacked back into
    one tensor (forward and backward 1.1-1.2x faster this way at the ~20M and recall shapes).
    This form is the fastest in training (forward and backward) of the ones measured: batching
    the reads of q after the loop (z and its denominators first, as multiply-and-sum) was
    1.2-1.5x slower at the ~20M shapes, its denominators' backward touching every feature again.
    A ragged last segment is zero-padded: a zero key has zero features, so padding neither
    writes nor is read.
    """
    B, T, H, hd = q.shape
    n = segment_len
    S = -(-T // n)  # segments, the last one possibly short
    with torch.autocast(device_type=q.device.type, enabled=False):
        qk = torch.stack([_segments(q, n, S), _segments(k, n, S)], dim=3).flatten(3, 4)  # (S, B, H, 2n, hd)
        b = _segments(torch.sigmoid(write_logit.float()).unsqueeze(-1), n, S)  # (S, B, H, n, 1)
        v_aug = F.pad(_segments(v, n, S), (0, 1), value=1.0)  # (S, B, H, n, hd + 1): ones write z
        A = None if state is None else torch.cat([state.A.float(), state.z.float().unsqueeze(-1)], dim=-1)
        decays = _segment_decays(decay_logit, n, S)  # (S, B, H, n, 1) or None
        reads = []
        # unbind/split, never indexing: the backward of an index is a zero fill of the whole tensor.
        # The gate scales the (n, hd + 1) values, not the (n, dk) keys: sum_t b_t phi_t^T d_t is both.
        for s, (qk_s, b_s, v_aug_s) in enumerate(zip(qk.unbind(0), b.unbind(0), v_aug.unbind(0))):
            phi_s = dpfp(qk_s, nu)  # (B, H, 2n, dk): rows [q of s; k of s]
            phi_k = phi_s[:, :, n:]  # (B, H, n, dk)
            if decays is not None:  # later tokens' decay on each write, the whole segment's on A
                cum = decays[s]  # (B, H, n, 1)
                b_s = b_s * torch.exp(cum[:, :, -1:] - cum)  # (B, H, n, 1)
            if A is not None and reset is not None:
                A = torch.where(reset[:, s].view(-1, 1, 1, 1), 0.0, A)  # exact zeros: no value or gradient leaks
            if A is None:  # empty memory: reads and retrievals are exactly 0 / (0 + eps) = 0
                reads.append(phi_s.new_zeros(B, H, n, hd))
                A = phi_k.transpose(-1, -2) @ (b_s * v_aug_s)  # (B, H, dk, hd + 1)
                continue
            num, den = (phi_s @ A).split([hd, 1], dim=-1)  # (B, H, 2n, hd), (B, H, 2n, 1)
            read_s, retrieved = (num / (den + eps)).split(n, dim=2)  # (B, H, n, hd) each
            reads.append(read_s)
            delta = b_s * (v_aug_s - F.pad(retrieved, (0, 1)))  # (B, H, n, hd + 1): z's column keeps b
            if decays is not None:
                A = torch.exp(decays[s][:, :, -1:]) * A  # (B, H, 1, 1) x (B, H, dk, hd + 1)
            A = A + phi_k.transpose(-1, -2) @ delta  # (B, H, dk, hd + 1)
        read = torch.cat(reads, dim=2).transpose(1, 2)  # (B, S * n, H, hd)
        read = read if S * n == T else read[:, :T]  # (B, T, H, hd)
    return read, LayerState(A[..., :hd].contiguous(), A[..., hd].contiguous())


def _segment_decays(decay_logit: Optional[Tensor], n: int, S: int) -> Optional[Tensor]:
    """Cumulative log-alphas inside each segment, (S, B, H, n, 1) (None: no decay); padding
    tokens have alpha = 1 (log 0), so a ragged last segment decays only over its real tokens."""
    if decay_logit is None:
        return None
    return _segments(F.logsigmoid(decay_logit.float()).unsqueeze(-1), n, S).cumsum(dim=3)


def _segments(x: Tensor, n: int, S: int) -> Tensor:
    """(B, T, H, c) -> (S, B, H, n, c) in fp32, zero-padded to S * n tokens; segments lead so
    that indexing one is a contiguous slice."""
    B, T, H, c = x.shape
    x = x.float()
    if S * n != T:
        x = F.pad(x, (0, 0, 0, 0, 0, S * n - T))  # (B, S * n, H, c)
    return x.view(B, S, n, H, c).permute(1, 0, 3, 2, 4).contiguous()  # (S, B, H, n, c)


def delta_features(x: Tensor, nu: int) -> Tensor:
    """Unit-length keys for the exact delta rule: DPFP features (nu >= 1) or the raw head
    vector (nu = 0), L2-normalised so that a write with gate b in (0, 1) is a contraction
    (I - b k k^T has eigenvalues in [0, 1]) and the state cannot blow up. (..., hd) -> (..., dk)."""
    phi = dpfp(x, nu) if nu > 0 else x
    return F.normalize(phi, dim=-1)


def delta_reference_scan(q: Tensor, k: Tensor, v: Tensor, write_logit: Tensor, state: Optional[LayerState],
                         reset: Optional[Tensor], segment_len: int, nu: int, eps: float,
                         decay_logit: Optional[Tensor] = None) -> tuple[Tensor, LayerState]:
    """`delta_scan` written token by token (DeltaNet's recurrence), for tests:
    A_t = A_{t-1} + b_t phi(k_t)^T (v_t - phi(k_t) A_{t-1}), with decay (Gated DeltaNet) A_{t-1}
    first multiplied by alpha_t; reads see only earlier segments."""
    B, T, H, hd = q.shape
    with torch.autocast(device_type=q.device.type, enabled=False):
        phi_q = delta_features(q.float().transpose(1, 2), nu)  # (B, H, T, dk)
        phi_k = delta_features(k.float().transpose(1, 2), nu)  # (B, H, T, dk)
        v = v.float().transpose(1, 2)  # (B, H, T, hd)
        b = torch.sigmoid(write_logit.float()).transpose(1, 2).unsqueeze(-1)  # (B, H, T, 1)
        if state is None:
            state = LayerState(q.new_zeros(B, H, phi_k.shape[-1], hd, dtype=torch.float32),
                               q.new_zeros(B, H, phi_k.shape[-1], dtype=torch.float32))
        A, z = state.A, state.z
        alpha = None if decay_logit is None else torch.sigmoid(decay_logit.float()).transpose(1, 2)  # (B, H, T)
        reads = []
        for s, start in enumerate(range(0, T, segment_len)):
            if reset is not None:
                A, z = reset_where(LayerState(A, z), reset[:, s])[:2]
            end = min(start + segment_len, T)
            reads.append(phi_q[:, :, start:end] @ A)  # (B, H, n, hd): the memory before this segment
            for t in range(start, end):
                kt, bt = phi_k[:, :, t:t + 1], b[:, :, t:t + 1]  # (B, H, 1, dk), (B, H, 1, 1)
                if alpha is not None:
                    A, z = alpha[:, :, t, None, None] * A, alpha[:, :, t, None] * z
                A = A + kt.transpose(-1, -2) @ (bt * (v[:, :, t:t + 1] - kt @ A))  # (B, H, dk, hd)
                z = z + (bt * kt).squeeze(2)
        read = torch.cat(reads, dim=2).transpose(1, 2)  # (B, T, H, hd)
    return read, LayerState(A, z)


def delta_scan(q: Tensor, k: Tensor, v: Tensor, write_logit: Tensor, state: Optional[LayerState],
               reset: Optional[Tensor], segment_len: int, nu: int, eps: float,
               decay_logit: Optional[Tensor] = None) -> tuple[Tensor, LayerState]:
    """The exact (token-sequential) delta rule, computed a segment at a time.

    `memory_scan` writes all tokens of a segment at once against the memory of the previous
    segment, so pairs written in the same segment blur into each other; here every token's write
    corrects what the tokens before it (same segment included) stored under a similar key, as in
    DeltaNet (Schlag et al. 2021; Yang et al. 2024). Reads stay causal at the segment level and
    unnormalised: o_t = phi(q_t) A_{s-1}. Same arguments and results as `memory_scan`
    (z accumulates the gated keys, kept for a uniform state; the read does not use it).

    Per segment, with K the n unit keys, b the gates and V the values, the n sequential updates
    equal one: solve (I + tril(diag(b) K K^T, -1)) U = diag(b) (V - K A) (unit lower triangular)
    and set A <- A + K^T U, the WY/UT form of the chunked delta rule. With decay (Gated
    DeltaNet), G_t the cumulative alphas of the segment: the Gram matrix's (t, j) entry is scaled
    by G_t / G_j, the retrieval by G_t, and A <- G_n A + K^T diag(G_n / G_t) U (ratios as exp of
    log differences, all <= 1).
    """
    B, T, H, hd = q.shape
    n = segment_len
    S = -(-T // n)
    with torch.autocast(device_type=q.device.type, enabled=False):
        qk = torch.stack([_segments(q, n, S), _segments(k, n, S)], dim=3).flatten(3, 4)  # (S, B, H, 2n, hd)
        b = _segments(torch.sigmoid(write_logit.float()).unsqueeze(-1), n, S)  # (S, B, H, n, 1)
        vs = _segments(v, n, S)  # (S, B, H, n, hd)
        dk = feature_dim(hd, nu)
        A = qk.new_zeros(B, H, dk, hd) if state is None else state.A
        z = qk.new_zeros(B, H, dk) if state is None else state.z
        strictly_lower = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)  # (n, n)
        eye = torch.eye(n, device=q.device)
        decays = _segment_decays(decay_logit, n, S)
        reads = []
        # the features a segment at a time, as in memory_scan (zero padding stays zero)
        for s, (qk_s, b_s, v_s) in enumerate(zip(qk.unbind(0), b.unbind(0), vs.unbind(0))):
            phi_q, phi_k = delta_features(qk_s, nu).split(n, dim=2)  # (B, H, n, dk) each
            if reset is not None:
                keep = ~reset[:, s].view(-1, 1, 1)  # (B, 1, 1)
                A, z = torch.where(keep.unsqueeze(-1), A, 0.0), torch.where(keep, z, 0.0)
            reads.append(phi_q @ A)  # (B, H, n, hd)
            gram = b_s * (phi_k @ phi_k.transpose(-1, -2))  # (B, H, n, n)
            retrieved = phi_k @ A  # (B, H, n, hd)
            if decays is not None:
                cum = decays[s]  # (B, H, n, 1)
                # masked before exp: the upper triangle's G_t / G_j > 1 is never formed
                ratio = torch.where(strictly_lower, cum - cum.transpose(-1, -2), float("-inf")).exp()  # (B, H, n, n)
                gram, retrieved = gram * ratio, torch.exp(cum) * retrieved
            gram = torch.where(strictly_lower, gram, 0.0)
            u = torch.linalg.solve_triangular(eye + gram, b_s * (v_s - retrieved), upper=False,
                                              unitriangular=True)  # (B, H, n, hd)
            gated_k = b_s * phi_k  # (B, H, n, dk)
            if decays is not None:
                later = torch.exp(cum[:, :, -1:] - cum)  # (B, H, n, 1): G_n / G_t
                A, z = torch.exp(cum[:, :, -1:]) * A, torch.exp(cum[:, :, -1]) * z
                u, gated_k = later * u, later * gated_k
            A = A + phi_k.transpose(-1, -2) @ u  # (B, H, dk, hd)
            z = z + gated_k.sum(dim=2)  # (B, H, dk)
        read = torch.cat(reads, dim=2)[:, :, :T].transpose(1, 2)  # (B, T, H, hd)
    return read, LayerState(A, z)


def memory_read(q: Tensor, state: LayerState, kind: str, nu: int, eps: float) -> Tensor:
    """What tokens of an open segment read (incremental decoding): the read of `memory_scan`
    (kind 'head') or `delta_scan` (kind 'delta') against the memory before the segment.
    q: (B, m, H, hd) -> (B, m, H, hd) fp32."""
    hd = q.shape[-1]
    with torch.autocast(device_type=q.device.type, enabled=False):
        x = q.float().transpose(1, 2)  # (B, H, m, hd)
        if kind == "delta":
            return (delta_features(x, nu) @ state.A).transpose(1, 2)
        A = torch.cat([state.A, state.z.unsqueeze(-1)], dim=-1)  # (B, H, dk, hd + 1): z as a column, as the scan
        num, den = (dpfp(x, nu) @ A).split([hd, 1], dim=-1)  # (B, H, m, hd), (B, H, m, 1)
        return (num / (den + eps)).transpose(1, 2)
