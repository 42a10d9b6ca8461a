"""Class (f) from the artifact: what kernel.cu's task bodies compute, proved equal to the fused
instructions (issue 16, item 1).

For each task kind and tile shape in kernel.cu's TASKS table, the device function the
megakernel's switch runs for that opcode is executed symbolically for one consumer thread
(`verifier.device.execute`): the task params symbolic over the table's values (a range tile
(a, b) as a = "ta", b = ta + n for its width n), `pos` symbolic, its thread-strided loop
summarized as one iteration with a symbolic index i in [0, N). The obligations, each an ordinary
SMT query over that symbolic element, every batch row and position:

* value: each store of the loop holds, over the reals, the fused instruction's element at the
  store's index (`Fused(instr, g).output`, through `verifier.algebra.equal_obligations`, whose
  uninterpreted-function decomposition and replay they share; a pair that already differs in
  float64 gets the pinned query at a point where it differs, as algebra does);
* disjoint: two different iterations never store the same element, nor does one store an
  element another loads (so "every i in [0, N) stores its values" is the loop's effect, whatever
  the threads' interleaving), nor do two stores of one iteration overlap;
* coverage (`verifier.device.coverage`): the stores lie in the region the model says the task
  writes (`verifier.model.touches`), every iteration stores, and their count is the region's
  volume: with disjointness, each element of the region is stored exactly once;
* no trap: a `__trap()` is unreachable for valid inputs (every token in [0, V));
* float safety (ATTN_MERGE): every exponent the kernel takes is <= 0 (a rescale never
  overflows). Over the reals the merge's value does not depend on the maximum it subtracts, so
  this is the query that holds the maximum to be one.

Terms are layer-free (arrays by role), so one proof covers every layer and the proof cache shares
them. Anything the executor does not model fails as an obligation naming the device function and
the kernel.cu line, never a skip. Loop kinds so far: DOWN_RESIDUAL, EMBED, ATTN_MERGE; matvec
kinds DOWN_PARTIAL, OPROJ_RESIDUAL and GATE_UP_SILU (RMS-normed input, SiLU as x * sigmoid(x)),
whose `matvec<K>` call is summarized (`verifier.device.matvec`: y[v][b] = sum_k xin[b][k]
row(v)[k], the row map run from the kind's producer function, the epilogue executed on it; the
epilogue's reads of y are proved inside the outputs computed), the summary itself proved from
amk.cuh's code for the fma consumer (`verifier.device.fma`: stage's split layout, the ring's slot
sequence, the lanes' columns, group_sum's butterfly, the chunks; rms_rstd's rstd). A kind whose
consumer is not modelled (MMA: matvec_mma) is not attempted. Tiles are grouped by width and by
the buffers the model says they write (QKV's q tiles apart from its k and v tiles), a tile's a as
stride * ta when every task's a is a multiple of the stride.

Not yet attempted: QKV_ROPE_APPEND (its body stops at `kr = pr - (is_k ? QD : QD + KVD)`, two
Affs under a condition the executor does not merge; before that, the q value obligations timed
out), LMHEAD_ARGMAX (the warps' argmax after the logits), ATTN_PARTIAL, ARGMAX_REDUCE. Two of
their helpers are proved against contracts, once a kernel: argmax_pick (`verifier.device.argmax`)
and attn_merge_warps (`verifier.device.merge_warps`).
"""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction
from typing import Any

from compiler.ir.fused import FusedGraph, Instr, Kind
from verifier.algebra import agree, differ, equal_obligations, pinned, walk
from verifier.device import argmax, fma, matvec, merge_warps
from verifier.device.binding import Binding
from verifier.device.coverage import coverage
from verifier.device.execute import Executor, Load, Store, Strided
from verifier.device.facts import int_decls, int_ranges
from verifier.device.kernel import Kernel
from verifier.device.nodes import Function, ParseError, Unit
from verifier.device.ring import Ring, producer
from verifier.device.tiles import Tile, tiles
from verifier.device.values import FALSE, TRUE, Params, Ptr, Real, Struct, Unsupported, rename
from verifier.fused_terms import Fused, index_vars
from verifier.graph_terms import unflatten
from verifier.model import Geometry
from verifier.obligation import Obligation
from verifier.terms import Aff, Term, smt, smt_aff, smt_cond

