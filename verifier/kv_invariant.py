"""Class (h) obligations: the state one decode step hands to the next.

The KV-cache step invariant, with a symbolic decode position pos (0 <= pos < S): if before the
step rows [0, pos) of layer l's cache hold the keys (values) of tokens 0..pos-1, then after the
step's writes rows [0, pos] hold tokens 0..pos. Induction over the steps from pos = 0 makes it
hold at every step. Three obligations carry it:

* the append's address (`append_store`, once per kernel): the store in kernel.cu's
  `qkv_rope_append`, its index expression read from the text and its constants from kernel.cu's
  constexprs, puts element el of KV row kr of batch row b at cache[b, kr / D, pos, el] of the
  [B, KV, S, D] slab (the model's sizes), for every b, kr, el and pos; no lane writes another
  row, or outside the slab.
* the step invariant (`step_invariant`, per layer and per cache, k and v): with the regions
  every task of the step writes (`verifier.model.touches`, all kinds and layers together) and a
  symbolic element e of `k_cache.l`, a tag `before` for the token e holds before the step (e's
  row when that is < pos, anything otherwise): at most one task writes e; e's tag after the step
  (pos if written, else `before`) is its row when the row is <= pos; rows > pos, and elements
  outside the slab, are not written.
* the token (`token_handoff`): every batch row of `token` is written by exactly one task of the
  step (the argmax), and each of the next step's EMBED tasks reads every batch row of that same
  buffer, and nothing outside it.
"""

from __future__ import annotations

import re
from typing import Any

from compiler.ir.fused import Kind
from compiler.schedule.schedule import Schedule
from verifier.batch_invariance import Constants, ExprError, evaluate, names, parse, smt
from verifier.index_maps import _facts, _in_shape, _inside, _span_json
from verifier.model import Geometry, Region, Touch
from verifier.obligation import Obligation

APPEND_VARS = ("b", "kr", "el", "pos")  # the store's free variables (kernel.cu's names)


def _count(regions: list[Region]) -> str:
    return "(+ 0 " + " ".join(f"(ite {_inside(r)} 1 0)" for r in regions) + ")"


def append_index(kernel: str) -> tuple[str, int]:
    """The cache index expression of the store in kernel.cu's qkv_rope_append, and its line."""
    body = re.search(r"void qkv_rope_append\(.*?\n\}\n", kernel, re.S)
    store = body and re.search(r"\bcache\[(.*)\]\s*=[^=]", body.group(0))
    if not body or not store:
        raise ExprError("kernel.cu: no `cache[...] = ` store in qkv_rope_append")
    line = kernel.count("\n", 0, body.start() + store.start()) + 1
    return re.sub(r"static_cast<[\w ]+>\(", "(", store.group(1)), line


def append_store(kernel: str, g: Geometry) -> Obligation:
    """kernel.cu's append stores (b, kr, el) at cache[b, kr / D, pos, el] (ExprError: the store
    or its constants cannot be read)."""
    text, line = append_index(kernel)
    expr, c = parse(text), Constants(kernel, ())
    consts = {n: c.value(n, {}) for n in sorted(names(expr)) if n not in APPEND_VARS}
    divisors: list[str] = []
    addr = smt(expr, lambda n: n if n in APPEND_VARS else str(consts[n]), divisors)
    kd = c.value("D", {})
    facts = "\n".join(f"(declare-const {v} Int)" for v in APPEND_VARS) + (
        f"\n(assert (and (<= 0 b) (< b {g.B}) (<= 0 kr) (< kr {g.KV * g.D}) (<= 0 pos) "
        f"(< pos {g.S}) (= el (mod kr {kd}))))\n"
    )
    want = f"(+ (* (+ (* (+ (* b {g.KV}) (div kr {g.D})) {g.S}) pos) {g.D}) el)"
    ok = " ".join(f"(not (= {d} 0))" for d in divisors)
    return Obligation(
        "h",
        "the KV append writes row pos of the cache",
        -1,
        f"qkv_rope_append: cache[{text}] at kernel.cu line {line}",
        facts,
        f"(assert (not (and {ok} (= {addr} {want}))))\n",
        data={"mode": "append", "index": text, "consts": consts, "kd": kd, "shape": _slab(g)},
    )


def _slab(g: Geometry) -> list[int]:
    return [g.B, g.KV, g.S, g.D]


def step_invariant(
    buffer: str, layer: int, writes: list[tuple[int, Region]], g: Geometry
) -> Obligation:
    """Rows [0, pos) of `buffer` kept, row pos written once, nothing else (module docstring)."""
    shape = _slab(g)
    regions = [r for _, r in writes]
    facts = _facts(shape, g.S, regions) + (
        "(declare-const before Int)\n(assert (=> (and (<= 0 e2) (< e2 pos)) (= before e2)))\n"
    )
    n = _count(regions)
    after = f"(ite (> {n} 0) pos before)"
    held = f"(and (<= {n} 1) (=> (<= e2 pos) (= {after} e2)) (=> (> e2 pos) (= {n} 0)))"
    return Obligation(
        "h",
        "the step keeps cache rows [0, pos) and appends token pos at row pos",
        layer,
        f"{buffer.split('.')[0]}, all tasks of the step",
        facts,
        f"(assert (not (ite {_in_shape(shape)} {held} (= {n} 0))))\n",
        data={
            "mode": "kv_step",
            "buffer": buffer,
            "shape": shape,
            "regions": [[t, _span_json(r)] for t, r in writes],
        },
        tasks=tuple(sorted({t for t, _ in writes})),
    )


