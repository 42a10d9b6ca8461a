"""One task of each kind in numpy float64: fused.py's semantics restricted to the task's tile.

These mirror the CUDA device functions written from the same docstrings: a task reads only
the regions `regions.task_access` gives it (at the runtime `pos`) and writes only its own.
Buffers are float64 numpy arrays (token and amax_idx int64) in a dict keyed by buffer name;
weights may be any float dtype and are promoted to float64 in every product.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, MutableMapping

import numpy as np

from compiler.ir.fused import Instr, Kind
from compiler.schedule.regions import Geometry, qkv_pairs

Array = np.ndarray
Buffers = MutableMapping[str, Array]
Weights = Mapping[str, Array]


def rms_norm(x: Array, w: Array, eps: float) -> Array:
    """x [B, H] / sqrt(mean(x^2) + eps) * w, over the whole row."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w.astype(np.float64)


def matmul_t(h: Array, w: Array) -> Array:
    """h [B, K] @ w[N, K]^T in float64, by numpy's own loops: single threaded, fixed order.

    (A threaded BLAS gemv can change its summation order with the thread count, and is very
    slow on an oversubscribed CPU.)
    """
    return np.einsum("bk,nk->bn", h, np.asarray(w, dtype=np.float64))


def embed(ins: Instr, p: tuple[int, ...], g: Geometry, buf: Buffers, wt: Weights, pos: int) -> None:
    c0, c1 = p
    tok = buf[ins.inputs[0]]
    buf[ins.outputs[0]][:, c0:c1] = np.asarray(wt[ins.inputs[1]][tok, c0:c1], dtype=np.float64)


def qkv_rope_append(
    ins: Instr, p: tuple[int, ...], g: Geometry, buf: Buffers, wt: Weights, pos: int
) -> None:
    """QKV rows [r0, r1) in pair order (schedule.py): each RoPE pair (i, i + D/2) of a head at
    once, y_i cos(a_i) - y_{i+D/2} sin(a_i) and y_{i+D/2} cos(a_i) + y_i sin(a_i)."""
    r0, r1 = p
    x, w = buf[ins.inputs[0]], wt[ins.inputs[1]]
    inv = buf[ins.inputs[5]]
    h = rms_norm(x, w, g.eps)  # [B, H]
    d, half = g.D, g.D // 2
    for part, head, i0, i1 in qkv_pairs(g, r0, r1):
        lo, hi = head * d + i0, head * d + half + i0  # first element of each half
        n = i1 - i0
        weight = wt[ins.inputs[2 + part]]
        y1, y2 = matmul_t(h, weight[lo : lo + n]), matmul_t(h, weight[hi : hi + n])  # [B, n]
        if part < 2:
            a = pos * inv[i0:i1]  # [n]
            cs, sn = np.cos(a), np.sin(a)
            y1, y2 = y1 * cs + -y2 * sn, y2 * cs + y1 * sn
        if part == 0:
            buf[ins.outputs[0]][:, lo : lo + n] = y1
            buf[ins.outputs[0]][:, hi : hi + n] = y2
        else:
            cache = buf[ins.outputs[part]]
            cache[:, head, pos, i0:i1] = y1
            cache[:, head, pos, half + i0 : half + i1] = y2


def attn_partial(
    ins: Instr, p: tuple[int, ...], g: Geometry, buf: Buffers, wt: Weights, pos: int
) -> None:
    kv, part = p
    h0, h1 = kv * g.G, (kv + 1) * g.G
    o, m, l_ = (buf[n] for n in ins.outputs)
    a, b = g.keys(part, pos)
    if a >= b:  # no visible key in this partition
        o[:, h0:h1, part, :] = 0.0
        m[:, h0:h1, part] = -np.inf
        l_[:, h0:h1, part] = 0.0
        return
    q = buf[ins.inputs[0]][:, h0 * g.D : h1 * g.D].reshape(g.B, g.G, g.D)  # [B, G, D]
    k = buf[ins.inputs[1]][:, kv, a:b, :]  # [B, n, D]
    v = buf[ins.inputs[2]][:, kv, a:b, :]
    s = np.einsum("bgd,bnd->bgn", q, k) * (1.0 / math.sqrt(g.D))  # [B, G, n]
    mx = s.max(axis=-1)  # [B, G]
    e = np.exp(s - mx[..., None])
    o[:, h0:h1, part, :] = np.einsum("bgn,bnd->bgd", e, v)
    m[:, h0:h1, part] = mx
    l_[:, h0:h1, part] = e.sum(axis=-1)


def attn_merge(
    ins: Instr, p: tuple[int, ...], g: Geometry, buf: Buffers, wt: Weights, pos: int
) -> None:
    (kv,) = p
    h0, h1 = kv * g.G, (kv + 1) * g.G
    o = buf[ins.inputs[0]][:, h0:h1]  # [B, G, P, D]
    m = buf[ins.inputs[1]][:, h0:h1]  # [B, G, P]
    l_ = buf[ins.inputs[2]][:, h0:h1]
    mx = m.max(axis=-1, keepdims=True)  # finite: the key at pos is always visible
    w = np.where(np.isfinite(m), np.exp(m - mx), 0.0)
    out = (w[..., None] * o).sum(axis=2) / (w * l_).sum(axis=-1)[..., None]  # [B, G, D]
    buf[ins.outputs[0]][:, h0 * g.D : h1 * g.D] = out.reshape(g.B, (h1 - h0) * g.D)


