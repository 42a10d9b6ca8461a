"""verifier.device.sync: the counter protocol proved on kernel.cu's code, with planted bugs.

A real tiny-llama kernel (fma and mma matvec) is rendered, parsed and checked: it must pass.
Each mutant is a textual edit of kernel.cu that breaks the protocol (a relaxed order, a dropped
or misplaced barrier, a signal before the task, a path that skips the signal); each must fail
the right check, naming the device function it sits in. Edits that keep the semantics (a
renamed local, comments, two independent statements swapped) must still pass.
"""

from __future__ import annotations

import pytest

from amk_farm import catalog
from compiler.codegen.kernel import render_kernel
from compiler.ir.fused_layout import layout
from compiler.schedule import build_schedule
from compiler.schedule.schedule import Options
from compiler.spec import ShapeTemplate
from verifier.device import sync
from verifier.device.parse import parse


def kernel(matvec: str) -> str:
    fg = layout(catalog.resolve("tiny-llama"))
    sched = build_schedule(fg, ShapeTemplate.parse("b1-s64"), Options(matvec=matvec))  # type: ignore[arg-type]
    return render_kernel(fg, sched)


@pytest.fixture(scope="module")
def fma() -> str:
    return kernel("fma")


def failures(cu: str) -> dict[str, str]:
    return {c: why for c, ok, why in sync.check(parse(cu, 900)) if not ok}


def edit(cu: str, old: str, new: str) -> str:
    assert cu.count(old) == 1, old
    return cu.replace(old, new)


SIGNAL = "  cta_sync();\n  if (threadIdx.x == 0) counter_ref(counters[t.signal])"
WAIT_END = "        __nanosleep(ns);\n    }\n  }\n  cta_sync();\n"
CALL = "      signal_task(p.counters, t);\n"
SWITCH = "      switch (t.op) {\n        case OP_EMBED"
MUTANTS = {
    "relaxed release": (
        ("fetch_add(1, cuda::memory_order_release)", "fetch_add(1, cuda::memory_order_relaxed)"),
        sync.S_ORDER,
        "signal_task",
    ),
    "relaxed acquire": (
        ("c.load(cuda::memory_order_acquire)", "c.load(cuda::memory_order_relaxed)"),
        sync.S_ORDER,
        "wait_task",
    ),
    "signal without its barrier": (
        (SIGNAL, SIGNAL.replace("  cta_sync();\n", "")),
        sync.S_SIGNAL,
        "signal_task",
    ),
    "signal's barrier under thread 0": (
        (SIGNAL, SIGNAL.replace("  cta_sync();\n", "  if (threadIdx.x == 0) cta_sync();\n")),
        sync.S_BARRIER,
        "signal_task",
    ),
    "wait without its barrier": (
        (WAIT_END, WAIT_END.replace("  cta_sync();\n", "")),
        sync.S_WAIT,
        "wait_task",
    ),
    "barrier count not THREADS": (
        ('asm volatile("bar.sync 1, %0;" ::"n"(THREADS)', 'asm volatile("bar.sync 1, %0;" ::"n"(THREADS - 32)'),
        sync.S_BARRIER,
        "cta_sync",
    ),
    "barrier without the memory clobber": (
        ('::"n"(THREADS) : "memory");', '::"n"(THREADS));'),
        sync.S_BARRIER,
        "cta_sync",
    ),
    "a case returns before the signal": (
        ("case OP_EMBED: embed(p, t, pos, step, sm, ring); break;", "case OP_EMBED: embed(p, t, pos, step, sm, ring); return;"),
        sync.S_EVERY,
        "amk_megakernel",
    ),
}  # fmt: skip


def test_the_rendered_kernels_pass(fma):
    for cu in (fma, kernel("mma")):
        results = sync.check(parse(cu, 900))
        assert [c for c, ok, why in results if not ok] == []
        assert {c for c, _, _ in results} >= set(sync.CHECKS)


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutants_fail_naming_the_function(fma, name):
    (old, new), check, function = MUTANTS[name]
    bad = failures(edit(fma, old, new))
    assert check in bad, (name, bad)
    assert function in bad[check], bad[check]
    assert "kernel.cu:" in bad[check]


def test_signal_before_the_switch_fails(fma):
    cu = edit(edit(fma, CALL, ""), SWITCH, CALL + SWITCH)
    bad = failures(cu)
    assert sync.S_ACCESS in bad, bad
    assert "after the task's signal" in bad[sync.S_ACCESS]


def test_counter_store_outside_the_signal_fails(fma):
    cu = edit(fma, CALL, CALL + "      if (threadIdx.x == 0) p.counters[t.signal] = 0;\n")
    bad = failures(cu)
    assert "plain write of the counters" in bad[sync.S_ONLY], bad


VARIANTS = {
    "renamed local": (("const i64 target =", "const i64 goal ="), ("< target;", "< goal;")),
    "comments": (("  cta_sync();\n}\n", "  cta_sync();  // all consumers\n  /* done */\n}\n"),),
    "independent statements swapped": (
        (
            "    const int pos = pos0 + step;\n    const i64 gstep = static_cast<i64>(step0) + step;\n",
            "    const i64 gstep = static_cast<i64>(step0) + step;\n    const int pos = pos0 + step;\n",
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_semantics_preserving_edits_pass(fma, name):
    cu = fma
    for old, new in VARIANTS[name]:
        cu = cu.replace(old, new)
    assert cu != fma
    assert failures(cu) == {}
