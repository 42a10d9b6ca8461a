"""Class (a): the fusion rules, each proved once on a small model of the artifact's family.

A fusion rule is a compiler pass (`compiler/passes/`): it rewrites a pattern of the model graph
into one instruction kind. Its lemma is proved on a small model with the artifact's
architecture (same GQA group, RoPE base and scaling, window, tied head, eps; hidden 16 per
group, head dim 8, batch 2, 16 cache rows, two of each split): the frontend builds its graph,
the passes rewrite it, and `verifier.algebra` proves each rewritten instruction equal to the
graph's ops over ℝ (uninterpreted rsqrt, sigmoid, cos, sin; attention linked by its scores,
mask and values). The obligations do not depend on the artifact's dimensions, so every artifact
of a family and compiler version shares them through the proof cache.

The axioms the encodings rely on are checked numerically (float64, a fixed sample of about
4096 values, against PyTorch's own functions, to a few ulps: `axioms`) before any obligation
is made; a failed axiom fails the class.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import replace

from compiler.ir.fused import FusedGraph
from compiler.ir.graph import Graph
from compiler.ir.ops import DType
from compiler.spec import ModelSpec, ShapeTemplate
from verifier import algebra
from verifier.graph_terms import round_to
from verifier.model import Geometry
from verifier.obligation import Obligation

SMALL = ShapeTemplate(2, 16)
SPLITS = {"P": 2, "KS": 2, "NT": 2}


def small_spec(spec: ModelSpec) -> ModelSpec:
    group = spec.num_heads // spec.num_kv_heads
    heads, d = 2 * group, 8
    window = min(spec.sliding_window, 6) if spec.sliding_window else None
    return dataclasses.replace(
        spec,
        name=f"{spec.name}-rules",
        hidden_size=heads * d,
        intermediate_size=3 * heads * d // 2,
        num_layers=1,
        num_heads=heads,
        num_kv_heads=2,
        head_dim=d,
        vocab_size=40,
        sliding_window=window,
    )


EPS = 2.0**-52  # the spacing of float64 at 1 (one ulp of 1; the unit roundoff is EPS / 2)
N = 4096


def sample() -> tuple[list[float], list[float]]:
    """The fixed sample of the axiom checks (no generator: the same values on every run).

    `xs`: 4096 points evenly spaced over [-20, 20] (the range where exp and sigmoid are
    neither saturated nor denormal; the spacing 40/4095 is not a power of two, so the points
    are not dyadic and most products round), then +-10**k for k in -8..8 (tiny and huge
    magnitudes). `pos`: 4096 points geometrically spaced over [1e-8, 1e8] (an RMSNorm's
    rsqrt argument is mean(x^2) + eps >= eps >= 1e-6), each a distinct float64.
    """
    xs = [-20 + 40 * i / (N - 1) for i in range(N)]
    xs += [sign * 10.0**k for k in range(-8, 9) for sign in (1, -1)]
    pos = [10.0 ** (-8 + 16 * i / (N - 1)) for i in range(N)]
    return xs, pos


def first_failure(xs: list[float], a: list[float], b: list[float], ulps: list[float]) -> str:
    """'' if |a - b| <= tolerance everywhere, else the first x where not, with both values.
    Each tolerance is `ulps[i]` ulps of max(|a|, |b|) (absolute where ulps is given so)."""
    for x, u, v, k in zip(xs, a, b, ulps, strict=True):
        tol = k * math.ulp(max(abs(u), abs(v)))
        if not abs(u - v) <= tol:  # a NaN fails too
            return f"fails at x = {x!r}: {u!r} against {v!r} (differ by {abs(u - v):.3g}, tolerance {tol:.3g})"
    return ""


def axioms() -> list[tuple[str, str]]:
    """(axiom, '' if it holds on the fixed `sample`, else where it fails and the two values).

    Both sides are computed by PyTorch in float64 (the left side is the op as the exported
    graph has it) and must agree to a few ulps, a bound derived from the operations:
    * silu(x) = x * sigmoid(x): each side is exp(-x) (<= 1 ulp in glibc and Sleef), an add,
      a division and perhaps a multiply (0.5 ulp each, correctly rounded); 1 + exp(-x) is at
      most 1.5 ulps off. Each side is within 2.5 ulps of the real value, so they differ by at
      most 5: 8 allowed (measured: 1 ulp at most over 1e5 points).
    * rsqrt(x) = 1 / sqrt(x): sqrt and division correctly rounded (1 ulp together); PyTorch's
      vectorized rsqrt is within 1.41 ulps of that (measured over 1e5 points): 8 ulps.
    * x ** 2 = x * x: pow with exponent 2 is at most 1 ulp from the rounded product: 2 ulps.
    * mean(x) = sum(x) / n: two summations of the same n = 64 terms, perhaps in different
      orders, each within (n - 1) * EPS / 2 * sum |x_i| of the exact sum (the classic
      recursive-summation bound): the means differ by at most EPS * sum|x_i| / n (plus 2 ulps
      for the divisions), expressed below in ulps of the larger mean.
    * neg(x) = -1 * x: both exact: 0 ulps.
    Any wrong function fails: a relative difference of 2e-15 is already over 8 ulps (a 2x, a
    missing square or a sum for a mean are relative differences of 1 or more). On a fixed
    sample the check gives one answer on every run.
    """
    import torch

    xs, pos = sample()
    x = torch.tensor(xs, dtype=torch.float64)
    p = torch.tensor(pos, dtype=torch.float64)
    rows = x[:N].reshape(64, 64)  # [64 rows, 64 terms]
    sums = rows.abs().sum(-1).tolist()
    mean_a, mean_b = rows.mean(-1).tolist(), (rows.sum(-1) / 64).tolist()
    mean_ulps = [
        2 + EPS * s / 64 / math.ulp(max(abs(u), abs(v)))
        for s, u, v in zip(sums, mean_a, mean_b, strict=True)
    ]
    checks = [
        ("silu(x) = x * sigmoid(x)", xs, torch.nn.functional.silu(x), x * torch.sigmoid(x), 8.0),
        ("rsqrt(x) = 1 / sqrt(x)", pos, torch.rsqrt(p), 1 / torch.sqrt(p), 8.0),
        ("x ** 2 = x * x", xs, x**2, x * x, 2.0),
        ("neg(x) = -1 * x", xs, torch.neg(x), -1 * x, 0.0),
    ]
    out = []
    for name, at, a, b, k in checks:
        out.append((name, first_failure(at, a.tolist(), b.tolist(), [k] * len(at))))
    row_starts = [xs[64 * r] for r in range(64)]  # a row is named by its first x
    out.insert(3, ("mean(x) = sum(x) / n", first_failure(row_starts, mean_a, mean_b, mean_ulps)))
    values = [1e-5, 1e-6, 0.1, 1 / math.sqrt(128), 7.498942093324559e-01, 3.0e-7]
    for dtype, torch_dtype in ((DType.F32, torch.float32), (DType.BF16, torch.bfloat16)):
        wrong = [
            v
            for v in values
            if float(torch.tensor(v, dtype=torch.float64).to(torch_dtype).double())
            != float(round_to(v, dtype))
        ]
        name = f"a constant cast to {dtype.value} is its value rounded to nearest even"
        out.append((name, f"differs at {wrong[0]}" if wrong else ""))
    return out


@functools.lru_cache(maxsize=4)
def _fused(spec: ModelSpec) -> tuple[Graph, FusedGraph]:
    from compiler.frontend.torch_export import graph_from_spec
    from compiler.passes import fuse

    graph = graph_from_spec(spec)
    return graph, fuse(graph, spec)


def forget() -> None:
    """Drop the small models' fused graphs (the fusion passes were replaced)."""
    _fused.cache_clear()


def obligations(spec: ModelSpec, kinds: set[str]) -> tuple[list[Obligation], list[str]]:
    """The lemmas of the rules that make the instruction kinds `kinds` (the artifact's), and
    the failures met while making them."""
    small = small_spec(spec)
    try:
        graph, fused = _fused(small)
    except ValueError as e:
        return [], [f"the fusion rules do not apply to a small {spec.name}: {e}"]
    g = Geometry.of(small, SMALL, SPLITS)
    obs, failures = algebra.obligations(graph, fused, g)
    out = []
    for ob in obs:
        kind = ob.subject.split()[0].split(",")[0]
        if kind.lower() in kinds or (ob.subject.startswith("attention") and "attn_merge" in kinds):
            rule = "attention" if ob.subject.startswith("attention") else kind.lower()
            out.append(replace(ob, cls="a", check=f"rule {rule}: {ob.check}", layer=-1))
    return out, [f"rule lemma: {why}" for _, why in failures]
