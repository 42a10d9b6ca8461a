"""The scheduler: symbol binding, tiling, regions, dependencies and counters, queues, schedule.json.

Structured expectations first (the canonical tiny-llama program and the exact waits each task
kind must end up with), then properties over several option sets (every direct hazard is
implied by the counters; queues in program order; per_step consistent).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from amk_farm import catalog
from compiler.ir.fused import FusedGraph, Kind
from compiler.ir.fused_layout import layout
from compiler.ir.graph import IRError
from compiler.limits import LimitError, schedule_tasks
from compiler.schedule import build_schedule
from compiler.schedule.build import check_schedule, program_order_violations
from compiler.schedule.deps import direct
from compiler.schedule.queues import task_cost
from compiler.schedule.regions import (
    Geometry,
    coalesce,
    instr_writes,
    intersect,
    qkv_pairs,
    subtract,
    task_access,
    tracked,
    volume,
)
from compiler.schedule.schedule import Options, Schedule, Task
from compiler.schedule.split import bind, split
from compiler.spec import ModelSpec, ShapeTemplate

TINY = catalog.resolve("tiny-llama")  # H 256, I 512, V 512, 4 heads, 2 KV heads, D 64, 2 layers
MISTRAL = catalog.resolve("tiny-mistral")
B4 = ShapeTemplate(4, 64)
# Options whose tiles do not align with anything: QKV tiles straddle q/k/v and KV groups,
# row tiles do not divide H or the down chunks, uneven LM-head tiles, KS clamped to a divisor.
ODD = Options(qkv_heads_per_task=3, row_tile=48, lm_head_rows=100, kv_partitions=3,
              down_splits=3, embed_cols=96, sm_count=7)  # fmt: skip


@pytest.fixture(scope="module")
def fg() -> FusedGraph:
    return layout(TINY)


@pytest.fixture(scope="module")
def sched(fg: FusedGraph) -> Schedule:
    return build_schedule(fg, B4, Options())


def _members(s: Schedule) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for t in s.tasks:
        out.setdefault(t.signal, set()).add(t.id)
    return out


def _needed(s: Schedule, t: Task) -> set[int]:
    """Tasks of this step that t waits for (the members of every counter it waits on)."""
    m = _members(s)
    return set().union(*(m[c] for c, _, off in t.waits if off == 0))


def _of(s: Schedule, kind: Kind, layer: int | None = None) -> list[Task]:
    return [t for t in s.tasks if t.kind is kind and (layer is None or t.layer == layer)]


# -- binding and tiles --------------------------------------------------------------------


def test_binding_clamps_and_divides(fg: FusedGraph) -> None:
    assert bind(fg, B4, Options()) == {"B": 4, "S": 64, "P": 4, "KS": 4, "NT": 4}
    # P clamped to S; KS the largest divisor of I = 512 not above 3; NT = ceil(512 / 100).
    assert bind(fg, ShapeTemplate(2, 2), ODD) == {"B": 2, "S": 2, "P": 2, "KS": 2, "NT": 6}
    assert bind(layout(dataclasses.replace(TINY, intermediate_size=480)), B4,
                Options(down_splits=7)) == {"B": 4, "S": 64, "P": 4, "KS": 6, "NT": 4}  # fmt: skip


def test_task_counts_per_kind(fg: FusedGraph, sched: Schedule) -> None:
    per_layer = {Kind.QKV_ROPE_APPEND: 8, Kind.ATTN_PARTIAL: 2 * 4, Kind.ATTN_MERGE: 2,
                 Kind.OPROJ_RESIDUAL: 256 // 64, Kind.GATE_UP_SILU: 512 // 64,
                 Kind.DOWN_PARTIAL: 4 * 4, Kind.DOWN_RESIDUAL: 4}  # fmt: skip
    want = {k: 2 * n for k, n in per_layer.items()}
    want |= {Kind.EMBED: 1, Kind.LMHEAD_ARGMAX: 4, Kind.ARGMAX_REDUCE: 1}
    assert Counter(t.kind for t in sched.tasks) == want
    odd = build_schedule(fg, B4, ODD)
    want_odd = {Kind.QKV_ROPE_APPEND: 2 * 3, Kind.ATTN_PARTIAL: 2 * 2 * 3, Kind.ATTN_MERGE: 2 * 2,
                Kind.OPROJ_RESIDUAL: 2 * 6, Kind.GATE_UP_SILU: 2 * 11, Kind.DOWN_PARTIAL: 2 * 6 * 2,
                Kind.DOWN_RESIDUAL: 2 * 6, Kind.EMBED: 3, Kind.LMHEAD_ARGMAX: 6,
                Kind.ARGMAX_REDUCE: 1}  # fmt: skip
    assert Counter(t.kind for t in odd.tasks) == want_odd
    assert [t.params for t in _of(odd, Kind.QKV_ROPE_APPEND, 0)] == [
        (0, 192),
        (192, 384),
        (384, 512),
    ]
    assert [t.params for t in _of(odd, Kind.EMBED)] == [(0, 96), (96, 192), (192, 256)]
    assert [t.params for t in _of(odd, Kind.DOWN_PARTIAL, 0)][:3] == [
        (0, 48, 0),
        (0, 48, 1),
        (48, 96, 0),
    ]


def test_task_ids_are_program_order(sched: Schedule) -> None:
    assert [t.id for t in sched.tasks] == list(range(len(sched.tasks)))
    assert [t.instr for t in sched.tasks] == sorted(t.instr for t in sched.tasks)


# -- regions ------------------------------------------------------------------------------


def test_boxes() -> None:
    a = ((0, 4), (0, 4))
    assert intersect(a, ((2, 6), (1, 2))) == ((2, 4), (1, 2))
    assert intersect(a, ((4, 6), (0, 4))) is None
    pieces = subtract(a, ((1, 2), (1, 3)))
    assert sum(volume(p) for p in pieces) == 16 - 2
    assert all(intersect(p, q) is None for i, p in enumerate(pieces) for q in pieces[i + 1 :])
    assert subtract(a, ((5, 6), (0, 1))) == [a]
    assert coalesce([((0, 1), (p, p + 1)) for p in range(5)]) == [((0, 1), (0, 5))]


def test_cache_regions_static_and_exact(fg: FusedGraph) -> None:
    g = Geometry.of(fg, bind(fg, B4, Options()))
    qkv = fg.instrs[1]
    k_head_1 = (4 * 64 + 64, 4 * 64 + 128)  # stacked rows of KV head 1's k projection
    static = task_access(qkv, k_head_1, g)
    assert static.writes == (("k_cache.0", ((0, 4), (1, 2), (0, 64), (0, 64))),)
    exact = task_access(qkv, k_head_1, g, pos=9)
    assert exact.writes == (("k_cache.0", ((0, 4), (1, 2), (9, 10), (0, 64))),)
    assert ("model.layers.0.self_attn.k_proj.weight", ((64, 128), (0, 256))) in exact.reads
    attn = fg.instrs[2]  # P = 4 partitions of the visible keys: any key of S = 64 statically
    assert dict(task_access(attn, (1, 1), g).reads)["k_cache.0"] == (
        (0, 4),
        (1, 2),
        (0, 64),
        (0, 64),
    )
    at20 = [dict(task_access(attn, (1, p), g, pos=20).reads)["k_cache.0"][2] for p in range(4)]
    assert at20 == [(0, 6), (6, 12), (12, 18), (18, 21)]  # 21 keys in runs of 6
    assert "k_cache.0" not in dict(task_access(attn, (1, 3), g, pos=2).reads)  # 3 keys: 1 each
    assert dict(task_access(attn, (1, 2), g, pos=2).reads)["k_cache.0"][2] == (2, 3)


def test_sliding_window_regions() -> None:
    fg = layout(MISTRAL)  # window 16
    g = Geometry.of(fg, bind(fg, B4, Options()))
    assert [g.keys(p, pos=20) for p in range(4)] == [(5, 9), (9, 13), (13, 17), (17, 21)]
    assert [g.keys(p, pos=40) for p in range(4)] == [(25, 29), (29, 33), (33, 37), (37, 41)]
    assert [g.keys(p, pos=9) for p in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    lo, hi = g.keys(2, pos=1)  # empty: two keys, one in each of partitions 0 and 1
    assert lo == hi and g.keys(1, pos=1) == (1, 2)
    assert g.keys(3) == (0, 64)  # statically: every key of the cache


def test_instruction_writes_are_exactly_the_tiles(fg: FusedGraph) -> None:
    for opts in (Options(), ODD, Options(qkv_head_split=2), Options(qkv_head_split=32)):
        g = Geometry.of(fg, bind(fg, B4, opts))
        tasks = split(fg, g, opts)
        for i, ins in enumerate(fg.instrs):
            want = sum(volume(b) for _, b in instr_writes(ins, g))
            got = sum(
                volume(b)
                for s in tasks
                if s.instr == i
                for _, b in task_access(ins, s.params, g).writes
            )
            assert got == want, (i, ins.kind)


@pytest.mark.parametrize("split_", [2, 4, 32])
def test_qkv_head_split_tiles_are_pairs_of_one_head(fg: FusedGraph, split_: int) -> None:
    """Each head in `split_` tasks of 64 / split_ rows (pair order): task k of a head writes its
    elements [k*n, (k+1)*n) and [32 + k*n, 32 + (k+1)*n), n = 32 / split_, of q or of the cache
    row pos, and reads those rows of its weight; the tasks of an instruction partition its
    output."""
    opts = Options(qkv_head_split=split_)
    g = Geometry.of(fg, bind(fg, B4, opts))
    qkv = fg.instrs[1]
    tiles = [s.params for s in split(fg, g, opts) if s.instr == 1]
    rows, n = 64 // split_, 32 // split_
    assert tiles == [(a, a + rows) for a in range(0, 8 * 64, rows)]
    wq, wk = qkv.inputs[2], qkv.inputs[3]
    for h, k in ((1, split_ - 1), (4, 0), (5, split_ // 2)):  # a q head, k heads 0 and 1
        r0 = h * 64 + k * rows
        acc = task_access(qkv, (r0, r0 + rows), g, pos=9)
        lo, hi = k * n, 32 + k * n  # the two halves of the task's pairs
        if h < 4:
            cols = [(h * 64 + lo, h * 64 + lo + n), (h * 64 + hi, h * 64 + hi + n)]
            assert acc.writes == tuple(("q", ((0, 4), c)) for c in cols)
            assert [b for name, b in acc.reads if name == wq] == [(c, (0, 256)) for c in cols]
        else:
            kv = h - 4
            els = [(lo, lo + n), (hi, hi + n)]
            assert acc.writes == tuple(
                ("k_cache.0", ((0, 4), (kv, kv + 1), (9, 10), e)) for e in els
            )
            assert [b for name, b in acc.reads if name == wk] == [
                ((kv * 64 + a, kv * 64 + b), (0, 256)) for a, b in els
            ]
    writes = [w for t in tiles for w in task_access(qkv, t, g, pos=9).writes]
    per_buffer = Counter(name for t in tiles for name, _ in task_access(qkv, t, g).writes)
    assert per_buffer == {"q": 4 * 2 * split_, "k_cache.0": 2 * 2 * split_,
                          "v_cache.0": 2 * 2 * split_}  # fmt: skip
    assert sum(volume(w) for _, w in writes) == sum(volume(b) for _, b in instr_writes(qkv, g, 9))
    assert all(  # pairwise disjoint within each buffer, so the sum is an exact partition
        intersect(a, b) is None
        for i, (m, a) in enumerate(writes)
        for n, b in writes[i + 1 :]
        if m == n
    )


def test_qkv_tiles_hold_whole_rope_pairs(fg: FusedGraph) -> None:
    g = Geometry.of(fg, bind(fg, B4, Options()))
    assert qkv_pairs(g, 64, 192) == [(0, 1, 0, 32), (0, 2, 0, 32)]
    assert qkv_pairs(g, 4 * 64 + 8, 4 * 64 + 24) == [(1, 0, 4, 12)]  # k head 0, pairs 4..11
    assert qkv_pairs(g, 32, 96) == [(0, 0, 16, 32), (0, 1, 0, 16)]  # across two q heads
    assert qkv_pairs(g, 60, 70) == [(0, 0, 30, 32), (0, 1, 0, 3)]
    assert qkv_pairs(g, 3 * 64 + 48, 4 * 64 + 8) == [(0, 3, 24, 32), (1, 0, 0, 4)]  # q into k
    for bad in ((1, 33), (0, 31), (61, 70), (0, 9 * 64)):
        with pytest.raises(ValueError):
            qkv_pairs(g, *bad)
    with pytest.raises(IRError, match="qkv_head_split=3 must divide head_dim / 2 = 32"):
        build_schedule(fg, B4, Options(qkv_head_split=3))
    with pytest.raises(ValueError, match="qkv_head_split=2 and qkv_heads_per_task=2"):
        Options(qkv_head_split=2, qkv_heads_per_task=2)
    with pytest.raises(ValueError, match="qkv_head_split must be a positive integer"):
        Options(qkv_head_split=0)
    with pytest.raises(LimitError, match="qkv_head_split 129 exceeds the limit 128"):
        Options(qkv_head_split=129)
    with pytest.raises(ValueError, match="qkv_rows must be even"):
        Options(qkv_rows=25)
    with pytest.raises(ValueError, match="qkv_rows must be a non-negative integer"):
        Options(qkv_rows=-2)
    with pytest.raises(LimitError, match="qkv_rows 2097152 exceeds the limit 1048576"):
        Options(qkv_rows=1 << 21)
    with pytest.raises(ValueError, match="qkv_rows=24 tiles the QKV rows itself"):
        Options(qkv_rows=24, qkv_head_split=2)
    rows = build_schedule(fg, B4, Options(qkv_rows=24)).tasks
    assert [t.params for t in rows if t.kind is Kind.QKV_ROPE_APPEND and t.layer == 0][:3] == [
        (0, 24),
        (24, 48),
        (48, 72),
    ]
    for opts in (Options(qkv_head_split=2), Options(qkv_head_split=8, row_tile=48),
                 Options(qkv_rows=24)):  # fmt: skip
        assert schedule_tasks(TINY, B4, opts) == len(build_schedule(fg, B4, opts).tasks)


def test_qkv_split_counters_still_group_per_kv_head(fg: FusedGraph) -> None:
    """With qkv_head_split = 2 attention of KV head g waits for the 2 * (2 + 2) QKV tasks of its
    q heads, k head and v head, through one counter per KV group, as with whole heads."""
    s = build_schedule(fg, B4, Options(qkv_head_split=2))
    for layer in (0, 1):
        qkv = _of(s, Kind.QKV_ROPE_APPEND, layer)
        assert len(qkv) == 16
        for t in _of(s, Kind.ATTN_PARTIAL, layer):
            g = t.params[0]
            heads = {2 * g, 2 * g + 1, 4 + g, 6 + g}
            assert _needed(s, t) == {q.id for q in qkv if q.params[0] // 64 in heads}
    qkv_counters = [n for name, n in s.counters if name.split(".")[1] == "qkv_rope_append"]
    assert qkv_counters == [8] * 4


# -- dependencies and counters ------------------------------------------------------------


def test_waits_are_exactly_the_needed_producers(sched: Schedule) -> None:
    """tiny-llama, default options: what each task kind must wait for, no more, no less."""
    (embed,) = _of(sched, Kind.EMBED)
    (argmax,) = _of(sched, Kind.ARGMAX_REDUCE)
    assert embed.waits == ((argmax.signal, 1, -1),)
    assert [t.id for t in sched.tasks if any(off == -1 for _, _, off in t.waits)] == [embed.id]
    ids = lambda ts: {t.id for t in ts}  # noqa: E731
    for layer in (0, 1):
        qkv = _of(sched, Kind.QKV_ROPE_APPEND, layer)
        prev = ids([embed]) if layer == 0 else ids(_of(sched, Kind.DOWN_RESIDUAL, 0))
        assert all(_needed(sched, t) == prev for t in qkv)
        for t in _of(sched, Kind.ATTN_PARTIAL, layer):
            g = t.params[0]  # q heads 2g, 2g+1 (stacked rows 64 each), k head g, v head g
            heads = {2 * g, 2 * g + 1, 4 + g, 6 + g}
            assert _needed(sched, t) == {q.id for q in qkv if q.params[0] // 64 in heads}
        partial = _of(sched, Kind.ATTN_PARTIAL, layer)
        for t in _of(sched, Kind.ATTN_MERGE, layer):
            assert _needed(sched, t) == {p.id for p in partial if p.params[0] == t.params[0]}
        merges = ids(_of(sched, Kind.ATTN_MERGE, layer))
        assert all(_needed(sched, t) == merges for t in _of(sched, Kind.OPROJ_RESIDUAL, layer))
        oproj = ids(_of(sched, Kind.OPROJ_RESIDUAL, layer))
        assert all(_needed(sched, t) == oproj for t in _of(sched, Kind.GATE_UP_SILU, layer))
        gate = _of(sched, Kind.GATE_UP_SILU, layer)
        for t in _of(sched, Kind.DOWN_PARTIAL, layer):  # chunk k = act columns [128k, 128k+128)
            k = t.params[2]
            assert _needed(sched, t) == {u.id for u in gate if u.params[0] // 128 == k}
        down = _of(sched, Kind.DOWN_PARTIAL, layer)
        for t in _of(sched, Kind.DOWN_RESIDUAL, layer):
            assert _needed(sched, t) == {u.id for u in down if u.params[:2] == t.params}
    last = ids(_of(sched, Kind.DOWN_RESIDUAL, 1))
    assert all(_needed(sched, t) == last for t in _of(sched, Kind.LMHEAD_ARGMAX))
    assert _needed(sched, argmax) == ids(_of(sched, Kind.LMHEAD_ARGMAX))
    # one counter per KV group of QKV and attention, per chunk of GATE_UP, per row of DOWN
    kinds = Counter(name.split(".")[1] for name, _ in sched.counters)
    assert kinds["qkv_rope_append"] == 2 * 2 and kinds["attn_partial"] == 2 * 2
    assert kinds["gate_up_silu"] == 2 * 4 and kinds["down_partial"] == 2 * 4
    assert kinds["oproj_residual"] == kinds["attn_merge"] == kinds["down_residual"] == 2


def _closure(s: Schedule) -> list[set[int]]:
    """Every task each task transitively waits for within the step."""
    m = _members(s)
    out: list[set[int]] = []
    for t in s.tasks:
        acc: set[int] = set()
        for c, _, off in t.waits:
            if off == 0:
                for u in m[c]:
                    acc |= {u} | out[u]
        out.append(acc)
    return out


@pytest.mark.parametrize("spec", [TINY, MISTRAL], ids=lambda s: s.name)
@pytest.mark.parametrize("opts", [Options(), ODD, Options(policy="balanced", sm_count=108),
                                  Options(qkv_head_split=4, sm_count=7),
                                  Options(qkv_rows=40, sm_count=11)],
                         ids=["default", "odd", "balanced", "qkv_split", "qkv_rows"])  # fmt: skip
def test_every_direct_hazard_is_waited_for(spec: ModelSpec, opts: Options) -> None:
    fg = layout(spec)
    s = build_schedule(fg, B4, opts)
    g = Geometry.of(fg, s.bound())
    specs = split(fg, g, opts)
    deps = direct(specs, [task_access(fg.instrs[x.instr], x.params, g) for x in specs], tracked(fg))
    closure = _closure(s)
    for t, d in enumerate(deps):
        assert d <= closure[t], (t, sorted(d - closure[t]))
    sink = len(s.tasks) - 1  # every task reaches the sink; only roots wait on the last step
    assert closure[sink] == set(range(sink))
    for task in s.tasks:
        assert (task.waits == ((s.tasks[sink].signal, 1, -1),)) == (not closure[task.id])


def test_waw_and_war_on_the_residual_stream(fg: FusedGraph) -> None:
    """A program without attention keeps the WAR of x (QKV reads it, OPROJ rewrites it)."""
    i = {k: n for n, k in reversed(list(enumerate(ins.kind for ins in fg.instrs)))}
    sub = dataclasses.replace(fg, instrs=tuple(fg.instrs[i[k]] for k in (
        Kind.EMBED, Kind.QKV_ROPE_APPEND, Kind.OPROJ_RESIDUAL, Kind.LMHEAD_ARGMAX, Kind.ARGMAX_REDUCE)))  # fmt: skip
    s = build_schedule(sub, B4, Options())
    qkv = {t.id for t in _of(s, Kind.QKV_ROPE_APPEND)}
    for t in _of(s, Kind.OPROJ_RESIDUAL):
        assert _needed(s, t) == qkv  # WAR on x; the RAW/WAW on EMBED is implied through QKV
    # Without OPROJ, QKV's tasks have no consumer: they become dependencies of the sink.
    leafy = dataclasses.replace(
        sub, instrs=tuple(x for x in sub.instrs if x.kind is not Kind.OPROJ_RESIDUAL)
    )
    s = build_schedule(leafy, B4, Options())
    (sink,) = _of(s, Kind.ARGMAX_REDUCE)
    qkv = {t.id for t in _of(s, Kind.QKV_ROPE_APPEND)}
    assert _needed(s, sink) == qkv | {t.id for t in _of(s, Kind.LMHEAD_ARGMAX)}


def test_counters_and_per_step_consistent(sched: Schedule) -> None:
    signals = Counter(t.signal for t in sched.tasks)
    assert [n for _, n in sched.counters] == [signals[c] for c in range(len(sched.counters))]
    assert len({n for n, _ in sched.counters}) == len(sched.counters)
    for t in sched.tasks:
        for c, count, off in t.waits:
            assert count == sched.counters[c][1] and off in (0, -1)
            assert all(u < t.id for u in _members(sched)[c]) or off == -1


@pytest.mark.parametrize("opts", [Options(), Options(sm_count=108), Options(sm_count=5),
                                  Options(policy="balanced"), dataclasses.replace(ODD, policy="balanced")])  # fmt: skip
def test_queues_in_program_order(fg: FusedGraph, opts: Options) -> None:
    s = build_schedule(fg, B4, opts)
    assert len(s.queues) == opts.sm_count
    assert program_order_violations(s) == []
    assert sorted(i for q in s.queues for i in q) == list(range(len(s.tasks)))


def test_round_robin_continues_where_the_last_instruction_stopped(fg: FusedGraph) -> None:
    s = build_schedule(fg, B4, Options(sm_count=5))
    sm_of = {i: sm for sm, q in enumerate(s.queues) for i in q}
    assert [sm_of[t.id] for t in s.tasks[:12]] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]


def test_balanced_policy_evens_out_weight_bytes() -> None:
    spec = dataclasses.replace(catalog.resolve("llama-2-7b"), num_layers=2)
    fg = layout(spec)
    t = ShapeTemplate(1, 256)
    worst = {}
    for policy in ("round_robin", "balanced"):
        s = build_schedule(fg, t, Options(sm_count=108, policy=policy))
        g = Geometry.of(fg, s.bound())
        weights = frozenset(n for n, _ in fg.weights)
        specs = split(fg, g, s.options)
        cost = [
            task_cost(x, task_access(fg.instrs[x.instr], x.params, g), weights, g) for x in specs
        ]
        loads = [sum(cost[i] for i in q) for q in s.queues]
        worst[policy] = max(loads) / (sum(loads) / len(loads))
        assert program_order_violations(s) == []
    assert worst["balanced"] < worst["round_robin"]
    assert worst["balanced"] < 1.1


# -- schedule.json ------------------------------------------------------------------------


def test_round_trip(fg: FusedGraph, sched: Schedule) -> None:
    assert Schedule.loads(sched.dumps()) == sched
    odd = build_schedule(fg, B4, ODD)
    assert Schedule.loads(odd.dumps()) == odd
    assert odd.digest() != sched.digest()
    assert sched.fused_digest == fg.digest()
    check_schedule(Schedule.loads(sched.dumps()), fg)


def test_options_hash_differs_per_option() -> None:
    base = Options()
    changed: dict[str, object] = {
        f.name: getattr(base, f.name) * 2 for f in dataclasses.fields(Options)
    }
    changed["policy"] = "balanced"
    changed["matvec"] = "mma"
    changed["weight_l2"] = "evict_first"
    changed["ring_copy"] = "threads"
    changed["tile_policy"] = "fit"
    changed["qkv_rows"] = 8  # 0 (not set) doubled is still 0
    hashes = {base.hash()} | {
        Options(**(base.to_json() | {k: v})).hash() for k, v in changed.items()
    }
    assert len(hashes) == 1 + len(changed)
    assert Options().hash() == base.hash()


def test_check_schedule_rejects_broken_bookkeeping(fg: FusedGraph, sched: Schedule) -> None:
    def broken(**kw: object) -> Schedule:
        return dataclasses.replace(sched, **kw)  # type: ignore[arg-type]

    counters = list(sched.counters)
    counters[0] = (counters[0][0], counters[0][1] + 1)
    tasks = list(sched.tasks)
    tasks[5] = dataclasses.replace(tasks[5], waits=((0, 1, -2),))
    cases = {
        "per_step": broken(counters=tuple(counters)),
        "bad wait": broken(tasks=tuple(tasks)),
        "exactly one queue": broken(
            queues=(sched.queues[0] + sched.queues[0][:1], *sched.queues[1:])
        ),
        "another fused graph": broken(fused_digest="0" * 64),
        "disagrees with template": broken(template=ShapeTemplate(8, 64)),
    }
    for message, s in cases.items():
        with pytest.raises(IRError, match=message):
            check_schedule(s, fg)


def test_templates_build(fg: FusedGraph) -> None:
    for batch in (1, 4, 8, 16):
        s = build_schedule(fg, ShapeTemplate(batch, 64), Options())
        assert s.bound()["B"] == batch and program_order_violations(s) == []
    with pytest.raises(IRError, match="single task"):
        build_schedule(dataclasses.replace(fg, instrs=fg.instrs[:-1]), B4, Options())


def test_small_batch_defaults_follow_the_model_shape() -> None:
    from amk_farm.catalog import resolve
    from compiler.schedule.schedule import Options

    def picked(name: str, batch: int = 1, **values: object) -> tuple[object, ...]:
        o = Options.for_target("sm_90a", batch, resolve(name), **values)
        return o.tile_policy, o.qkv_head_split, o.qkv_rows, o.kv_partitions

    assert picked("smollm2-135m") == ("fit", 8, 0, 8)  # 15 heads x 8 <= 132; 3 KV heads
    assert picked("llama-3.2-1b") == ("fit", 2, 0, 8)  # 48 heads x 2 <= 132 < 48 x 4; 128 KB
    assert picked("llama-2-7b") == ("fit", 1, 96, 4)  # 96 heads of 1 MB: 12288 rows / 132
    assert picked("llama-3-8b") == ("fit", 1, 48, 8)  # 48 heads x 2 of 512 KB
    assert picked("llama-2-13b") == ("fit", 1, 0, 4)  # 120 heads fill 9/10 of the SMs
    assert picked("llama-2-70b") == ("fit", 1, 80, 8)  # 80 heads of 2 MB: 10240 rows / 132
    assert picked("llama-2-7b", sm_count=108) == ("fit", 1, 120, 4)  # an A100: 96 heads, 108 SMs
    assert picked("llama-3.2-1b", 16) == ("fixed", 1, 0, 4)  # the tensor-core batch path
    assert picked("llama-3.2-1b", kv_partitions=3) == ("fit", 2, 0, 3)  # given values win
    assert picked("llama-3.2-1b", row_tile=32) == ("fixed", 2, 0, 8)  # a given tile is kept
    assert picked("llama-2-7b", qkv_heads_per_task=2) == ("fit", 1, 0, 4)
    assert picked("llama-2-7b", qkv_head_split=2) == ("fit", 2, 0, 4)
    assert picked("llama-3.2-1b", qkv_rows=16) == ("fit", 1, 16, 8)
    assert Options.for_target("sm_90a", 1).tile_policy == "fixed"  # no model given


def test_fit_tiles_leave_at_most_one_task_per_sm_an_instruction() -> None:
    from compiler.schedule.split import row_tile

    fit = Options(sm_count=132, tile_policy="fit")
    # llama-2-7b: o-proj 4096 rows, gate/up 11008, down 4096 in 4 split-K chunks
    assert (row_tile(4096, 1, fit), row_tile(11008, 1, fit), row_tile(4096, 4, fit)) == (
        32,
        88,
        128,
    )
    for rows, splits in ((4096, 1), (11008, 1), (4096, 4), (576, 1), (28672, 1), (8192, 4)):
        t = row_tile(rows, splits, fit)
        assert t % 8 == 0 or t == rows
        assert -(-rows // t) * splits <= 132
    assert row_tile(11008, 1, Options(row_tile=48)) == 48  # fixed: row_tile as given
    assert row_tile(100, 1, Options(sm_count=1, tile_policy="fit")) == 100  # never past the rows