# how each kind's task params (schedule.py) are made symbolic: "range": (a, b) a tile
# [a, a + n) of width n; "index": a alone
LOOP_KINDS: dict[Kind, str] = {
    Kind.DOWN_RESIDUAL: "range",
    Kind.EMBED: "range",
    Kind.ATTN_MERGE: "index",
    Kind.DOWN_PARTIAL: "range",  # matvec kinds: `verifier.device.matvec`
    Kind.OPROJ_RESIDUAL: "range",
    Kind.GATE_UP_SILU: "range",
}
MATVEC_KINDS = {
    Kind.DOWN_PARTIAL,
    Kind.OPROJ_RESIDUAL,
    Kind.GATE_UP_SILU,
}  # through `matvec<K>`: fma only
SAFE_EXP = {Kind.ATTN_MERGE}  # kinds whose every exp is a rescale: its exponent must be <= 0


def obligations(unit: Unit, fused: FusedGraph, g: Geometry) -> list[Obligation]:
    """The (f) obligations of kernel.cu's loop-kind task bodies (see the module docstring)."""
    k = Kernel(unit)
    out: list[Obligation] = []
    try:
        tasks, dispatch = k.tasks(), k.dispatch()
        ops = k.enum_members.get("Op", k.enums)
    except (Unsupported, ParseError) as e:
        return [_finding("amk_megakernel", getattr(e, "line", 0), str(e))]
    for kind, how in LOOP_KINDS.items():
        instr = next((i for i in fused.instrs if i.kind is kind), None)
        op = ops.get(f"OP_{kind.name}")
        if instr is None or op is None or (kind in MATVEC_KINDS and matvec.mma(k)):
            continue  # not in this kernel, or its consumer not modelled (mma): not attempted
        name = dispatch.get(op)
        if name is None:
            out.append(_finding("amk_megakernel", 0, f"the switch runs nothing for OP_{kind.name}"))
            continue
        for tile in tiles(how, [t for t in tasks if t["op"] == op], instr, g):
            out += _task(k, fused, g, instr, name, tile)
    out += argmax.obligations(k) + merge_warps.obligations(k)
    return list({ob.key: ob for ob in out}.values())


def _task(
    k: Kernel,
    fused: FusedGraph,
    g: Geometry,
    instr: Instr,
    name: str,
    tile: Tile,
) -> list[Obligation]:
    shape, ranges, params, tasks = tile
    ranges = {**ranges, "pos": (0, g.S)}
    bind = Binding(k, fused, g, max(instr.layer, 0), ranges)
    ex = Executor(k, bind.pointer, bind.element, ranges)
    where = f"{name}, {shape}"
    summaries = matvec.install(
        ex, lambda ring: _producer(k, bind, ranges, name, params, ring), g.B, bind, where
    )
    try:
        f = k.function(name, 6)
        ex.run(name, _args(k, f, params))
    except (Unsupported, ParseError) as e:  # with the failures the matvec proofs found first
        found = [ob for m in summaries for ob in m.obligations if fma.failed(ob)]
        return [*found, _finding(where, getattr(e, "line", 0), str(e))]
    out: list[Obligation] = []
    stores = [s for s in ex.stores if s.guard != FALSE]
    if not stores:
        out.append(_finding(where, f.line, f"{name} stores nothing"))
    for s in stores:
        out += _value(s, ex, bind, fused, g, instr, where, ranges)
        if instr.kind in SAFE_EXP and isinstance(s.value, Real):
            out += _rescales(s, where, ranges, g)
    for loop in ex.strided:
        out.append(_disjoint(loop, ex.stores, ex.loads, where, ranges, g))
    symbols = {f: p.terms[0] for f, p in params.items() if len(p.terms) == 1 and not p.const}
    symbols = {f: (x, c) for f, (x, c) in symbols.items() if x == f"t{f}"}
    out += coverage(ex.stores, ex.strided, instr, tasks, symbols, bind, g, where, ranges)
    for m in summaries:
        out += m.obligations
        out += [_read_bounds(ld, m, where, ranges, g) for ld in ex.loads if ld.array == matvec.PART]
    for trap in ex.traps:
        if trap.guard != FALSE:
            out.append(_no_trap(trap.guard, trap.line, where, ranges, g))
    if any(not s.loop for s in stores):
        line = next(s.line for s in stores if not s.loop)
        out.append(
            _finding(where, line, "a store outside a strided loop (one thread's, or all's?)")
        )
    return out


