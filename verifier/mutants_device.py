"""Planted bugs in kernel.cu's device functions, and edits of them that change nothing.

Issue 16, item 3: each `DeviceMutant` edits one device function of kernel.cu (the instruction
bodies, and the helpers of amk.cuh pasted into it) the way a bug in the code generator would,
and names `bug`, the issue's class of bug, and `cls`, the obligation class that must reject it,
as the verifier numbers them:

* (f) the device-code semantics (`verifier.device.symexec`): a task body's stores hold the
  fused instruction's elements, each element of the task's region stored once;
* (c) the counter protocol on the code (`verifier.device.sync`): acquire waits, a consumer
  barrier, then one release signal;
* (h) the KV-cache append's address, read from the store's text (`verifier.kv_invariant`);
* (d) the split-KV key ranges, attn_partial's j0 and j1 read from the code
  (`verifier.reductions.split_kv`): the partitions read exactly the visible keys.

`EQUIVALENT` are edits a compiler could make without changing what the kernel computes (a local
renamed, independent statements reordered, a small loop unrolled by hand, comments), each with
the class whose obligations must still prove it. Both are meant for the buggy-compiler mode of
`verifier.compiled_mutants` (the cubin rebuilt and the hashes updated), where only the judgement
of the code can reject them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from verifier.mutate import Mutant, Sched

Edit = Callable[[Sched], str | None]


@dataclass(frozen=True)
class DeviceMutant(Mutant):
    fn: str = ""  # the device function edited: a rejection should name it and a line in it
    bug: str = ""  # the class of bug ("" for an equivalent edit)


def span(text: str, fn: str) -> tuple[int, int]:
    """[start, end) of device function `fn`'s definition in kernel.cu (ValueError if none)."""
    m = re.search(rf"^[^\n]*__device__[^\n]*\b{fn}\(", text, re.M)
    if m is None:
        raise ValueError(f"no device function {fn} in kernel.cu")
    return m.start(), text.index("\n}\n", m.start()) + 3


def lines(text: str, fn: str) -> range:
    """The kernel.cu lines (1-based) of device function `fn`."""
    a, b = span(text, fn)
    first = text.count("\n", 0, a) + 1
    return range(first, first + text.count("\n", a, b))


def rewrite(fn: str, how: Callable[[str, str], str | None], what: str) -> Edit:
    """An edit of kernel.cu: device function `fn`'s text rewritten by `how(body, kernel)`
    (None, or the body unchanged: no place for it)."""

    def edit(s: Sched) -> str | None:
        try:
            a, b = span(s["text"], fn)
        except ValueError:
            return None
        body = how(s["text"][a:b], s["text"])
        if body is None or body == s["text"][a:b]:
            return None
        s["text"] = s["text"][:a] + body + s["text"][b:]
        return f"kernel.cu {fn}: {what}"

    return edit


def replace(fn: str, old: str, new: str, what: str, regex: bool = False) -> Edit:
    """The first `old` in `fn` replaced by `new` (with `regex`: every match of the pattern)."""

    def how(body: str, _: str) -> str:
        return re.sub(old, new, body) if regex else body.replace(old, new, 1)

    return rewrite(fn, how, what)


def _mutant(bug: str, cls: str, fn: str, old: str, new: str, what: str) -> DeviceMutant:
    return DeviceMutant(f"{fn}: {what}", cls, replace(fn, old, new, what), "kernel.cu", fn, bug)


SHORT, ASSIGN, NORM, ROPE = (
    "loop bound one vector short",
    "+= turned into =",
    "RMSNorm divisor",
    "RoPE sign",
)
SILU, SCALE, MASK, KV = (
    "SiLU as sigmoid",
    "softmax scale dropped",
    "attention mask off by one",
    "KV append off by one",
)
TIES, RELAXED, BARRIER = (
    "argmax tie-breaking",
    "counter release relaxed",
    "barrier before a signal missing",
)

