"""Execute a FusedGraph on the CPU in float64: the semantics of `compiler.ir.fused`, in numpy.

Instructions run in program order over whole buffers (no tiles), exactly as the module docstring
of `compiler.ir.fused` defines them, including the split forms the schedule tiles: attention in
P KV partitions merged by online softmax, the down projection in KS split-K chunks, and the LM
head's argmax over NT vocabulary tiles. Every float buffer is float64 whatever its storage type,
so this is the reference the schedule interpreter and the kernels are compared with.

Projections are computed one token row at a time (a [B, 1, H] @ [H, N] product, as the model
graph computes them), so the KV caches this writes are bit-identical to `compiler.ir.evaluate`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from compiler.ir.evaluate import concrete
from compiler.ir.fused import FusedGraph, Instr, Kind
from compiler.ir.graph import IRError

Array = np.ndarray
SPLITS = ("P", "KS", "NT")


def _array(v: Any, integer: bool = False) -> Array:
    if hasattr(v, "detach"):  # torch tensor
        v = v.detach().cpu()
        v = v.double() if v.is_floating_point() else v
        v = v.numpy()
    return np.asarray(v, dtype=np.int64 if integer else np.float64)


def _linear(x: Array, w: Array) -> Array:
    """x [B, K] @ w[N, K]^T -> [B, N], one row at a time (see the module docstring)."""
    return np.matmul(x[:, None, :], w.T)[:, 0]


def _rms(x: Array, w: Array, eps: float) -> Array:
    """RMSNorm of each row: x * rsqrt(mean(x^2) + eps) * w."""
    return x * (1.0 / np.sqrt(np.mean(np.power(x, 2.0), axis=-1, keepdims=True) + eps)) * w


def _rotate_half(y: Array) -> Array:
    half = y.shape[-1] // 2
    return np.concatenate((-y[..., half:], y[..., :half]), axis=-1)


def _silu(x: Array) -> Array:
    return x * (1.0 / (1.0 + np.exp(-x)))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class _Machine:
    """Buffers, weights and the bound sizes of one run."""

    def __init__(
        self,
        fg: FusedGraph,
        bufs: dict[str, Array],
        weights: Mapping[str, Any],
        pos: int,
        env: dict[str, int],
    ):
        self.fg, self.bufs, self.pos, self.env = fg, bufs, pos, env
        self._weights = weights
        self._loaded: dict[str, Array] = {}

    def get(self, name: str) -> Array:
        """A buffer's current value, `pos`, or a weight (as float64)."""
        if name == "pos":
            return np.asarray(self.pos)
        if name in self.bufs:
            return self.bufs[name]
        if name not in self._loaded:
            if name not in self._weights:
                raise IRError(f"operand {name!r} is neither a buffer nor a given weight")
            self._loaded[name] = _array(self._weights[name])
        return self._loaded[name]

    def put(self, name: str, value: Array) -> None:
        buf = self.bufs[name]
        if value.shape != buf.shape:
            raise IRError(f"{name}: writing shape {list(value.shape)} into {list(buf.shape)}")
        buf[...] = value

    def dim(self, key: str) -> Any:
        return self.fg.dim(key)


def _embed(m: _Machine, i: Instr) -> None:
    ins, outs = i.inputs, i.outputs
    token, table = m.get(ins[0]).astype(np.int64), m.get(ins[1])
    if ((token < 0) | (token >= table.shape[0])).any():
        raise IRError(f"EMBED: token ids {token.tolist()} outside [0, {table.shape[0]})")
    m.put(outs[0], table[token])  # x[b] = E[token[b]]


def _qkv_rope_append(m: _Machine, i: Instr) -> None:
    ins, outs = i.inputs, i.outputs
    x, wn, wq, wk, wv, inv = (m.get(n) for n in ins[:6])
    hq, kv, d = m.dim("heads"), m.dim("kv_heads"), m.dim("head_dim")
    b = x.shape[0]
    h = _rms(x, wn, i.attr("eps"))
    angles = m.pos * inv  # [D/2]: a_i = pos * inv_freq[i]
    angles = np.concatenate((angles, angles))  # [D]: a_i = pos * inv_freq[i mod D/2]
    cos, sin = np.cos(angles), np.sin(angles)

    def rope(y: Array) -> Array:
        return y * cos + _rotate_half(y) * sin

    q = rope(_linear(h, wq).reshape(b, hq, d))  # [B, Hq, D]
    k = rope(_linear(h, wk).reshape(b, kv, d))  # [B, KV, D]
    v = _linear(h, wv).reshape(b, kv, d)
    m.put(outs[0], q.reshape(b, hq * d))
    kc, vc = m.get(ins[7]).copy(), m.get(ins[8]).copy()  # [B, KV, S, D]
    kc[:, :, m.pos], vc[:, :, m.pos] = k, v
    m.put(outs[1], kc)
    m.put(outs[2], vc)