def _args(k: Kernel, f: Function, params: dict[str, Aff]) -> list[Any]:
    """Symbolic arguments of a task body's or a producer's parameters."""
    args: list[Any] = []
    for p in f.params:
        t = k.base_type(p.type.text)
        if t == "Params":
            args.append(Params())
        elif t == "Task":
            fields = tuple(
                (fld, params.get(fld, Aff.of("layer") if fld == "layer" else Aff.of(f"t_{fld}")))
                for fld, _ in k.struct_fields("Task")
            )
            args.append(Struct("Task", fields))
        elif t == "int":
            args.append(Aff.of(p.name))
        elif t == "Smem":
            args.append(Struct("Smem", (("f", Ptr(matvec.PART, "float", Aff(0), "float")),)))
        else:
            args.append(Struct(t, ()))
    return args


def _producer(
    k: Kernel,
    bind: Binding,
    ranges: dict[str, tuple[int, int]],
    name: str,
    params: dict[str, Aff],
    ring: Ring,
) -> Executor:
    """The kind's producer function load_<name>, run: its slots go to `ring`."""
    ex = Executor(k, bind.pointer, bind.element, ranges)  # the task's: its row map runs later
    producer(ex, ring)
    f = k.function(f"load_{name}", 4)
    ex.run(f.name, _args(k, f, params))
    return ex


def _value(
    s: Store,
    ex: Executor,
    bind: Binding,
    fused: FusedGraph,
    g: Geometry,
    instr: Instr,
    where: str,
    ranges: dict[str, tuple[int, int]],
) -> list[Obligation]:
    buffer = bind.names.get(s.array, s.array)
    subject = f"{where}, the store at kernel.cu line {s.line}"
    if buffer not in instr.outputs:
        return [
            _finding(
                where,
                s.line,
                f"{s.function} stores into {buffer}, not an output of {instr.kind.name}",
            )
        ]
    shape = tuple(n for _, n in index_vars(buffer, g))
    idx = unflatten(s.offset, shape, ranges)
    r = dict(ranges)
    tables: dict[str, list[Fraction]] = {}
    spec = Fused(instr, g, r, tables, _inv_freq(fused)).output(buffer, idx)
    assert isinstance(s.value, Real)
    check = f"{s.function} computes {instr.kind.name} {buffer}"
    extra = int_ranges((spec, s.value.term, s.guard), g)
    if s.guard != TRUE:
        extra += f"(assert {smt_cond(s.guard, {})})\n"
    if agree(spec, s.value.term, r, tables):
        obs = equal_obligations(spec, s.value.term, r, tables, check, subject, -1)
    else:
        env = differ(spec, s.value.term, r, tables) or {}
        obs = [pinned(spec, s.value.term, r, tables, env, check, subject, -1)]
    return [replace(ob, assumptions=ob.assumptions + extra) for ob in obs]


def _disjoint(
    loop: Strided,
    stores: list[Store],
    loads: list[Load],
    where: str,
    ranges: dict[str, tuple[int, int]],
    g: Geometry,
) -> Obligation:
    i, j = loop.symbol, f"{loop.symbol}_other"
    mine = [s for s in stores if s.loop == i and s.guard != FALSE]
    written = {s.array for s in mine}
    reads = [ld for ld in loads if ld.loop == i and ld.array in written]
    other = {i: j}
    bad: list[str] = []
    for a, s in enumerate(mine):
        for t in mine[a:]:
            if t.array != s.array:
                continue
            same = f"(= {smt_aff(s.offset, {})} {smt_aff(rename(t.offset, other), {})})"
            guards = f"{smt_cond(s.guard, {})} {smt_cond(rename(t.guard, other), {})}"
            apart = f"(not (= {i} {j}))" if t is s else "true"
            bad.append(f"(and {apart} {guards} {same})")
    for s in mine:
        for ld in reads:
            if ld.array != s.array:
                continue
            same = f"(= {smt_aff(s.offset, {})} {smt_aff(rename(ld.offset, other), {})})"
            guards = f"{smt_cond(s.guard, {})} {smt_cond(rename(ld.guard, other), {})}"
            bad.append(f"(and (not (= {i} {j})) {guards} {same})")
    r = {**ranges, j: ranges[i]}
    things = [(s.offset, s.guard, rename((s.offset, s.guard), other)) for s in mine]
    things += [rename((ld.offset, ld.guard), other) for ld in reads]
    facts = int_decls(things, r) + int_ranges(things, g)
    return Obligation(
        "f",
        f"{loop.function}: the iterations of its strided loop store disjoint elements",
        -1,
        f"{where}, the loop at kernel.cu line {loop.line} over [0, {loop.count})",
        facts,
        f"(assert (or false {' '.join(bad)}))\n",
        data={"mode": "device", "why": f"two iterations of the loop at line {loop.line} overlap"},
    )


