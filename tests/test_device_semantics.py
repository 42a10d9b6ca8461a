"""verifier.device.symexec: the loop-kind task bodies of kernel.cu, executed symbolically, are
proved to compute their fused instructions; planted bugs in kernel.cu's text fail an obligation
naming the device function, semantics-preserving rewrites still prove."""

from __future__ import annotations

import re

import pytest

from amk_farm import catalog
from compiler.codegen.kernel import render_kernel
from compiler.ir.fused import FusedGraph
from compiler.ir.fused_layout import layout
from compiler.schedule import build_schedule
from compiler.schedule.schedule import Options
from compiler.spec import ShapeTemplate
from verifier.device.parse import parse
from verifier.device.symexec import obligations
from verifier.model import Geometry
from verifier.obligation import Obligation
from verifier.solve import Result, prove_all

Case = tuple[str, FusedGraph, Geometry]


@pytest.fixture(scope="module")
def tiny() -> Case:
    spec = catalog.resolve("tiny-llama")
    fg = layout(spec)
    template = ShapeTemplate.parse("b2-s64")  # two batch rows: i / n and i % n stay symbolic
    sched = build_schedule(fg, template, Options())
    return render_kernel(fg, sched), fg, Geometry.of(spec, template, sched.bound())


def judged(text: str, case: Case) -> list[tuple[Obligation, Result]]:
    _, fg, g = case
    obs = obligations(parse(text, 900), fg, g)
    return list(prove_all(obs, jobs=2))


def function(text: str, name: str) -> tuple[int, int]:
    """[start, end) of device function `name` in kernel.cu's text."""
    start = text.index(f"void {name}(")
    return start, text.index("\n}\n", start) + 3


def edit(text: str, name: str, old: str, new: str, regex: bool = False) -> str:
    """`text` with `old` replaced by `new` inside device function `name` (which must change)."""
    a, b = function(text, name)
    body = text[a:b]
    changed = re.sub(old, new, body) if regex else body.replace(old, new)
    assert changed != body, f"{old!r} is not in {name}"
    return text[:a] + changed + text[b:]


def test_the_loop_kinds_are_proved(tiny: Case) -> None:
    results = judged(tiny[0], tiny)
    names = {ob.check for ob, _ in results}
    for fn in ("down_residual", "embed", "attn_merge", "down_partial", "oproj_residual"):
        assert any(c.startswith(f"{fn} computes") for c in names), fn
        assert any(c.startswith(f"{fn}: the iterations") for c in names), fn
        assert f"{fn}: its stores lie in the region its task writes" in names, fn
    assert any("__trap() is unreachable" in c for c in names)
    bad = [(ob.name, r.status, r.reason) for ob, r in results if not r.proved]
    assert not bad, bad


MUTANTS = [
    # (device function, old, new, what the bug is)
    ("down_residual", "k < KS; ++k", "k < KS - 1; ++k", "the last chunk dropped"),
    ("down_residual", "s += ld_act", "s = ld_act", "the chunks overwritten, not summed"),
    ("down_residual", "= ld_act(p.x + b * H + r) + s;", "= s;", "the residual dropped"),
    (
        "down_residual",
        "ld_act(p.down + b * H + r)",
        "ld_act(p.down + b * H + r + 1)",
        "a load off by one",
    ),
    ("embed", "make_float4(f[0], f[1],", "make_float4(f[1], f[0],", "two columns swapped"),
    (
        "embed",
        "p.embed_tokens + tok * H + c",
        "p.embed_tokens + tok * H + c + 8",
        "a load off by 8",
    ),
    ("embed", "c = c0 + 8 * (i % n8)", "c = c0 + 4 * (i % n8)", "iterations overlap"),
    ("embed", "tok >= V", "tok >= V - 1", "a trap on a valid token"),
    (
        "attn_merge",
        "expf(ld_act(p.attn_m + bh + k) - mx)",
        "expf(mx - ld_act(p.attn_m + bh + k))",
        "exp sign",
    ),
    ("attn_merge", "num / den", "num / num", "den replaced by num"),
    (
        "attn_merge",
        "ld_act(p.attn_l + bh + k)",
        "ld_act(p.attn_l + bh + k + 1)",
        "a load off by one",
    ),
    ("attn_merge", "k < P; ++k) mx", "k < P - 1; ++k) mx", "the max misses a partition"),
    # matvec kinds: the epilogue, the call's arguments, the producer's row map
    (
        "oproj_residual",
        "*xr = ld_act(xr) + y[v * B + b];",
        "*xr = y[v * B + b];",
        "o-proj residual",
    ),
    ("down_partial", "p.act + k * CI, I", "p.act + k * CI + 8, I", "matvec source off by 8"),
    ("down_partial", "p.act + k * CI, I,", "p.act + k * CI, H,", "matvec row stride"),
    ("down_partial", "y[v * B + b]", "y[v * B + b + 1]", "an output read shifted"),
    ("load_down_partial", "(r0 + v) * I", "(r0 + v + 1) * I", "the producer's row map"),
    ("load_down_partial", "row, r1 - r0,", "row, r1 - r0 - 1,", "the producer a row short"),
    # coverage: the right values at the wrong place
    ("down_residual", "r = r0 + i % n;", "r = r0 + i % n + 1;", "the residual one row off"),
    ("attn_merge", "h = g * G + (i / D) % G", "h = (i / D) % G", "heads of the wrong group"),
    ("attn_merge", "i < B * G * D;", "i < B * G * D - 1;", "an element never stored"),
]


