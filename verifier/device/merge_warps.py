"""attn_merge_warps, the last step of ATTN_PARTIAL, proved against its contract from the code
(class f). With NWARPS per-warp online-softmax states (m_w, l_w, o_w) of one query head, o_w's
elements 8 per lane (lane e / 8 holds o_w[e] at e % 8) and m, l on every lane, the stores are

    o_out[e] = sum_w exp(m_w - M) o_w[e]  for every e in [0, D), each once
    *m_out = M = max_w m_w (warps in order),  *l_out = sum_w exp(m_w - M) l_w

over the reals with exp uninterpreted, for states that hold keys (every m_w a real: the
empty state's -inf, and the `mx != -INFINITY` branch for it, are not read here). How:
the first phase (each thread's state into the shared `ws`) runs for every consumer thread
(warp and lane concrete), noting which thread stored each element of ws; the second phase,
the thread-strided loop over e, runs once for a symbolic e with each read of ws resolved to
the one thread's store at that offset.
"""

from __future__ import annotations

from typing import Any

from verifier.algebra import substitute
from verifier.device import lanes
from verifier.device.execute import Executor
from verifier.device.kernel import Kernel
from verifier.device.lvalues import Var
from verifier.device.values import FALSE, TRUE, Ptr, Real, Unsupported
from verifier.obligation import Obligation
from verifier.terms import Aff, Term, add, app, ite, mul, neg, smt

FN = "attn_merge_warps"
CHECK = f"{FN}: the warps' softmax states merged, each element stored once"
OUTS = ("o_out", "m_out", "l_out")


def obligations(k: Kernel) -> list[Obligation]:
    """The contract's obligation, where kernel.cu has an attn_merge_warps."""
    if FN not in k.functions:
        return []
    f = k.function(FN, 7)
    line = f.body.line if f.body is not None else f.line
    try:
        nwarps, threads, D = (_int(k, n) for n in ("NWARPS", "THREADS", "D"))
        table: dict[int, Term] = {}
        for t in range(threads):
            for s in _run(k, f, t, None).stores:
                if s.array == "ws" and s.guard != FALSE:
                    if s.guard != TRUE or not s.offset.is_const():
                        raise Unsupported("a store of ws by threads unknown", s.line)
                    if s.offset.const in table:
                        raise Unsupported(f"ws[{s.offset.const}] is stored by two threads", s.line)
                    table[s.offset.const] = s.value.term
        ex = _run(k, f, 0, table)
        problems, goal = _judge(ex, nwarps, D)
    except Unsupported as e:
        where = f"{FN}, kernel.cu line {getattr(e, 'line', 0) or line}"
        return [_ob(where, "", "(assert true)\n", str(e))]
    where = f"{FN}, kernel.cu line {line}"
    if problems:
        return [_ob(where, "", "(assert true)\n", "; ".join(problems))]
    decls = ""  # the goal declares its constants (`Ground`)
    why = f"{FN}'s stores are not the merge of the warps' states"
    return [_ob(where, decls, goal, why)]


def _run(k: Kernel, f: Any, t: int, table: dict[int, Term] | None) -> Executor:
    """attn_merge_warps run by consumer thread t; reads of ws from `table` (None: a first pass,
    whose reads do not matter)."""
    ex = Executor(k, _no_pointer, lambda array, offset: (offset,), {})
    ex.thread = Aff(t)
    ex.finite_reals = True
    warp, lane = t // 32, t % 32

    def read(off: Aff, line: int) -> Real:
        if table is None:
            return Real(("v", "pending", ()))
        lo, hi = off.bounds(ex.ranges)
        missing = [o for o in range(int(lo), int(hi) + 1) if o not in table]
        if missing:
            raise Unsupported(f"a read of ws[{missing[0]}] that no thread stored", line)
        out = table[int(hi)]
        for o in range(int(hi) - 1, int(lo) - 1, -1):
            out = ite(("=", off, Aff(o)), table[o], out)
        return Real(out)

    ex.shared["ws"] = read
    ex.own = {"ws"}
    ex.summaries.update(
        warp_id=lambda ex, e: Aff(warp),
        lane_id=lambda ex, e: Aff(lane),
        cta_sync=lambda ex, e: None,
    )
    m, l_ = (Real(("v", n, (Aff(warp), Aff(lane)))) for n in ("m_in", "l_in"))
    o = tuple(Real(("v", "o_in", (Aff(warp), Aff(lane), Aff(x)))) for x in range(8))
    args = [_ptr("ws"), m, l_, o, *(_ptr(n) for n in OUTS)]
    ex.call(f, [Var(ex.cell(a, p.name)) for a, p in zip(args, f.params, strict=True)], [])
    return ex