def _attn_partial(m: _Machine, i: Instr) -> None:
    ins, outs = i.inputs, i.outputs
    q, kc, vc = (m.get(n) for n in ins[:3])
    hq, kv, d = m.dim("heads"), m.dim("kv_heads"), m.dim("head_dim")
    b, s, parts = kc.shape[0], kc.shape[2], m.env["P"]
    q = q.reshape(b, hq, 1, d)
    keys = np.repeat(kc, hq // kv, axis=1)  # [B, Hq, S, D]: head h reads KV head h // G
    vals = np.repeat(vc, hq // kv, axis=1)
    scores = np.matmul(q, keys.transpose(0, 1, 3, 2))[:, :, 0] * (1.0 / math.sqrt(d))  # [B, Hq, S]
    window = m.dim("sliding_window")
    lo = 0 if window is None else max(0, m.pos - window + 1)
    j = np.arange(s)
    c = _ceil_div(m.pos + 1 - lo, parts)  # keys per partition: ceil(n / P) of the n visible
    o = np.zeros((b, hq, parts, d))
    mx = np.full((b, hq, parts), -np.inf)
    ell = np.zeros((b, hq, parts))
    for p in range(parts):
        sel = (j >= lo + p * c) & (j < min(lo + (p + 1) * c, m.pos + 1))  # [S]
        if not sel.any():
            continue  # no key: m = -inf, l = 0, o = 0
        sp = scores[:, :, sel]  # [B, Hq, n]
        mp = sp.max(axis=-1)  # [B, Hq]
        e = np.exp(sp - mp[..., None])
        mx[:, :, p], ell[:, :, p] = mp, e.sum(axis=-1)
        o[:, :, p] = np.matmul(e[:, :, None, :], vals[:, :, sel])[:, :, 0]
    m.put(outs[0], o)
    m.put(outs[1], mx)
    m.put(outs[2], ell)


def _attn_merge(m: _Machine, i: Instr) -> None:
    ins, outs = i.inputs, i.outputs
    o, mx, ell = (m.get(n) for n in ins)  # [B, Hq, P, D], [B, Hq, P], [B, Hq, P]
    big = mx.max(axis=-1, keepdims=True)  # M = max_p m_p
    big = np.where(np.isfinite(big), big, 0.0)
    w = np.where(np.isfinite(mx), np.exp(np.where(np.isfinite(mx), mx, 0.0) - big), 0.0)
    num = np.sum(w[..., None] * o, axis=2)  # [B, Hq, D]
    den = np.sum(w * ell, axis=2)[..., None]  # [B, Hq, 1]
    attn = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    m.put(outs[0], attn.reshape(attn.shape[0], -1))


def _oproj_residual(m: _Machine, i: Instr) -> None:
    ins, outs = i.inputs, i.outputs
    attn, wo, x = (m.get(n) for n in ins)
    m.put(outs[0], x + _linear(attn, wo))


def _gate_up_silu(m: _Machine, i: Instr) -> None:
    ins, outs = i.inputs, i.outputs
    x, wn, wg, wu = (m.get(n) for n in ins)
    h = _rms(x, wn, i.attr("eps"))
    m.put(outs[0], _silu(_linear(h, wg)) * _linear(h, wu))


def _down_partial(m: _Machine, i: Instr) -> None:
    ins, outs = i.inputs, i.outputs
    act, wd = (m.get(n) for n in ins)
    inter, ks = act.shape[1], m.env["KS"]
    if inter % ks:
        raise IRError(f"DOWN_PARTIAL: KS={ks} does not divide the intermediate size {inter}")
    ci = inter // ks
    chunks = [
        _linear(act[:, k * ci : (k + 1) * ci], wd[:, k * ci : (k + 1) * ci]) for k in range(ks)
    ]
    m.put(outs[0], np.stack(chunks))  # [KS, B, H]


def _down_residual(m: _Machine, i: Instr) -> None:
    ins, outs = i.inputs, i.outputs
    down, x = (m.get(n) for n in ins)
    acc = x.copy()
    for k in range(down.shape[0]):  # x + down[0] + ... + down[KS-1], in order
        acc = acc + down[k]
    m.put(outs[0], acc)


def _lmhead_argmax(m: _Machine, i: Instr) -> None:
    ins, outs = i.inputs, i.outputs
    x, wn, head = (m.get(n) for n in ins)
    logits = _linear(_rms(x, wn, i.attr("eps")), head)  # [B, V]
    b, v = logits.shape
    nt = m.env["NT"]
    cv = _ceil_div(v, nt)
    val, idx = np.full((b, nt), -np.inf), np.full((b, nt), -1, dtype=np.int64)
    for t in range(nt):
        r0, r1 = min(t * cv, v), min((t + 1) * cv, v)
        if r0 < r1:  # an empty tile keeps (-inf, -1) and never wins the reduction
            idx[:, t] = r0 + np.argmax(logits[:, r0:r1], axis=1)  # first index on ties
            val[:, t] = logits[np.arange(b), idx[:, t]]
    m.put(outs[0], logits)
    m.put(outs[1], val)
    m.put(outs[2], idx)


def _argmax_reduce(m: _Machine, i: Instr) -> None:
    ins, outs = i.inputs, i.outputs
    val, idx = (m.get(n) for n in ins)
    t = np.argmax(val, axis=1)  # the first tile holding the maximum
    m.put(outs[0], idx[np.arange(val.shape[0]), t])


KERNELS: dict[Kind, Callable[[_Machine, Instr], None]] = {
    Kind.EMBED: _embed,
    Kind.QKV_ROPE_APPEND: _qkv_rope_append,
    Kind.ATTN_PARTIAL: _attn_partial,
    Kind.ATTN_MERGE: _attn_merge,
    Kind.OPROJ_RESIDUAL: _oproj_residual,
    Kind.GATE_UP_SILU: _gate_up_silu,
    Kind.DOWN_PARTIAL: _down_partial,
    Kind.DOWN_RESIDUAL: _down_residual,
    Kind.LMHEAD_ARGMAX: _lmhead_argmax,
    Kind.ARGMAX_REDUCE: _argmax_reduce,
}


def _bind(fg: FusedGraph, inputs: Mapping[str, Any], binding: Mapping[str, int]) -> dict[str, int]:
    env: dict[str, int] = {}
    for key in SPLITS:
        if key not in binding:
            raise IRError(f"binding has no {key} (it needs P, KS and NT; B and S are optional)")
    token = inputs.get("token")
    caches = [b.name for b in fg.buffers if b.name.startswith("k_cache.")]
    found = {
        "B": None if token is None else int(_array(token, integer=True).shape[0]),
        "S": int(np.shape(inputs[caches[0]])[2]) if caches and caches[0] in inputs else None,
    }
    for key in ("B", "S"):
        want, got = binding.get(key), found[key]
        if want is not None and got is not None and want != got:
            raise IRError(f"binding says {key}={want} but the inputs have {key}={got}")
        value = want if want is not None else got
        if value is None:
            raise IRError(f"cannot tell {key}: bind it or pass the inputs that carry it")
        env[key] = int(value)
    env.update({key: int(binding[key]) for key in SPLITS})
    for key, value in env.items():
        if value < 1:
            raise IRError(f"binding {key}={value} must be positive")
    return env


def run_fused(
    fg: FusedGraph,
    inputs: Mapping[str, Any],
    weights: Mapping[str, Any],
    binding: Mapping[str, int],
) -> dict[str, Array]:
    """Run the instructions of `fg` in program order over whole buffers, in float64.

    Args:
        fg: the fused program.
        inputs: `token` [B] and `pos` (a scalar), `k_cache.{l}`/`v_cache.{l}` [B, KV, S, D]
            (arrays or torch tensors). Any other buffer named here is loaded before the first
            instruction, which lets a test drive a single instruction; buffers not given start
            at zero.
        weights: HF-named weights (arrays or torch tensors).
        binding: the split sizes P, KS, NT, and optionally B and S (else read from the inputs).

    Returns:
        Every buffer's final value by name, plus `next_token` (the `token` buffer after the
        program, which ARGMAX_REDUCE wrote). Inputs are not modified.
    """
    env = _bind(fg, inputs, binding)
    if "pos" not in inputs:
        raise IRError("missing input 'pos'")
    pos = int(_array(inputs["pos"], integer=True).reshape(()))
    if not 0 <= pos < env["S"]:
        raise IRError(f"pos {pos} is outside the cache capacity S={env['S']}")
    bufs: dict[str, Array] = {}
    for b in fg.buffers:
        shape = concrete(b.shape, env)
        integer = b.dtype.is_int
        if b.value is not None:
            bufs[b.name] = np.asarray(b.value, dtype=np.float64).reshape(shape)
        elif b.name in inputs:
            bufs[b.name] = _array(inputs[b.name], integer).copy()
            if bufs[b.name].shape != shape:
                raise IRError(
                    f"input {b.name}: shape {list(bufs[b.name].shape)}, expected {list(shape)}"
                )
        else:
            bufs[b.name] = np.zeros(shape, dtype=np.int64 if integer else np.float64)
    m = _Machine(fg, bufs, weights, pos, env)
    for instr in fg.instrs:
        KERNELS[instr.kind](m, instr)
    out = dict(bufs)
    out["next_token"] = bufs["token"]
    return out
