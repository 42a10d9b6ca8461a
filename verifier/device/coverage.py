"""Class (f), coverage: a task body stores exactly the region the verifier's model says its task
writes (`verifier.model.touches`), every element of it once.

The value obligations (`verifier.device.symexec`) prove that each store holds the instruction's
element at the store's own index, and the disjointness ones that no two stores of a strided
loop hit one element: a body storing the right values at the wrong place still passes those.
Here, per task kind and tile shape (the group of TASKS entries that share one symbolic run), a
bijection between the loops' (iteration, store) pairs and the region each task writes:

* inside: every store of every iteration lies in the region of its task (for the task whose
  params the symbols take, one of the group's TASKS entries);
* every iteration stores: a store's path guard holds for valid inputs (its loop's count is then
  the number of elements it stores);
* count: per written buffer, the loops' iterations times their stores equal the region's volume,
  for every task of the group (a check on integers, a finding when it fails);

with the disjointness obligation's injectivity, the stores cover the region exactly. Regions are
the model's (buffer names mapped to the arrays' roles), never the compiler's bookkeeping.
"""

from __future__ import annotations

from compiler.ir.fused import Instr, Kind
from verifier.device.binding import Binding
from verifier.device.effects import Store, Strided
from verifier.device.facts import int_decls, int_ranges
from verifier.device.values import FALSE, TRUE, Unsupported
from verifier.fused_terms import role
from verifier.graph_terms import unflatten
from verifier.model import Geometry, ParamError, Region, touches, volume
from verifier.obligation import Obligation
from verifier.terms import Aff, smt_aff, smt_cond

# how many task params each kind's touches takes (the model's), default 2
PARAMS = {Kind.ATTN_MERGE: 1, Kind.LMHEAD_ARGMAX: 1, Kind.DOWN_PARTIAL: 3, Kind.ARGMAX_REDUCE: 0}


def coverage(
    stores: list[Store],
    strided: list[Strided],
    instr: Instr,
    tasks: list[dict[str, int]],
    symbols: dict[str, tuple[str, int]],
    bind: Binding,
    g: Geometry,
    where: str,
    ranges: dict[str, tuple[int, int]],
) -> list[Obligation]:
    """The coverage obligations of one symbolic run (see the module docstring). `symbols` maps a
    Task field ("a", "c") to the symbol standing for it in the run and its stride: a = 64 ta
    is ("ta", 64)."""
    fn = where.split(",")[0]
    live = [s for s in stores if s.guard != FALSE]
    try:
        regions = [_regions(instr, t, bind, g) for t in tasks]
        counts = _counts(live, strided, regions, fn, where)
    except (ParamError, Unsupported) as e:
        return [_fails(fn, where, str(e))]
    symbolic = tuple(Aff.of(x) for x in (*(x for x, _ in symbols.values()), "pos"))
    selects = [
        " ".join(f"(= {symbols[f][0]} {t[f] // symbols[f][1]})" for f in sorted(symbols) if f in t)
        for t in tasks
    ]
    chosen = f"(assert (or {' '.join(f'(and true {s})' for s in dict.fromkeys(selects))}))\n"
    out: list[Obligation] = []
    for s in live:
        shape = bind.shapes[s.array]
        idx = unflatten(s.offset, shape, ranges)
        outside = []
        for sel, rs in dict(zip(selects, regions, strict=True)).items():
            outside.append(f"(and true {sel} (not {_inside(idx, rs.get(s.array, []))}))")
        facts = int_decls((idx, s.guard, symbolic), ranges) + chosen
        if s.guard != TRUE:
            facts += f"(assert {smt_cond(s.guard, {})})\n"
        out.append(
            _ob(
                f"{fn}: its stores lie in the region its task writes",
                f"{where}, the store at kernel.cu line {s.line}",
                facts,
                f"(assert (or {' '.join(outside)}))\n",
                f"the store at line {s.line} may fall outside its task's region of {s.array}",
            )
        )
        if s.guard != TRUE:
            out.append(
                _ob(
                    f"{fn}: every iteration of its strided loop stores",
                    f"{where}, the store at kernel.cu line {s.line}",
                    int_decls((idx, s.guard), ranges) + int_ranges((idx, s.guard), g),
                    f"(assert (not {smt_cond(s.guard, {})}))\n",
                    f"the store at line {s.line} is skipped by some iteration",
                )
            )
    return out + counts