@pytest.mark.parametrize(("fn", "old", "new", "bug"), MUTANTS, ids=[m[3] for m in MUTANTS])
def test_planted_bugs_fail_naming_the_function(
    tiny: Case, fn: str, old: str, new: str, bug: str
) -> None:
    results = judged(edit(tiny[0], fn, old, new), tiny)
    failed = [(ob, r) for ob, r in results if not r.proved]
    assert failed, bug
    kind = fn.removeprefix("load_")  # a producer's failure names its kind's function
    assert all(ob.name.startswith(f"(f) {kind}") for ob, _ in failed), [ob.name for ob, _ in failed]
    assert any("kernel.cu line" in ob.subject for ob, _ in failed)


@pytest.fixture(scope="module")
def tiled() -> Case:
    """EMBED in tiles of 64 columns: four tasks, so a body that ignores c0 is caught."""
    spec = catalog.resolve("tiny-llama")
    fg = layout(spec)
    template = ShapeTemplate.parse("b2-s64")
    sched = build_schedule(fg, template, Options(embed_cols=64))
    return render_kernel(fg, sched), fg, Geometry.of(spec, template, sched.bound())


def test_a_body_that_ignores_its_tile_fails_coverage(tiled: Case) -> None:
    assert all(r.proved for _, r in judged(tiled[0], tiled))
    text = edit(tiled[0], "embed", "c = c0 + 8 * (i % n8)", "c = 8 * (i % n8)")
    failed = {ob.check for ob, r in judged(text, tiled) if not r.proved}
    assert failed == {"embed: its stores lie in the region its task writes"}, failed


def test_a_maximum_that_misses_a_partition_fails_float_safety(tiny: Case) -> None:
    """Over the reals the merge does not depend on the maximum it subtracts: a wrong maximum is
    caught by the exponents' sign, with a counterexample the replay confirms."""
    text = edit(tiny[0], "attn_merge", "k < P; ++k) mx", "k < P - 1; ++k) mx")
    failed = {ob.check: r for ob, r in judged(text, tiny) if not r.proved}
    r = failed.get("attn_merge: every rescale exponent is <= 0 (exp never overflows)")
    assert r is not None and r.status == "failed" and "may be > 0" in r.reason, failed


def _unrolled(text: str, g: Geometry) -> str:
    loop = "for (int k = 1; k < KS; ++k) s += ld_act(p.down + (static_cast<size_t>(k) * B + b) * H + r);"
    flat = " ".join(
        f"s += ld_act(p.down + (static_cast<size_t>({k}) * B + b) * H + r);" for k in range(1, g.KS)
    )
    return edit(text, "down_residual", loop, flat)


VARIANTS = {
    "renamed local": lambda t, g: edit(t, "down_residual", r"\bs\b", "acc", regex=True),
    "comments": lambda t, g: edit(
        t, "attn_merge", "float mx =", "/* running max */ float mx = // then the sums\n"
    ),
    "unrolled by hand": _unrolled,
    "matvec outputs renamed": lambda t, g: edit(t, "down_partial", r"\by\b", "part", regex=True),
    "matvec epilogue reordered": lambda t, g: edit(
        edit(
            t,
            "oproj_residual",
            "const int v = i / B, b = i % B;",
            "const int b = i % B, v = i / B;",
        ),
        "load_oproj_residual",
        "return w.o_proj + static_cast<size_t>(r0 + v) * QD;",
        "const int r = v + r0;\n    return w.o_proj + r * QD;",
    ),
    "reordered declarations": lambda t, g: edit(
        edit(
            edit(t, "embed", "float f[8];", ""),
            "embed",
            "const i64 tok",
            "float f[8];\n    const i64 tok",
        ),
        "attn_merge",
        "float mx = -INFINITY, num = 0.f, den = 0.f;",
        "float den = 0.f, num = 0.f, mx = -INFINITY;",
    ),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_semantics_preserving_variants_prove(tiny: Case, variant: str) -> None:
    text = VARIANTS[variant](tiny[0], tiny[2])
    assert text != tiny[0]
    bad = [(ob.name, r.reason) for ob, r in judged(text, tiny) if not r.proved]
    assert not bad, bad


def test_an_unmodelled_construct_fails_with_its_line(tiny: Case) -> None:
    text = edit(tiny[0], "down_residual", "float s = ", "float s = (float)sizeof(int) + ")
    failed = [(ob, r) for ob, r in judged(text, tiny) if not r.proved]
    assert failed and all("down_residual" in ob.name for ob, _ in failed)
    assert any("kernel.cu line" in ob.subject for ob, _ in failed)