MUTANTS: tuple[DeviceMutant, ...] = (
    _mutant(SHORT, "f", "embed", "i < B * n8;", "i < B * n8 - 1;", "the last 8 columns not copied"),
    _mutant(
        SHORT, "f", "down_residual", "k < KS; ++k", "k < KS - 1; ++k", "the last chunk dropped"
    ),
    _mutant(
        SHORT, "f", "oproj_residual", "i < (r1 - r0) * B;", "i < (r1 - r0 - 1) * B;", "a row short"
    ),
    _mutant(SHORT, "f", "matvec_fma", "k < width;", "k < width - 8;", "a dot product 8 short"),
    _mutant(SHORT, "f", "rms_rstd", "k < K;", "k < K - 4;", "the square sum 4 short"),
    _mutant(SHORT, "f", "attn_merge_warps", "el < D;", "el < D - 8;", "8 outputs not stored"),
    _mutant(ASSIGN, "f", "down_residual", "s += ld_act", "s = ld_act", "chunks overwritten"),
    _mutant(ASSIGN, "f", "attn_merge", "num += a", "num = a", "partitions overwritten"),
    _mutant(ASSIGN, "f", "group_sum", "v += __shfl", "v = __shfl", "the butterfly overwrites"),
    _mutant(ASSIGN, "f", "block_sum", "s += scratch[w]", "s = scratch[w]", "warps overwritten"),
    _mutant(ASSIGN, "f", "attn_merge_warps", "od += a", "od = a", "warps' outputs overwritten"),
    _mutant(NORM, "f", "rms_rstd", "s / K + EPS", "s / (K - 1) + EPS", "mean over K - 1"),
    _mutant(NORM, "f", "rms_rstd", "s / K + EPS", "s + EPS", "the sum, not the mean"),
    _mutant(
        ROPE,
        "f",
        "qkv_rope_append",
        "el < D / 2 ? -y[(v + 1) * B + b] : y[(v - 1) * B + b]",
        "el < D / 2 ? y[(v + 1) * B + b] : -y[(v - 1) * B + b]",
        "rotate_half's sign flipped",
    ),
    _mutant(ROPE, "f", "qkv_rope_append", "out * cs + rot * sn", "out * cs - rot * sn", "- sin"),
    _mutant(
        SILU,
        "f",
        "gate_up_silu",
        "gate / (1.f + expf(-gate)) * up",
        "1.f / (1.f + expf(-gate)) * up",
        "sigmoid(gate) * up",
    ),
    _mutant(SCALE, "f", "attn_keys", ", 0.f)) * SM_SCALE;", ", 0.f));", "q.k unscaled"),
    _mutant(MASK, "d", "attn_partial", "pos + 1);", "pos);", "the current key masked"),
    _mutant(MASK, "d", "attn_partial", "pos + 1);", "pos + 2);", "a future key read"),
    _mutant(KV, "h", "qkv_rope_append", "* S + pos) * D", "* S + pos + 1) * D", "row pos + 1"),
    _mutant(KV, "h", "qkv_rope_append", "kr / D) * S", "kr / D + 1) * S", "head + 1"),
    _mutant(KV, "h", "qkv_rope_append", "S + pos) * D + el]", "S + pos) * D + el + 1]", "el + 1"),
    _mutant(TIES, "f", "argmax_pick", "b.idx < a.idx", "b.idx > a.idx", "the last index on ties"),
    _mutant(TIES, "f", "argmax_pick", "b.val > a.val ||", "b.val >= a.val ||", "b on every tie"),
    _mutant(RELAXED, "c", "signal_task", "memory_order_release", "memory_order_relaxed", "relaxed"),
    _mutant(
        RELAXED, "c", "wait_task", "memory_order_acquire", "memory_order_relaxed", "relaxed wait"
    ),
    _mutant(BARRIER, "c", "signal_task", "  cta_sync();\n", "", "no barrier before the release"),
    _mutant(
        BARRIER, "c", "wait_task", "  }\n  cta_sync();\n}", "  }\n}", "the acquire not published"
    ),
)


def _unroll_chunks(body: str, kernel: str) -> str | None:
    """down_residual's loop over the KS - 1 later split-K chunks written out, one statement each."""
    m = re.search(r"^constexpr int KS = (\d+);", kernel, re.M)
    loop = "for (int k = 1; k < KS; ++k) s += ld_act(p.down + (static_cast<size_t>(k) * B + b) * H + r);"
    if m is None or loop not in body:
        return None
    one = "s += ld_act(p.down + (static_cast<size_t>({k}) * B + b) * H + r);"
    flat = "\n    ".join(one.format(k=k) for k in range(1, int(m.group(1))))
    return body.replace(loop, flat or ";")


