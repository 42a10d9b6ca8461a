"""CUDA codegen: kernel.cu from a FusedGraph and a Schedule, and nvcc to cubins (no GPU needed).

Small configs use the real scheduler (`build_schedule`); the 7B/70B compile checks use
`chain_schedule`, a tiny test-only builder (every instruction waits for all tasks of the one
before it), because what they test is the kernel's dims and registers, not the schedule, and the
real scheduler takes tens of seconds (7B) to minutes (70B) on those models.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from amk_farm import catalog
from compiler.codegen.dims import CodegenError, kernel_dims, mma_slice
from compiler.codegen.emit import Emitter
from compiler.codegen.kernel import render_kernel
from compiler.codegen.nvcc import NvccError, NvccMissing, compile_cubin, gencode, parse_ptxas
from compiler.codegen.params import params_layout
from compiler.codegen.tables import parse_tables
from compiler.ir.fused import FusedGraph, Kind
from compiler.ir.fused_layout import layout
from compiler.schedule import build_schedule
from compiler.schedule.schedule import Options, Schedule, Task
from compiler.spec import ShapeTemplate

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
ARCHS = ("sm_80", "sm_90a")


def _ranges(n: int, step: int) -> list[tuple[int, ...]]:
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def chain_schedule(fg: FusedGraph, template: ShapeTemplate, o: Options) -> Schedule:
    """Test-only schedule: one counter per instruction, each instruction waits for all tasks of
    the previous one (EMBED for the previous step's ARGMAX_REDUCE), queues round robin."""
    h, i, v = fg.dim("hidden"), fg.dim("intermediate"), fg.dim("vocab")
    hq, kv, d = fg.dim("heads"), fg.dim("kv_heads"), fg.dim("head_dim")
    nt = -(-v // o.lm_head_rows)
    tiles: dict[Kind, list[tuple[int, ...]]] = {
        Kind.EMBED: _ranges(h, o.embed_cols),
        Kind.QKV_ROPE_APPEND: _ranges((hq + 2 * kv) * d, o.qkv_heads_per_task * d),
        Kind.ATTN_PARTIAL: [(g, p) for g in range(kv) for p in range(o.kv_partitions)],
        Kind.ATTN_MERGE: [(g,) for g in range(kv)],
        Kind.OPROJ_RESIDUAL: _ranges(h, o.row_tile),
        Kind.GATE_UP_SILU: _ranges(i, o.row_tile),
        Kind.DOWN_PARTIAL: [(*r, k) for r in _ranges(h, o.row_tile) for k in range(o.down_splits)],
        Kind.DOWN_RESIDUAL: _ranges(h, o.row_tile),
        Kind.LMHEAD_ARGMAX: [(t,) for t in range(nt)],
        Kind.ARGMAX_REDUCE: [()],
    }
    n = len(fg.instrs)
    per = [len(tiles[ins.kind]) for ins in fg.instrs]
    tasks: list[Task] = []
    for idx, ins in enumerate(fg.instrs):
        wait = ((idx - 1) % n, per[idx - 1], 0 if idx else -1)
        for params in tiles[ins.kind]:
            tasks.append(Task(len(tasks), idx, ins.kind, ins.layer, params, (wait,), idx))
    binding = {
        "B": template.batch,
        "S": template.max_seq,
        "P": o.kv_partitions,
        "KS": o.down_splits,
        "NT": nt,
    }
    return Schedule(
        template=template,
        options=o,
        binding=tuple(sorted(binding.items())),
        counters=tuple((f"i{idx}.{ins.kind.value}", per[idx]) for idx, ins in enumerate(fg.instrs)),
        tasks=tuple(tasks),
        queues=tuple(
            tuple(t.id for t in tasks if t.id % o.sm_count == s) for s in range(o.sm_count)
        ),
        fused_digest=fg.digest(),
    )


def case(
    model: str, template: str, real: bool = True, **opts: object
) -> tuple[FusedGraph, Schedule, str]:
    fg = layout(catalog.resolve(model))
    build = build_schedule if real else chain_schedule
    sched = build(fg, ShapeTemplate.parse(template), Options(**opts))  # type: ignore[arg-type]
    return fg, sched, render_kernel(fg, sched)


@pytest.fixture(scope="module")
def tiny() -> tuple[FusedGraph, Schedule, str]:
    return case("tiny-llama", "b2-s64")


# ---- the kernel text ----------------------------------------------------------------------------


def strip_comments(cu: str) -> str:
    return re.sub(r"//[^\n]*", "", cu)


def test_exactly_one_global_function(tiny):
    code = strip_comments(tiny[2])
    assert len(re.findall(r"\b__global__\b", code)) == 1
    assert re.search(
        r'extern "C" __global__ void __launch_bounds__\(BLOCK_THREADS, 1\)\s*amk_megakernel\(', code
    )
    assert (
        "const __grid_constant__ Params p, const int steps, const int pos0, const unsigned long long step0"
        in code
    )


def test_no_float_atomics_and_acquire_release_sync(tiny):
    code = strip_comments(tiny[2])
    assert "atomicAdd" not in code and "atomicMax" not in code
    # the only atomic read-modify-write is the release increment of a u64 counter
    assert re.findall(r"\.fetch_add\(([^;]*)\)", code) == ["1, cuda::memory_order_release"]
    assert "c.load(cuda::memory_order_acquire)" in code and "__nanosleep" in code
    assert "cuda::atomic_ref<u64, cuda::thread_scope_device>" in code
    assert "memory_order_relaxed" not in code


@pytest.mark.parametrize(
    ("model", "template", "opts"),
    [
        ("tiny-llama", "b2-s64", {}),
        ("tiny-mistral", "b1-s64", {"sm_count": 8, "threads": 128}),
        (
            "tiny-llama",
            "b3-s100",
            {
                "sm_count": 5,
                "kv_partitions": 3,
                "down_splits": 2,
                "row_tile": 48,
                "lm_head_rows": 100,
                "embed_cols": 64,
                "qkv_heads_per_task": 2,
                "policy": "balanced",
            },
        ),
        ("tiny-mistral", "b2-s64", {"sm_count": 9, "qkv_head_split": 4}),
    ],
)
def test_task_table_parses_back_to_the_schedule(model, template, opts):
    _, sched, cu = case(model, template, **opts)
    parsed = parse_tables(cu)
    assert parsed.tasks == tuple(
        (t.kind, t.layer, t.params, t.waits, t.signal) for t in sched.tasks
    )
    assert parsed.queues == sched.queues
    assert parsed.per_step == tuple(p for _, p in sched.counters)
    assert f"constexpr int NTASKS = {len(sched.tasks)};" in cu
    assert f"constexpr int NCOUNTERS = {len(sched.counters)};" in cu


def constexprs(cu: str) -> dict[str, str]:
    return dict(re.findall(r"^constexpr (?:int|float) (\w+) = ([^;]+);", cu, re.M))


def test_constexpr_dims_match_the_fused_graph(tiny):
    fg, sched, cu = tiny
    c = constexprs(cu)
    b = sched.bound()
    want = {
        "H": fg.dim("hidden"), "I": fg.dim("intermediate"), "V": fg.dim("vocab"), "L": fg.dim("layers"),
        "HQ": fg.dim("heads"), "KV": fg.dim("kv_heads"), "D": fg.dim("head_dim"),
        "B": b["B"], "S": b["S"], "P": b["P"], "KS": b["KS"], "NT": b["NT"],
        "SM_COUNT": sched.options.sm_count, "THREADS": sched.options.threads,
    }  # fmt: skip
    assert {k: int(c[k]) for k in want} == want
    assert float(c["EPS"].rstrip("f")) == pytest.approx(fg.dim("eps"), rel=1e-7)
    assert c["WINDOW"] == "0"
    inv = re.search(r"INV_FREQ\[D / 2\] = \{(.*?)\};", cu, re.S)
    assert inv is not None
    got = [float(x.rstrip("f")) for x in re.findall(r"[-\d.e+]+f", inv.group(1))]
    assert got == pytest.approx(list(fg.buffer("rope_inv_freq").value or ()), rel=1e-7)


def test_sliding_window_is_rendered():
    fg, _, cu = case("tiny-mistral", "b1-s64")
    assert constexprs(cu)["WINDOW"] == str(fg.dim("sliding_window"))
    assert "const int lo = WINDOW > 0 ? max(0, pos - WINDOW + 1) : 0;" in cu


def test_rendering_is_deterministic(tiny):
    fg, sched, cu = tiny
    again = render_kernel(FusedGraph.loads(fg.dumps()), Schedule.loads(sched.dumps()))
    assert again == cu


def test_params_layout_matches_the_struct(tiny):
    fg, sched, cu = tiny
    lay = params_layout(fg, sched.bound())
    fields = lay["fields"]
    assert [f["offset"] for f in fields] == [8 * i for i in range(len(fields))]
    assert f"static_assert(sizeof(Params) == {lay['size']}," in cu
    json.dumps(lay)  # JSON-able
    names = [f["name"] for f in fields]
    assert names[:3] == ["embed_tokens", "norm", "lm_head"]
    assert names.index("layers[0].input_layernorm") == names.index("tokens_out") + 1
    by = {f["name"]: f for f in fields}
    assert by["layers[1].q_proj"]["binds"] == "model.layers.1.self_attn.q_proj.weight"
    assert by["layers[1].k_cache"]["binds"] == "k_cache.1" and by["layers[1].k_cache"]["shape"] == [
        2,
        2,
        64,
        64,
    ]
    assert by["x"]["shape"] == [2, fg.dim("hidden")] and by["token"]["dtype"] == "i64"
    # every weight of the fused graph is bound exactly once (lm_head separately unless tied)
    assert sorted(f["binds"] for f in fields if f["role"] == "weight") == sorted(
        n for n, _ in fg.weights
    )
    # the struct's members appear in the same order
    members = re.search(r"struct Params \{(.*?)\};", cu, re.S)
    assert members is not None
    top = re.findall(r"^\s+[\w* ]+?\b(\w+)(?:\[L\])?;", members.group(1), re.M)
    assert top == [n for n in names if not n.startswith("layers[")] + ["layers"]


def test_bad_schedules_are_refused(tiny):
    fg, sched, _ = tiny
    import dataclasses

    moved = dataclasses.replace(
        sched,
        queues=(sched.queues[0] + sched.queues[1][:1], sched.queues[1][1:], *sched.queues[2:]),
    )
    render_kernel(fg, moved)  # another valid queue assignment renders
    dup = dataclasses.replace(
        sched, queues=(sched.queues[0] + sched.queues[1][:1], *sched.queues[1:])
    )
    with pytest.raises(CodegenError, match="exactly once"):
        render_kernel(fg, dup)
    t = sched.tasks[1]
    assert t.kind == Kind.QKV_ROPE_APPEND

    def with_qkv(params: tuple[int, ...]) -> Schedule:
        task = dataclasses.replace(t, params=params)
        return dataclasses.replace(sched, tasks=(sched.tasks[0], task, *sched.tasks[2:]))

    render_kernel(fg, with_qkv((t.params[0], t.params[0] + 32)))  # pairs 0..15 of a head
    render_kernel(fg, with_qkv((t.params[0] + 6, t.params[0] + 64)))  # an even sub-range
    render_kernel(fg, with_qkv((t.params[0] + 32, t.params[0] + 96)))  # across two heads
    for bad in ((0, 33), (1, 32), (31, 96)):  # odd ends
        with pytest.raises(CodegenError, match="not an even range"):
            render_kernel(fg, with_qkv(bad))
    far = dataclasses.replace(t, params=(t.params[0], t.params[1] + 10_000))
    with pytest.raises(CodegenError, match="outside"):
        render_kernel(fg, dataclasses.replace(sched, tasks=(sched.tasks[0], far, *sched.tasks[2:])))
    counters = ((sched.counters[0][0], sched.counters[0][1] + 1), *sched.counters[1:])
    with pytest.raises(CodegenError, match="per_step"):
        render_kernel(fg, dataclasses.replace(sched, counters=counters))


def test_smem_plan_fits_and_chunks_for_large_batches():
    fg = layout(catalog.resolve("llama-2-7b"))
    d1 = kernel_dims(fg, chain_schedule(fg, ShapeTemplate(1, 4096), Options()))
    assert d1.kc == 4096  # one chunk: x staged whole
    d16 = kernel_dims(fg, chain_schedule(fg, ShapeTemplate(16, 2048), Options()))
    assert d16.kc < 4096 and d16.kc % 8 == 0 and d16.smem_floats * 4 <= Options().work_bytes
    # the default plan (ring of 4 x 32 KiB + work area) fits an A100's 163 KiB per block
    assert d1.smem_bytes <= 163 * 1024 and d16.smem_bytes <= 163 * 1024
    assert d1.block_threads == Options().threads + 32  # consumers + the producer warp


def test_mma_input_chunks_are_whole_slices():
    fg = layout(catalog.resolve("llama-2-7b"))
    opts = Options(matvec="mma", work_bytes=64 * 1024)
    d = kernel_dims(fg, chain_schedule(fg, ShapeTemplate(16, 2048), opts))
    assert d.kc < 4096 and d.kc % mma_slice(opts.stage_bytes) == 0
    wide = Options(matvec="mma", mma_rows=16, stage_bytes=65536, work_bytes=96 * 1024)
    with pytest.raises(CodegenError, match="leave no room to stage 2032 input columns"):
        kernel_dims(fg, chain_schedule(fg, ShapeTemplate(16, 2048), wide))
    with pytest.raises(CodegenError, match="a multiple of mma_rows / 16"):
        kernel_dims(
            fg,
            chain_schedule(
                fg, ShapeTemplate(1, 64), Options(matvec="mma", threads=192, stage_bytes=28800)
            ),
        )


def test_smem_plan_refuses_rings_that_do_not_fit():
    fg = layout(catalog.resolve("llama-2-7b"))
    with pytest.raises(CodegenError, match="exceeds"):
        kernel_dims(fg, chain_schedule(fg, ShapeTemplate(1, 4096), Options(stages=8)))
    with pytest.raises(CodegenError, match="multiple of 16"):
        kernel_dims(fg, chain_schedule(fg, ShapeTemplate(1, 4096), Options(stage_bytes=1000)))


def test_emitter_blocks_and_comments():
    e = Emitter()
    e.comment("a\nb")
    with e.block("if (x)"):
        e.line("y();")
    assert e.text() == "// a\n// b\nif (x) {\n  y();\n}\n"


# ---- nvcc ---------------------------------------------------------------------------------------


def test_ptxas_report_is_parsed():
    log = """ptxas info    : 4568 bytes gmem, 56 bytes cmem[4]
ptxas info    : Compiling entry function 'amk_megakernel' for 'sm_80'
ptxas info    : Function properties for amk_megakernel
    32 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 103 registers, used 1 barriers, 32 bytes cumulative stack size, 2624 bytes smem, 680 bytes cmem[0]
"""
    (f,) = parse_ptxas(log)
    assert (f.name, f.registers, f.stack_frame, f.spill_stores, f.spill_loads, f.smem, f.barriers) == (
        "amk_megakernel", 103, 32, 8, 4, 2624, 1)  # fmt: skip
    assert gencode("sm_90a") == "-gencode=arch=compute_90a,code=sm_90a"
    with pytest.raises(ValueError, match="bad arch"):
        gencode("90")


def test_missing_nvcc_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NvccMissing, match="nvcc not found"):
        compile_cubin(tmp_path / "k.cu", "sm_80", tmp_path / "k.cubin")


@needs_nvcc
def test_nvcc_failure_reports_the_first_error(tmp_path):
    cu = tmp_path / "bad.cu"
    cu.write_text('extern "C" __global__ void k() { undeclared_thing(); }\n')
    with pytest.raises(NvccError, match="undeclared_thing"):
        compile_cubin(cu, "sm_80", tmp_path / "bad.cubin")


@needs_nvcc
def test_cubins_do_not_depend_on_where_the_source_is(tmp_path, tiny):
    cubins = []
    for d in ("a", "b/c"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "kernel.cu").write_text(tiny[2])
        compile_cubin(tmp_path / d / "kernel.cu", "sm_80", tmp_path / d / "kernel.cubin")
        cubins.append((tmp_path / d / "kernel.cubin").read_bytes())
    assert cubins[0] == cubins[1]


def compile_both(tmp_path, name: str, cu: str):
    path = tmp_path / f"{name}.cu"
    path.write_text(cu)
    with ThreadPoolExecutor(len(ARCHS)) as pool:
        return list(
            pool.map(lambda a: compile_cubin(path, a, tmp_path / f"{name}.{a}.cubin"), ARCHS)
        )


def check_compiled(results, d) -> None:
    for r in results:
        assert r.cubin.stat().st_size > 0
        assert r.entry is not None and r.entry.name == "amk_megakernel"
        assert r.spills == 0 and r.entry.spill_stores == 0
        assert 0 < r.entry.registers <= 255
        assert r.entry.smem == 0  # all of the plan is dynamic shared memory (d.smem_bytes)
        assert d.smem_bytes > d.stages * d.stage_bytes


@needs_nvcc
def test_tiny_compiles_for_both_archs_without_spills(tmp_path, tiny):
    fg, sched, cu = tiny
    check_compiled(compile_both(tmp_path, "tiny", cu), kernel_dims(fg, sched))


@needs_nvcc
def test_llama_2_7b_compiles_for_both_archs_without_spills(tmp_path):
    fg, sched, cu = case("llama-2-7b", "b1-s4096", real=False)
    check_compiled(compile_both(tmp_path, "7b", cu), kernel_dims(fg, sched))


@needs_nvcc
@pytest.mark.slow
def test_llama_70b_renders_and_compiles_quickly(tmp_path):
    t0 = time.perf_counter()
    _, sched, cu = case("llama-70b", "b1-s4096", real=False)
    assert len(sched.tasks) > 100_000
    path = tmp_path / "70b.cu"
    path.write_text(cu)
    r = compile_cubin(path, "sm_90a", tmp_path / "70b.cubin")
    assert r.spills == 0 and r.entry is not None
    assert time.perf_counter() - t0 < 180  # render + nvcc, one arch, well inside the compile budget


@pytest.mark.slow
def test_llama_2_7b_real_schedule_parses_back():
    _, sched, cu = case("llama-2-7b", "b1-s4096")
    parsed = parse_tables(cu)
    assert parsed.tasks == tuple(
        (t.kind, t.layer, t.params, t.waits, t.signal) for t in sched.tasks
    )
    assert parsed.queues == sched.queues


@needs_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_batch_16_compiles_without_spills_with_each_arch_defaults(tmp_path, arch):
    opts = Options.for_target(arch, 16).to_json()
    fg, sched, cu = case("llama-2-7b", "b16-s2048", real=False, **opts)
    d = kernel_dims(fg, sched)
    assert d.mma and d.kc < fg.dim("hidden")  # the tensor-core matvec, inputs staged in chunks
    path = tmp_path / "b16.cu"
    path.write_text(cu)
    check_compiled([compile_cubin(path, arch, tmp_path / "b16.cubin")], d)


@needs_nvcc
@pytest.mark.parametrize("matvec", ["fma", "mma"])
@pytest.mark.parametrize(
    ("option", "flag"),
    [
        ({"weight_l2": "evict_first"}, "WEIGHT_EVICT_FIRST"),  # L2 policy of the bulk copies
        ({"ring_copy": "threads"}, "THREAD_COPIES"),  # lockstep ring for racecheck
    ],
)
def test_ring_copy_variants_compile_for_both_archs(tmp_path, matvec, option, flag):
    fg, sched, cu = case("tiny-llama", "b4-s64", matvec=matvec, **option)
    assert f"constexpr bool {flag} = true;" in cu
    check_compiled(compile_both(tmp_path, "tiny-variant", cu), kernel_dims(fg, sched))


@needs_nvcc
@pytest.mark.parametrize("matvec", ["fma", "mma"])
@pytest.mark.parametrize("split", [2, 4])
def test_qkv_head_split_compiles_for_both_archs_without_spills(tmp_path, matvec, split):
    """QKV tasks of part of a head: D / split rows each, the widest QKV tile below D."""
    fg, sched, cu = case("tiny-llama", "b4-s64", matvec=matvec, qkv_head_split=split)
    d = kernel_dims(fg, sched)
    assert d.qkv_tile == 64 // split and f"constexpr int QKV_TILE = {64 // split};" in cu
    assert sum(t.kind is Kind.QKV_ROPE_APPEND for t in sched.tasks) == 2 * 8 * split
    check_compiled(compile_both(tmp_path, f"tiny-qkv{split}", cu), d)


@pytest.mark.parametrize(
    "opts", [{}, {"qkv_head_split": 4}, {"qkv_heads_per_task": 3}, {"qkv_rows": 24}]
)
def test_qkv_rule_indices_pair_every_row_with_its_rope_partner(opts):
    """kernel.cu's own index expressions (row lambda, epilogue, RoPE partner), evaluated with C
    semantics for every row of every QKV task: producer and consumer agree on the physical row,
    el is its element, the partner row is in the task and holds element el +- D/2 of the same
    head, and the tasks of an instruction visit every row of [Wq; Wk; Wv] once."""
    from verifier.batch_invariance import Constants, evaluate, parse

    _, sched, cu = case("tiny-llama", "b2-s64", **opts)
    body = re.search(r"void qkv_rope_append\(.*?\n\}\n", cu, re.S)
    load = re.search(r"void load_qkv_rope_append\(.*?\n\}\n", cu, re.S)
    assert body and load
    found = {
        "row j": re.search(r"const int r = r0 \+ v, j = ([^;]*);", load.group(0)),
        "row pr": re.search(r"const int pr = ([^;]*);", load.group(0)),
        "j": re.search(r"const int j = ([^,]*), el = ([^;]*);", body.group(0)),
        "pr": re.search(r"const int pr = ([^;]*);", body.group(0)),
        "rot": re.search(r"el < D / 2 \? -y\[\(([^)]*)\) \* B \+ b\] : y\[\(([^)]*)\)", body.group(0)),
    }  # fmt: skip
    assert all(found.values()), [k for k, m in found.items() if not m]
    ex = {k: [parse(x) for x in m.groups()] for k, m in found.items() if m}
    c = Constants(cu, ())
    d, rows = c.value("D", {}), c.value("QD", {}) + 2 * c.value("KVD", {})

    def at(e: object, env: dict[str, int]) -> int:
        return evaluate(e, lambda name: env[name] if name in env else c.value(name, {}))  # type: ignore[arg-type]

    def epilogue(r0: int, v: int) -> tuple[int, int]:
        """(el, pr) of task row v."""
        j = at(ex["j"][0], {"r0": r0, "v": v})
        el = at(ex["j"][1], {"j": j})
        return el, at(ex["pr"][0], {"r0": r0, "v": v, "j": j, "el": el})

    seen: list[int] = []
    for t in sched.tasks:
        if t.kind is not Kind.QKV_ROPE_APPEND or t.layer:
            continue
        r0, n = t.params[0], t.params[1] - t.params[0]
        for v in range(n):
            el, pr = epilogue(r0, v)
            r = r0 + v
            assert pr == at(ex["row pr"][0], {"r": r, "j": at(ex["row j"][0], {"r": r})})
            assert el == pr % d and pr // d == r // d, (t.id, v)
            w = at(ex["rot"][0 if el < d // 2 else 1], {"v": v})  # the partner task row
            assert 0 <= w < n, (t.id, v, w)
            assert epilogue(r0, w)[1] == (pr + d // 2 if el < d // 2 else pr - d // 2), (t.id, v)
            seen.append(pr)
    assert sorted(seen) == list(range(rows))


def test_qkv_rule_reads_pair_order_rows(tiny):
    """The row lambda and the epilogue agree: task row j of a head is element e(j) = j/2 +
    (j%2)*(D/2), its RoPE partner task row v ^ 1; the cache store keeps the text the verifier
    reads (verifier.kv_invariant), with kr the physical row."""
    _, _, cu = tiny
    body = re.search(r"void qkv_rope_append\(.*?\n\}\n", cu, re.S)
    load = re.search(r"void load_qkv_rope_append\(.*?\n\}\n", cu, re.S)
    assert body and load
    e_of_j = "j / 2 + (j % 2) * (D / 2)"
    assert e_of_j in body.group(0) and e_of_j in load.group(0)
    assert "-y[(v + 1) * B + b] : y[(v - 1) * B + b]" in body.group(0)
    assert "cache[((static_cast<size_t>(b) * KV + kr / D) * S + pos) * D + el] = " in body.group(0)
    assert "(QKV_TILE % D == 0 || (QKV_TILE < D && QKV_TILE % 2 == 0))" in cu


@needs_nvcc
@pytest.mark.parametrize("rows", [16, 32, 64])
def test_tiny_mma_compiles_for_both_archs_without_spills(tmp_path, rows):
    fg, sched, cu = case("tiny-llama", "b4-s64", matvec="mma", mma_rows=rows)
    d = kernel_dims(fg, sched)
    assert d.mma and "constexpr bool MMA = true;" in cu and f"MMA_ROWS = {rows};" in cu
    check_compiled(compile_both(tmp_path, "tiny-mma", cu), d)


def test_target_defaults_fit_each_card():
    fg = layout(catalog.resolve("llama-2-7b"))
    limits = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024}  # opt-in shared memory per block
    for arch, limit in limits.items():
        for batch, mma in ((1, False), (4, False), (16, True)):
            opts = Options.for_target(arch, batch)
            assert opts.sm_count == (108 if arch == "sm_80" else 132)
            d = kernel_dims(fg, chain_schedule(fg, ShapeTemplate(batch, 2048), opts))
            assert d.mma is mma and d.smem_bytes <= limit, (arch, batch)
    assert Options.for_target("sm_90a", 1, stages=2).stages == 2  # given values win
