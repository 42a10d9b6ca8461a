"""verifier.device.fma: `matvec<K>` with the CUDA-core consumer, proved from amk.cuh's code (the
staged layout, the ring, the lanes' columns, the butterfly, the chunks); planted bugs in the
shared device code fail an obligation naming matvec_fma and a kernel.cu line."""

from __future__ import annotations

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


def judged(text: str, case: Case) -> list[tuple[Obligation, Result]]:
    return list(prove_all(obligations(parse(text, 900), case[1], case[2]), jobs=2))


def edit(text: str, name: str, old: str, new: str) -> str:
    """`text` with `old` replaced by `new` inside device function `name` (which must change)."""
    a = text.index(f"void {name}(")
    b = text.index("\n}\n", a) + 3
    assert old in text[a:b], f"{old!r} is not in {name}"
    return text[:a] + text[a:b].replace(old, new) + text[b:]


@pytest.fixture(scope="module")
def small() -> Case:
    """Slots of 64 columns a warp (WC) and chunks of 248 columns (KC): every matvec reads
    several slices j, o-proj two chunks k0 (the second 8 columns wide), lanes past the width."""
    spec = catalog.resolve("tiny-llama")
    fg = layout(spec)
    template = ShapeTemplate.parse("b2-s64")
    sched = build_schedule(fg, template, Options(stage_bytes=1024, work_bytes=3072))
    return render_kernel(fg, sched), fg, Geometry.of(spec, template, sched.bound())


def test_small_slots_and_chunks_prove(small: Case) -> None:
    results = judged(small[0], small)
    checks = {ob.check for ob, _ in results}
    for fn in ("down_partial", "oproj_residual"):
        assert any(c.startswith(f"{fn}: matvec_fma<") for c in checks), fn
    bad = [(ob.name, r.reason) for ob, r in results if not r.proved]
    assert not bad, bad


MUTANTS = [
    # (device function, old, new, what the bug is, the obligation that catches it)
    ("matvec_fma", "k < width; k", "k < width - 8; k", "a lane's last group dropped", "computes"),
    ("matvec_fma", "CHUNK / 2, acc[b])", "CHUNK / 2, 0.f)", "acc overwritten", "computes"),
    ("stage", "(k & 4)", "(~k & 4)", "the split layout half-swapped", "split-layout"),
    (
        "matvec_fma",
        "k0 > 0 ? part[v * B + b] + s : s",
        "s",
        "the chunks overwritten",
        "computes",
    ),
    (
        "matvec_fma",
        "+ warp_id() * WC",
        "+ (warp_id() + 1) % NWARPS * WC",
        "another warp's segment",
        "each product",
    ),
    ("", "o = N / 2; o > 0;", "o = N / 2; o > 1;", "a butterfly round dropped", "computes"),
    ("stage", "i < B * n4", "i < B * n4 - 1", "an input never staged", "stage stores"),
]


@pytest.mark.parametrize(
    ("fn", "old", "new", "bug", "caught"), MUTANTS, ids=[m[3] for m in MUTANTS]
)
def test_planted_bugs_fail_naming_matvec_fma(
    small: Case, fn: str, old: str, new: str, bug: str, caught: str
) -> None:
    text = edit(small[0], fn, old, new) if fn else small[0].replace(old, new)
    assert fn or small[0].count(old) == 1, old
    results = judged(text, small)
    failed = [(ob, r) for ob, r in results if not r.proved]
    assert failed, bug
    assert all("matvec_fma<" in ob.check for ob, _ in failed), [ob.name for ob, _ in failed]
    assert any(caught in ob.check for ob, _ in failed), [ob.check for ob, _ in failed]
    assert any("kernel.cu line" in ob.subject for ob, _ in failed)


@pytest.fixture(scope="module")
def tiny() -> Case:
    spec = catalog.resolve("tiny-llama")
    fg = layout(spec)
    template = ShapeTemplate.parse("b2-s64")
    sched = build_schedule(fg, template, Options())
    return render_kernel(fg, sched), fg, Geometry.of(spec, template, sched.bound())


def test_the_normed_kind_is_proved(tiny: Case) -> None:
    results = judged(tiny[0], tiny)
    checks = {ob.check for ob, _ in results}
    assert "gate_up_silu computes GATE_UP_SILU act" in checks
    assert any(c.startswith("gate_up_silu: matvec_fma<") for c in checks)
    bad = [(ob.name, r.reason) for ob, r in results if not r.proved]
    assert not bad, bad


NORMED = [
    # (device function, old, new, what the bug is, the obligation that catches it)
    ("rms_rstd", "s / K + EPS", "s / (K - 1) + EPS", "the RMSNorm divisor", "computes GATE"),
    ("rms_rstd", "s = fmaf(v.w, v.w, s);", "", "a square dropped", "rms_rstd"),
    ("stage", "v.x * r * bf16_lo(w.x)", "v.x * bf16_lo(w.x)", "rstd dropped", "subset"),
    (
        "gate_up_silu",
        "gate / (1.f + expf(-gate))",
        "1.f / (1.f + expf(-gate))",
        "SiLU turned into sigmoid",
        "computes GATE",
    ),
    (
        "gate_up_silu",
        "w.post_attention_layernorm",
        "p.layers[t.layer + 1].post_attention_layernorm",
        "the norm weight of the next layer",
        "computes GATE",
    ),
    (
        "gate_up_silu",
        "w.post_attention_layernorm",
        "w.input_layernorm",
        "the attention's norm weight",
        "computes GATE",
    ),
]


@pytest.mark.parametrize(("fn", "old", "new", "bug", "caught"), NORMED, ids=[m[3] for m in NORMED])
def test_planted_norm_bugs_fail(
    tiny: Case, fn: str, old: str, new: str, bug: str, caught: str
) -> None:
    failed = [(ob, r) for ob, r in judged(edit(tiny[0], fn, old, new), tiny) if not r.proved]
    assert failed, bug
    assert all(ob.check.startswith("gate_up_silu") for ob, _ in failed), [
        ob.name for ob, _ in failed
    ]
    assert any(caught in ob.check or caught in r.reason for ob, r in failed), [
        (ob.check, r.reason) for ob, r in failed
    ]
    assert any("kernel.cu line" in ob.subject for ob, _ in failed)