def _read_bounds(
    ld: Load, m: matvec.Matvec, where: str, ranges: dict[str, tuple[int, int]], g: Geometry
) -> Obligation:
    off = ld.offset - m.xs
    inside = (
        f"(and (<= 0 {smt_aff(off, {})}) (< {smt_aff(off, {})} {smt_aff(m.nrows.scale(g.B), {})}))"
    )
    return Obligation(
        "f",
        f"{m.function}: the epilogue reads only the outputs matvec computed",
        -1,
        f"{where}, the read at kernel.cu line {ld.line}",
        int_decls((off, ld.guard, m.nrows), ranges) + f"(assert {smt_cond(ld.guard, {})})\n",
        f"(assert (not {inside}))\n",
        data={"mode": "device", "why": f"the read at line {ld.line} misses the outputs"},
    )


def _rescales(
    s: Store, where: str, ranges: dict[str, tuple[int, int]], g: Geometry
) -> list[Obligation]:
    args = [x[2] for x in walk(s.value.term) if isinstance(x, tuple) and x[:2] == ("f", "exp")]
    if not args:
        return []
    reals = {x[1]: len(x[2]) for x in walk(tuple(args)) if isinstance(x, tuple) and x[:1] == ("v",)}
    facts = int_decls((s.offset, s.guard, *args), ranges) + int_ranges(tuple(args), g)
    facts += "".join(
        f"(declare-fun {a} ({' '.join(['Int'] * k)}) Real)\n" for a, k in sorted(reals.items())
    )
    if s.guard != TRUE:
        facts += f"(assert {smt_cond(s.guard, {})})\n"
    bad = " ".join(f"(> {smt(a)} 0.0)" for a in dict.fromkeys(args))
    return [
        Obligation(
            "f",
            f"{s.function}: every rescale exponent is <= 0 (exp never overflows)",
            -1,
            f"{where}, the store at kernel.cu line {s.line}",
            facts,
            f"(assert (or {bad}))\n",
            data={"mode": "device", "why": f"an exponent of the store at line {s.line} may be > 0"},
        )
    ]


def _no_trap(
    guard: Term, line: int, where: str, ranges: dict[str, tuple[int, int]], g: Geometry
) -> Obligation:
    return Obligation(
        "f",
        f"{where.split(',')[0]}: __trap() is unreachable for valid inputs",
        -1,
        f"{where}, the trap at kernel.cu line {line}",
        int_decls([guard], ranges) + int_ranges([guard], g),
        f"(assert {smt_cond(guard, {})})\n",
        data={"mode": "device", "why": f"the trap at line {line} is reachable"},
    )


def _finding(where: str, line: int, why: str) -> Obligation:
    """A failure found while executing (not a query): it fails whatever the solver says."""
    at = f", kernel.cu line {line}" if line else ""
    return Obligation(
        "f",
        f"{where.split(',')[0]}: its task body is in the subset the verifier executes",
        -1,
        f"{where}{at}: {why}",
        "",
        "(assert true)\n",
        data={"mode": "device", "why": why},
    )


def _inv_freq(fused: FusedGraph) -> tuple[float, ...]:
    try:
        return tuple(fused.buffer("rope_inv_freq").value or ())
    except KeyError:
        return ()