def _unroll_max(body: str, kernel: str) -> str | None:
    """attn_merge's maximum over the P partitions written out."""
    m = re.search(r"^constexpr int P = (\d+);", kernel, re.M)
    loop = "for (int k = 0; k < P; ++k) mx = fmaxf(mx, ld_act(p.attn_m + bh + k));"
    if m is None or loop not in body:
        return None
    one = "mx = fmaxf(mx, ld_act(p.attn_m + bh + {k}));"
    return body.replace(loop, "\n    ".join(one.format(k=k) for k in range(int(m.group(1)))))


def _same(cls: str, fn: str, what: str, make: Callable[[str], Edit]) -> DeviceMutant:
    return DeviceMutant(f"{fn}: {what}", cls, make(what), "kernel.cu", fn)


def _swap(fn: str, first: str, second: str, what: str) -> Edit:
    """Two neighbouring statements of `fn` swapped (`first` then `second`, adjacent)."""
    return replace(fn, first + second, second + first, what)


EQUIVALENT: tuple[DeviceMutant, ...] = (
    _same(
        "f",
        "attn_merge",
        "num renamed",
        lambda w: replace("attn_merge", r"\bnum\b", "acc", w, True),
    ),
    _same(
        "f",
        "down_residual",
        "s renamed",
        lambda w: replace("down_residual", r"\bs\b", "acc", w, True),
    ),
    _same(
        "c",
        "wait_task",
        "target renamed",
        lambda w: replace("wait_task", r"\btarget\b", "want", w, True),
    ),
    _same(
        "f",
        "qkv_rope_append",
        "out renamed",
        lambda w: replace("qkv_rope_append", r"\bout\b", "val", w, True),
    ),
    _same(
        "f",
        "embed",
        "its two stores swapped",
        lambda w: _swap(
            "embed",
            "    *reinterpret_cast<float4*>(dst) = make_float4(f[0], f[1], f[2], f[3]);\n",
            "    *reinterpret_cast<float4*>(dst + 4) = make_float4(f[4], f[5], f[6], f[7]);\n",
            w,
        ),
    ),
    _same(
        "f",
        "attn_merge",
        "num and den accumulated in the other order",
        lambda w: _swap(
            "attn_merge",
            "      num += a * ld_act(p.attn_o + static_cast<size_t>(bh + k) * D + el);\n",
            "      den += a * ld_act(p.attn_l + bh + k);\n",
            w,
        ),
    ),
    _same(
        "f",
        "gate_up_silu",
        "its two loads reordered",
        lambda w: replace(
            "gate_up_silu",
            "const float gate = y[v * B + b], up = y[(v + n) * B + b];",
            "const float up = y[(v + n) * B + b], gate = y[v * B + b];",
            w,
        ),
    ),
    _same(
        "f",
        "down_residual",
        "KS loop unrolled",
        lambda w: rewrite("down_residual", _unroll_chunks, w),
    ),
    _same(
        "f", "attn_merge", "max over P unrolled", lambda w: rewrite("attn_merge", _unroll_max, w)
    ),
    _same(
        "f",
        "attn_merge_warps",
        "od and ld accumulated in the other order",
        lambda w: _swap(
            "attn_merge_warps",
            "        od += a * ws[w * (D + 2) + el];\n",
            "        ld += a * ws[w * (D + 2) + D + 1];\n",
            w,
        ),
    ),
    _same(
        "f",
        "argmax_pick",
        "its comparisons mirrored",
        lambda w: replace(
            "argmax_pick",
            "b.val > a.val || (b.val == a.val && b.idx < a.idx)",
            "a.val < b.val || (a.val == b.val && a.idx > b.idx)",
            w,
        ),
    ),
    _same(
        "c",
        "signal_task",
        "a comment",
        lambda w: replace(
            "signal_task",
            "  cta_sync();\n",
            "  // every consumer's writes are done before thread 0 publishes them\n  cta_sync();\n",
            w,
        ),
    ),
    _same(
        "f",
        "down_partial",
        "a comment",
        lambda w: replace(
            "down_partial",
            "  const float* y",
            "  /* the partial sums of this chunk */\n  const float* y",
            w,
        ),
    ),
)
