"""verifier.device.races: shared memory within a CTA proved on kernel.cu's code, with planted bugs.

A real tiny-llama kernel (fma and mma matvec) must pass; each mutant drops one consumer barrier
that orders shared-memory accesses and must fail the race check, naming both accesses' device
functions and kernel.cu lines; edits that keep the semantics must still pass.
"""

from __future__ import annotations

import pytest

from amk_farm import catalog
from compiler.codegen.kernel import render_kernel
from compiler.ir.fused_layout import layout
from compiler.schedule import build_schedule
from compiler.schedule.schedule import Options
from compiler.spec import ModelSpec, ShapeTemplate
from tests.test_device_sync import VARIANTS, edit, kernel
from verifier.device import races, sync
from verifier.device.parse import parse


def render(shape: str, **options: object) -> str:
    fg = layout(catalog.resolve("tiny-llama"))
    return render_kernel(fg, build_schedule(fg, ShapeTemplate.parse(shape), Options(**options)))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def fma4() -> str:
    """B = 4: rms_rstd calls block_sum once per batch row, one call after the other."""
    return render("b4-s64", matvec="fma")


@pytest.fixture(scope="module")
def mma_chunks() -> str:
    """KC = 112 < K: matvec_mma stages several input chunks, one after the other."""
    return render("b1-s64", matvec="mma", stage_bytes=4096, work_bytes=5120)


def test_wide_rows_in_several_chunks_have_no_race():
    """llama-2-70b's shape, small: B = 1, the default 32 KiB slots, 6 stages, H = 8192 > KC, so
    matvec_fma's chunk loop runs twice and its first chunk takes several slots (j passes). The
    ring slot after the j loop is 0 + j's pass count: its bound needs the j loop's test at the
    pass before (`verifier.device.loops.reached`); without it the slot was unbounded and the
    weight read at seg + k met the part[] write (a false WAR / RAW)."""
    spec = ModelSpec(name="wide-llama", arch="llama", hidden_size=8192, intermediate_size=1024,
                     num_layers=1, num_heads=64, num_kv_heads=8, head_dim=128, vocab_size=512,
                     rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512)  # fmt: skip
    fg = layout(spec)
    opts = Options(matvec="fma", stages=6)
    cu = render_kernel(fg, build_schedule(fg, ShapeTemplate.parse("b1-s64"), opts))
    assert "constexpr int STAGES = 6;" in cu and "constexpr int KC = 8048;" in cu
    assert race(cu) == ""


@pytest.fixture(scope="module")
def fma() -> str:
    return kernel("fma")


@pytest.fixture(scope="module")
def mma() -> str:
    return kernel("mma")


def race(cu: str) -> str:
    rows = {c: (ok, why) for c, ok, why in sync.check(parse(cu, 900))}
    ok, why = rows[races.RACE]
    return "" if ok else why


MUTANTS = {  # name: (matvec, old, new, kind, the device function of one of the accesses)
    "matvec_fma: no barrier after stage": (
        "fma", "    stage(xs, CHUNK, src, ld, k0, n, rstd, norm_w);\n    cta_sync();\n",
        "    stage(xs, CHUNK, src, ld, k0, n, rstd, norm_w);\n", "RAW", "stage",
    ),
    "block_sum: first barrier dropped": (
        "fma", "  if (lane_id() == 0) scratch[warp_id()] = v;\n  cta_sync();\n",
        "  if (lane_id() == 0) scratch[warp_id()] = v;\n", "RAW", "block_sum",
    ),
    "block_sum: second barrier dropped (WAR across calls)": (
        "fma4", "  for (int w = 0; w < NWARPS; ++w) s += scratch[w];\n  cta_sync();\n",
        "  for (int w = 0; w < NWARPS; ++w) s += scratch[w];\n", "WAR", "block_sum",
    ),
    "attn_merge_warps: first barrier dropped": (
        "fma", "    if (lane_id() == 0) mine[D] = m, mine[D + 1] = l;\n  }\n  cta_sync();\n",
        "    if (lane_id() == 0) mine[D] = m, mine[D + 1] = l;\n  }\n", "RAW", "attn_merge_warps",
    ),
    "matvec_mma: no barrier before restaging": (
        "mma_chunks", "    if (k0 > 0) cta_sync();  // every warp is done with the previous chunk's inputs\n",
        "", "WAR", "stage_mma",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_dropped_barriers_are_races(fma, fma4, mma_chunks, name):
    which, old, new, kind, function = MUTANTS[name]
    why = race(edit({"fma": fma, "fma4": fma4, "mma_chunks": mma_chunks}[which], old, new))
    assert f"{kind}:" in why, why
    assert function in why and why.count("kernel.cu:") >= 2, why


def test_the_rendered_kernels_have_no_race(fma, fma4, mma, mma_chunks):
    assert [race(cu) for cu in (fma, fma4, mma, mma_chunks)] == ["", "", "", ""]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_semantics_preserving_edits_have_no_race(fma, name):
    cu = fma
    for old, new in VARIANTS[name]:
        cu = cu.replace(old, new)
    assert race(cu) == ""
