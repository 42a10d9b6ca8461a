"""argmax_pick, the step of every argmax in kernel.cu (LMHEAD_ARGMAX's tiles, ARGMAX_REDUCE),
proved against its contract from the code (class f):

    r = argmax_pick(a, b) is a or b;  r.val >= a.val and r.val >= b.val;
    where r.val equals a value, r.idx <= that pair's idx (the first index on ties)

for every pair of (val, idx) over the reals (NaN is outside the reals: the code's "NaN is never a
maximum" is not read here). With it, a reduction that takes each candidate once in any order
and tree shape yields the maximum with the first index on ties, since the contract's pick is
associative and commutative. Not read yet: that LMHEAD_ARGMAX and ARGMAX_REDUCE take each
candidate once (the lanes' strided scan, warp_argmax's butterfly).
"""

from __future__ import annotations

from verifier.device.execute import Executor
from verifier.device.kernel import Kernel
from verifier.device.lvalues import Var
from verifier.device.values import Ptr, Real, Struct, Unsupported
from verifier.obligation import Obligation
from verifier.terms import Aff, Term, smt

CHECK = "argmax_pick: the larger value, the first index on ties"
NAMES = ("av", "ai", "bv", "bi")


def obligations(k: Kernel) -> list[Obligation]:
    """The contract's obligation, where kernel.cu has an argmax_pick."""
    if "argmax_pick" not in k.functions:
        return []
    f = k.function("argmax_pick", 2)
    line = f.body.line if f.body is not None else f.line
    where = f"argmax_pick, kernel.cu line {line}"
    a, b = _pair("a"), _pair("b")
    ex = Executor(k, _no_pointer, _no_element, {})
    try:
        r = ex.call(f, [Var(ex.cell(a, "a")), Var(ex.cell(b, "b"))], [])
        rv, ri = (_real(r, fld) for fld in ("val", "idx"))
    except Unsupported as e:
        return [_ob(f"{where}: {e}", "(assert true)\n", str(e))]
    av, ai, bv, bi = (smt(("v", x, ())) for x in NAMES)
    contract = (
        f"(and (or (and (= {rv} {av}) (= {ri} {ai})) (and (= {rv} {bv}) (= {ri} {bi})))"
        f" (>= {rv} {av}) (>= {rv} {bv})"
        f" (=> (= {rv} {av}) (<= {ri} {ai})) (=> (= {rv} {bv}) (<= {ri} {bi})))"
    )
    why = "argmax_pick's result is not the larger value with the first index on ties"
    return [_ob(where, f"(assert (not {contract}))\n", why)]


def _pair(name: str) -> Struct:
    return Struct(
        "ArgMax", (("val", Real(("v", f"{name}v", ()))), ("idx", Real(("v", f"{name}i", ()))))
    )


def _real(r: object, field: str) -> str:
    if not isinstance(r, Struct):
        raise Unsupported("argmax_pick does not return an ArgMax")
    v = r.get(field)
    if not isinstance(v, Real):
        raise Unsupported(f"argmax_pick's {field} is not a value of its arguments")
    t: Term = v.term
    return smt(t)


def _no_pointer(field: str, offset: int) -> Ptr:
    raise Unsupported(f"argmax_pick reads the parameter {field}")


def _no_element(array: str, offset: Aff) -> tuple[Aff, ...]:
    raise Unsupported(f"argmax_pick reads {array}")


def _ob(subject: str, goal: str, why: str) -> Obligation:
    decls = "".join(f"(declare-fun {x} () Real)\n" for x in NAMES)
    return Obligation("f", CHECK, -1, subject, decls, goal, data={"mode": "device", "why": why})