def token_handoff(sched: Schedule, touched: dict[int, Touch], g: Geometry) -> Obligation:
    """Every batch row of the token written once; every EMBED task reads all of them."""
    writes = [(t, r) for t, x in touched.items() for r in x.writes if r.buffer == "token"]
    embeds = [t.id for t in sched.tasks if t.kind is Kind.EMBED and t.id in touched]
    reads = {t: [r for r in touched[t].reads if r.buffer == "token"] for t in embeds}
    facts = _facts([g.B], g.S, [r for _, r in writes] + [r for rs in reads.values() for r in rs])
    each = " ".join(f"(or false {' '.join(_inside(r) for r in rs)})" for rs in reads.values())
    anyread = " ".join(_inside(r) for rs in reads.values() for r in rs)
    held = f"(and (= {_count([r for _, r in writes])} 1) {'true' if embeds else 'false'} {each})"
    goal = f"(ite {_in_shape([g.B])} {held} (not (or false {anyread})))"
    return Obligation(
        "h",
        "the token the step writes is the one the next step's EMBED reads",
        -1,
        f"token: {len(writes)} writers, {len(embeds)} EMBED tasks",
        facts,
        f"(assert (not {goal}))\n",
        data={
            "mode": "token",
            "B": g.B,
            "writes": [[t, _span_json(r)] for t, r in writes],
            "reads": [[t, [_span_json(r) for r in rs]] for t, rs in reads.items()],
        },
        tasks=tuple(sorted({t for t, _ in writes} | set(embeds))),
    )


def obligations(sched: Schedule, touched: dict[int, Touch], g: Geometry) -> list[Obligation]:
    """The step invariant of every layer's k and v cache, and the token handoff."""
    out = []
    for layer in range(g.layers):
        for cache in ("k_cache", "v_cache"):
            name = f"{cache}.{layer}"
            writes = [(t, r) for t, x in touched.items() for r in x.writes if r.buffer == name]
            out.append(step_invariant(name, layer, writes, g))
    return [*out, token_handoff(sched, touched, g)]


def _in(spans: list[list[int]], e: list[int], pos: int) -> bool:
    return all(a * pos + b <= x < c * pos + d for (a, b, c, d), x in zip(spans, e, strict=True))


def replay_append(data: dict[str, Any], values: dict[str, Any]) -> tuple[bool, str]:
    b, kr, pos = (int(values.get(v, 0)) for v in ("b", "kr", "pos"))
    B, KV, S, D = data["shape"]
    at = {"b": b, "kr": kr, "pos": pos, "el": kr % data["kd"]}
    try:
        addr = evaluate(parse(data["index"]), lambda n: at.get(n, data["consts"].get(n, 0)))
    except ZeroDivisionError:
        return True, f"cache[{data['index']}] divides by 0 at b = {b}, kr = {kr}, pos = {pos}"
    want = ((b * KV + kr // D) * S + pos) * D + at["el"]
    row = addr // D % S if 0 <= addr < B * KV * S * D else None
    where = f"row {row}" if row is not None else f"outside the [{B}, {KV}, {S}, {D}] slab"
    return addr != want, (
        f"b = {b}, kr = {kr}, pos = {pos}: cache[{data['index']}] = {addr}, {where}; "
        f"row pos is at {want}"
    )


def replay_kv_step(data: dict[str, Any], values: dict[str, Any]) -> tuple[bool, str]:
    e = [int(values.get(f"e{d}", 0)) for d in range(4)]
    pos, before = int(values.get("pos", 0)), int(values.get("before", -1))
    by = [t for t, spans in data["regions"] if _in(spans, e, pos)]
    where = f"{data['buffer']}{e} at pos = {pos}"
    if not all(0 <= x < n for x, n in zip(e, data["shape"], strict=True)):
        return bool(by), f"{where} is outside the slab, written by tasks {by}"
    if len(by) > 1:
        return True, f"{where} is written by {len(by)} tasks: {by}"
    if e[2] > pos:
        return bool(by), f"{where}: row {e[2]} > pos is written by tasks {by}"
    after = pos if by else before
    return after != e[2], (
        f"{where}: holds token {after} after the step (written by {by or 'no task'}), "
        f"should hold token {e[2]}"
    )


def replay_token(data: dict[str, Any], values: dict[str, Any]) -> tuple[bool, str]:
    e = [int(values.get("e0", 0))]
    by = [t for t, spans in data["writes"] if _in(spans, e, 0)]
    missing = [t for t, rs in data["reads"] if not any(_in(s, e, 0) for s in rs)]
    if not 0 <= e[0] < data["B"]:
        readers = [t for t, rs in data["reads"] if any(_in(s, e, 0) for s in rs)]
        return bool(readers), f"EMBED tasks {readers} read token[{e[0]}], outside the batch"
    if len(by) != 1:
        return True, f"token[{e[0]}] is written by {len(by)} tasks: {by}"
    if missing or not data["reads"]:
        return True, f"token[{e[0]}] is not read by EMBED tasks {missing or '(none exist)'}"
    return False, f"token[{e[0]}]: one writer, read by every EMBED task"


REPLAYS = {"append": replay_append, "kv_step": replay_kv_step, "token": replay_token}