def _judge(ex: Executor, nwarps: int, D: int) -> tuple[list[str], str]:
    """(what the stores miss, the SMT goal: their values are not the contract's, at some
    element)."""
    loops = [s for s in ex.strided if s.function == FN]
    if len(loops) != 1:
        raise Unsupported(f"{FN} has {len(loops)} thread-strided loops, not one over [0, D)")
    loop = loops[0]
    e = Aff.of(loop.symbol)
    stores = {n: [s for s in ex.stores if s.array == n and s.guard != FALSE] for n in OUTS}
    problems = []
    if loop.count != D:
        problems.append(f"the loop over the elements runs [0, {loop.count}), not [0, {D})")
    if len(stores["o_out"]) != 1 or stores["o_out"][0].offset != e:
        problems.append("o_out[e] is not stored once for each element e of the loop")
    for n in ("m_out", "l_out"):
        got = stores[n]
        if len(got) != 1 or got[0].offset != Aff(0) or got[0].guard != ("=", e, Aff(0)):
            problems.append(f"*{n} is not stored once, by the loop's element 0")
    if problems:
        return problems, ""
    ms = [("v", "m_in", (Aff(w), Aff(0))) for w in range(nwarps)]
    big: Term = ms[0]
    names: dict[Term, Term] = {}  # the running maxima, named: printed whole they double a step
    steps = []
    for w, m in enumerate(ms[1:], 1):
        steps.append((w, substitute(("max", big, m), names)))
        big = ("max", big, m)
        names[big] = ("v", f"mx{w}", ())
    a = [app("exp", add(m, neg(big))) for m in ms]
    lane, x = e.divmod(8, ex.ranges)
    want = {
        "o_out": add(*(mul(a[w], ("v", "o_in", (Aff(w), lane, x))) for w in range(nwarps))),
        "m_out": big,
        "l_out": add(*(mul(a[w], ("v", "l_in", (Aff(w), Aff(0)))) for w in range(nwarps))),
    }
    ground = Ground()
    claims = []
    for el in range(D):  # the element enumerated: each claim's reads resolve to one store
        env = {loop.symbol: Aff(el)}
        for n in OUTS if el == 0 else OUTS[:1]:
            got, exp = (lanes.at(t, env, ex.ranges) for t in (stores[n][0].value.term, want[n]))
            sides = [smt(ground(substitute(y, names))) for y in (got, exp)]
            claims.append(f"(= {sides[0]} {sides[1]})")
    defs = "".join(
        f"(declare-fun mx{w} () Real)\n(assert (= mx{w} {smt(ground(t))}))\n" for w, t in steps
    )
    return [], ground.decls() + defs + f"(assert (not (and {' '.join(claims)})))\n"


class Ground:
    """Each ground application (o_in(w, lane, x), m_in, l_in, exp(arg)) as a real constant of
    its own, so the query is polynomial arithmetic over constants (decided by Z3's nlsat: a
    wrong merge gets a counterexample, not an unknown). Where the code's and the contract's
    exp arguments are the same term they share a constant; congruence between different terms
    of equal value is not assumed (a correct merge needs none)."""

    def __init__(self) -> None:
        self.names: dict[Term, str] = {}

    def __call__(self, t: Any) -> Any:
        if not isinstance(t, tuple):
            return t
        if t[:1] == ("v",) and t[1] in ("o_in", "m_in", "l_in"):
            idx = "_".join(str(i.const) for i in t[2])
            return ("v", self.names.setdefault(t, f"{t[1]}_{idx}"), ())
        if t[:2] == ("f", "exp"):
            key = ("f", "exp", self(t[2]))
            return ("v", self.names.setdefault(key, f"exp_{len(self.names)}"), ())
        return tuple(self(y) for y in t)

    def decls(self) -> str:
        return "".join(f"(declare-fun {n} () Real)\n" for n in self.names.values())


def _int(k: Kernel, name: str) -> int:
    v = k.constant(name)
    if not isinstance(v, Aff) or not v.is_const():
        raise Unsupported(f"{name} is not an integer constant of kernel.cu")
    return int(v.const)


def _ptr(name: str) -> Ptr:
    return Ptr(name, "float", Aff(0), "float")


def _no_pointer(field: str, offset: int) -> Ptr:
    raise Unsupported(f"{FN} reads the parameter {field}")


def _ob(subject: str, decls: str, goal: str, why: str) -> Obligation:
    return Obligation("f", CHECK, -1, subject, decls, goal, data={"mode": "device", "why": why})