def _regions(
    instr: Instr, task: dict[str, int], bind: Binding, g: Geometry
) -> dict[str, list[Region]]:
    """The regions one task writes, by the executor's array names (roles)."""
    n = PARAMS.get(instr.kind, 2)
    params = tuple(task[f] for f in ("a", "b", "c")[:n])
    layer = task.get("layer", -1)
    out: dict[str, list[Region]] = {}
    full = g.buffers()
    for r in touches(instr.kind, layer, params, g).writes:
        array = role(r.buffer, layer)
        if bind.shapes.get(array) != full[r.buffer]:
            raise Unsupported(f"the model's {r.buffer} is not laid out as kernel.cu's {array}")
        out.setdefault(array, []).append(r)
    return out


def _inside(idx: tuple[Aff, ...], regions: list[Region]) -> str:
    boxes = []
    for r in regions:
        conds = []
        for i, (lo, hi) in zip(idx, r.spans, strict=True):
            bound = [smt_aff(Aff(b.const) + Aff.of("pos").scale(b.at_pos), {}) for b in (lo, hi)]
            conds.append(f"(<= {bound[0]} {smt_aff(i, {})}) (< {smt_aff(i, {})} {bound[1]})")
        boxes.append(f"(and true {' '.join(conds)})")
    return f"(or false {' '.join(boxes)})"


def _counts(
    stores: list[Store],
    strided: list[Strided],
    regions: list[dict[str, list[Region]]],
    fn: str,
    where: str,
) -> list[Obligation]:
    count = {lp.symbol: lp.count for lp in strided}
    stored: dict[str, int] = {}
    loops: dict[str, set[str]] = {}
    for s in stores:
        stored[s.array] = stored.get(s.array, 0) + count.get(s.loop, 1)
        loops.setdefault(s.array, set()).add(s.loop)
    out = []
    for array, ls in sorted(loops.items()):
        if len(ls) > 1:
            out.append(_fails(fn, where, f"{array} is stored by {len(ls)} loops"))
    lines = {lp.symbol: lp.line for lp in strided}
    for rs in regions:
        for array in sorted(set(rs) | set(stored)):
            want = sum(_volume(r) for r in rs.get(array, []))
            if stored.get(array, 0) != want:
                at = sorted({lines.get(x, 0) for x in loops.get(array, ())} - {0})
                line = f", the loop at kernel.cu line {at[0]}" if at else ""
                why = f"stores {stored.get(array, 0)} elements of {array}, its task writes {want}"
                out.append(_fails(fn, f"{where}{line}", why))
    return list({ob.subject: ob for ob in out}.values())


def _volume(r: Region) -> int:
    """Elements of a region (a span [at_pos * pos + c0, at_pos * pos + c1) has c1 - c0)."""
    if any(lo.at_pos != hi.at_pos for lo, hi in r.spans):
        raise Unsupported(f"a region of {r.buffer} whose extent depends on pos")
    return volume(tuple((lo.const, hi.const) for lo, hi in r.spans))


def _ob(check: str, subject: str, facts: str, goal: str, why: str) -> Obligation:
    return Obligation("f", check, -1, subject, facts, goal, data={"mode": "device", "why": why})


def _fails(fn: str, where: str, why: str) -> Obligation:
    """A count that does not match: fails whatever the solver says."""
    return _ob(
        f"{fn}: its stores cover the region its task writes",
        f"{where}: {why}",
        "",
        "(assert true)\n",
        why,
    )