def oproj_residual(
    ins: Instr, p: tuple[int, ...], g: Geometry, buf: Buffers, wt: Weights, pos: int
) -> None:
    r0, r1 = p
    y = matmul_t(buf[ins.inputs[0]], wt[ins.inputs[1]][r0:r1])  # [B, r1 - r0]
    buf[ins.outputs[0]][:, r0:r1] = buf[ins.inputs[2]][:, r0:r1] + y


def gate_up_silu(
    ins: Instr, p: tuple[int, ...], g: Geometry, buf: Buffers, wt: Weights, pos: int
) -> None:
    r0, r1 = p
    h = rms_norm(buf[ins.inputs[0]], wt[ins.inputs[1]], g.eps)
    gate = matmul_t(h, wt[ins.inputs[2]][r0:r1])
    up = matmul_t(h, wt[ins.inputs[3]][r0:r1])
    buf[ins.outputs[0]][:, r0:r1] = gate / (1.0 + np.exp(-gate)) * up  # silu(gate) * up


def down_partial(
    ins: Instr, p: tuple[int, ...], g: Geometry, buf: Buffers, wt: Weights, pos: int
) -> None:
    r0, r1, c = p
    c0, c1 = c * g.CI, (c + 1) * g.CI
    wd = wt[ins.inputs[1]][r0:r1, c0:c1]
    buf[ins.outputs[0]][c, :, r0:r1] = matmul_t(buf[ins.inputs[0]][:, c0:c1], wd)


def down_residual(
    ins: Instr, p: tuple[int, ...], g: Geometry, buf: Buffers, wt: Weights, pos: int
) -> None:
    r0, r1 = p
    acc = buf[ins.inputs[1]][:, r0:r1].copy()
    for c in range(g.KS):  # fixed order: x + down[0] + ... + down[KS-1]
        acc += buf[ins.inputs[0]][c, :, r0:r1]
    buf[ins.outputs[0]][:, r0:r1] = acc


def lmhead_argmax(
    ins: Instr, p: tuple[int, ...], g: Geometry, buf: Buffers, wt: Weights, pos: int
) -> None:
    (t,) = p
    a, b = g.vocab_rows(t)
    if a == b:  # past the vocabulary (fused.py): holds (-inf, -1)
        buf[ins.outputs[1]][:, t] = -np.inf
        buf[ins.outputs[2]][:, t] = -1
        return
    h = rms_norm(buf[ins.inputs[0]], wt[ins.inputs[1]], g.eps)
    logits = matmul_t(h, wt[ins.inputs[2]][a:b])  # [B, b - a]
    buf[ins.outputs[0]][:, a:b] = logits
    buf[ins.outputs[1]][:, t] = logits.max(axis=-1)
    buf[ins.outputs[2]][:, t] = a + logits.argmax(axis=-1)  # first index on ties


def argmax_reduce(
    ins: Instr, p: tuple[int, ...], g: Geometry, buf: Buffers, wt: Weights, pos: int
) -> None:
    val, idx = buf[ins.inputs[0]], buf[ins.inputs[1]]
    best = val.argmax(axis=-1)  # first maximum over tiles in order
    buf[ins.outputs[0]][:] = idx[np.arange(g.B), best]


TILES: dict[Kind, Callable[[Instr, tuple[int, ...], Geometry, Buffers, Weights, int], None]] = {
    Kind.EMBED: embed,
    Kind.QKV_ROPE_APPEND: qkv_rope_append,
    Kind.ATTN_PARTIAL: attn_partial,
    Kind.ATTN_MERGE: attn_merge,
    Kind.OPROJ_RESIDUAL: oproj_residual,
    Kind.GATE_UP_SILU: gate_up_silu,
    Kind.DOWN_PARTIAL: down_partial,
    Kind.DOWN_RESIDUAL: down_residual,
    Kind.LMHEAD_ARGMAX: lmhead_argmax,
    Kind.ARGMAX_REDUCE: argmax_reduce,
}


def run_task(
    ins: Instr,
    params: tuple[int, ...],
    g: Geometry,
    buffers: Buffers,
    weights: Weights,
    pos: int,
    tokens_out: list[Array] | None = None,
) -> None:
    """Execute one task in place on `buffers`.

    Args:
        ins: the task's instruction (kind and operand names).
        params: its tile parameters (schedule.py).
        g: dimensions and bound symbols.
        buffers: every buffer by name, float64 (token, amax_idx int64); updated in place.
        weights: weights by HF name.
        pos: the step's position.
        tokens_out: ARGMAX_REDUCE appends the chosen tokens [B] here.
    """
    TILES[ins.kind](ins, params, g, buffers, weights, pos)
    if ins.kind is Kind.ARGMAX_REDUCE and tokens_out is not None:
        tokens_out.append(buffers[ins.outputs[0]].copy())
