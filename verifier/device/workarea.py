"""The consumers' work area `sm.f` of a matvec, for the symbolic executor (`verifier.device.fma`):
a read resolves to

* this thread's own earlier store at the same offset (part's accumulation over the chunks);
* in the single-writer tail (block_sum's scratch[NWARPS], rms_rstd's rstd[B]): the store of the
  one thread (warp, lane enumerated) that wrote the element, after the barrier; rstd[b] is noted
  as ("v", "@rstd", (b,)), its value proved by `rms` to be rsqrt(f * sum_k src[b][k]^2 + e);
* else the staged inputs (`verifier.device.staging`), proved apart from the thread's own stores.
"""

from __future__ import annotations

from typing import Any

from verifier.device import lanes
from verifier.device.staging import RSTD, Staging
from verifier.device.values import FALSE, TRUE, Real, Unsupported
from verifier.terms import Aff, Term, ite

WORK = "smem_work"  # the consumers' work area, sm.f


class WorkArea:
    def __init__(self, ex: Any, staging: Staging, xs: int, tail: int, rstd: int, B: int):
        self.ex, self.staging, self.xs, self.tail, self.rstd, self.B = (
            ex,
            staging,
            xs,
            tail,
            rstd,
            B,
        )
        self.nwarps = int(ex.k.constant("NWARPS").const)
        self._table: tuple[int, dict[int, tuple[Term, int]]] = (-1, {})

    def read(self, off: Aff, line: int) -> Real:
        ex = self.ex
        for s in reversed(ex.stores):
            if s.array == WORK and s.guard != FALSE and s.loop == ex.loop and s.offset == off:
                return s.value
        lo, hi = off.bounds(ex.ranges)
        if lo >= self.rstd and hi < self.rstd + self.B:
            return Real(("v", RSTD, (off - self.rstd,)))
        if lo >= self.tail:
            return self._single(off, int(lo), int(hi), line)
        if lo >= self.xs:
            raise Unsupported("a read of the work area outside the staged inputs", line)
        for s in ex.stores:
            if s.array == WORK and s.guard != FALSE and s.loop == ex.loop:
                d = off - s.offset
                dlo, dhi = d.bounds(ex.ranges)
                if dlo <= 0 <= dhi:
                    ex.apart.append((off, ex.guard, s, line))
        return self.staging.read(ex, off, line)  # an obligation proves it inside the image

    def table(self) -> dict[int, tuple[Term, int]]:
        """offset -> (value, writers) of the single-writer tail: the latest store of each."""
        ex = self.ex
        if self._table[0] == len(ex.stores):
            return self._table[1]
        out: dict[int, tuple[Term, int]] = {}
        seen: set[int] = set()
        for s in reversed(ex.stores):
            if s.array != WORK or s.loop or s.offset.bounds(ex.ranges)[0] < self.tail:
                continue
            hits: dict[int, list[dict[str, Aff]]] = {}
            for w in range(self.nwarps):
                for v in range(32):
                    env = {lanes.WARP: Aff(w), **lanes.lane_env(v)}
                    g = lanes.at(s.guard, env, ex.ranges)
                    if g not in (TRUE, FALSE):
                        raise Unsupported(
                            "a store of the work area's tail by threads unknown", s.line
                        )
                    o = lanes.at(s.offset, env, ex.ranges)
                    if g == TRUE and o.is_const():
                        hits.setdefault(o.const, []).append(env)
                    elif g == TRUE:
                        raise Unsupported("a store of the work area's tail at no one place", s.line)
            for o, envs in hits.items():
                if o not in seen:
                    seen.add(o)
                    out[o] = (lanes.at(s.value.term, envs[0], ex.ranges), len(envs))
        self._table = (len(ex.stores), out)
        return out

    def _single(self, off: Aff, lo: int, hi: int, line: int) -> Real:
        t = self.table()
        for o in range(lo, hi + 1):
            if o not in t:
                raise Unsupported(f"a read of work-area element {o} that no thread stored", line)
            if t[o][1] != 1:
                raise Unsupported(f"work-area element {o} is stored by {t[o][1]} threads", line)
        out = t[hi][0]
        for o in range(hi - 1, lo - 1, -1):
            out = ite(("=", off, Aff(o)), t[o][0], out)
        return Real(out)
