"""Class (a): the fusion rules, each proved once on a small model of the artifact's family.

A fusion rule is a compiler pass (`compiler/passes/`): it rewrites a pattern of the model graph
into one instruction kind. Its lemma is proved on a small model with the artifact's
architecture (same GQA group, RoPE base and scaling, window, tied head, eps; hidden 16 per
group, head dim 8, batch 2, 16 cache rows, two of each split): the frontend builds its graph,
the passes rewrite it, and `verifier.algebra` proves each rewritten instruction equal to the
graph's ops over ℝ (uninterpreted rsqrt, sigmoid, cos, sin; attention linked by its scores,
mask and values). The obligations do not depend on the artifact's dimensions, so every artifact
of a family and compiler version shares them through the proof cache.

The axioms the encodings rely on are checked numerically (float64, 4096 random values, against
PyTorch's own functions) before any obligation is made; a failed axiom fails the class.
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


def axioms() -> list[tuple[str, str]]:
    """(axiom, '' if it holds on 4096 random values, else where it fails)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(4096, generator=gen, dtype=torch.float64) - 0.5) * 40
    pos = torch.rand(4096, generator=gen, dtype=torch.float64) * 10 + 1e-3
    checks = {
        "silu(x) = x * sigmoid(x)": (torch.nn.functional.silu(x), x * torch.sigmoid(x)),
        "rsqrt(x) = 1 / sqrt(x)": (torch.rsqrt(pos), 1 / torch.sqrt(pos)),
        "x ** 2 = x * x": (x**2, x * x),
        "mean(x) = sum(x) / n": (x.reshape(64, 64).mean(-1), x.reshape(64, 64).sum(-1) / 64),
        "neg(x) = -1 * x": (torch.neg(x), -1 * x),
    }
    out = []
    for name, (a, b) in checks.items():
        bad = (a - b).abs() > 1e-12 * (1 + a.abs() + b.abs())
        out.append((name, f"fails at x = {x[bad.nonzero()[0]].item()}" if bad.any() else ""))
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
