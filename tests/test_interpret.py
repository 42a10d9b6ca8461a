"""The CPU schedule interpreter and the task tiles, against the float64 reference model.

Each decode test prefills `compiler.reference.Reference` (float64, synthetic weights) on a
prompt, copies its KV caches into the interpreter, decodes with the schedule in many seeded
random orders plus the adversarial and program orders, and compares with
`compiler.reference.generate`: tokens identical, logits within LOGITS_RTOL (relative to the
largest logit), final caches within the same tolerance. Planted bugs (a dropped wait, a WAR
or WAW ordering, a broken queue order, a doubly covered tile) must be caught.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time

import numpy as np
import pytest
import torch

from amk_farm import catalog
from compiler.frontend.synthetic import synthetic_state_dict
from compiler.ir.evaluate import concrete
from compiler.ir.fused import DType, FusedGraph, Kind
from compiler.ir.fused_eval import run_fused
from compiler.ir.fused_layout import layout
from compiler.reference import Reference, generate, rope_inv_freq
from compiler.schedule import build_schedule, interpret
from compiler.schedule.interpret import ScheduleDeadlock, ScheduleHazard
from compiler.schedule.regions import Geometry, index, task_access
from compiler.schedule.schedule import Options, Schedule, Task
from compiler.schedule.tiles import run_task
from compiler.spec import ModelSpec, ShapeTemplate

LOGITS_RTOL = 1e-9  # float64 everywhere; observed ~2e-15 (different summation orders only)
RANDOM_ORDERS = 20
PROMPT, STEPS = 11, 7  # positions 11..17: past tiny-mistral's window of 16, across partitions
TINY = catalog.resolve("tiny-llama")
MISTRAL = catalog.resolve("tiny-mistral")


@dataclasses.dataclass
class Run:
    """A reference decode: the interpreter's inputs and the outputs it must reproduce."""

    spec: ModelSpec
    fg: FusedGraph
    weights: dict[str, torch.Tensor]
    token0: torch.Tensor  # [B] the token chosen by the prefill
    pos0: int
    caches: dict[str, torch.Tensor]  # after the prefill
    tokens: np.ndarray  # [steps, B] chosen by decode steps 0..steps-1
    logits: np.ndarray  # [steps, B, V]
    final: dict[str, np.ndarray]  # caches after the decode steps


def _reference(
    spec: ModelSpec, batch: int, max_seq: int, prompt_len: int, steps: int, seed: int = 0
) -> Run:
    with torch.device("meta"):  # no init of weights that are replaced at once
        ref = Reference(spec, max_seq, device="meta")
    weights = synthetic_state_dict(spec, seed, torch.float64)
    ref.load_state_dict(weights, assign=True)
    ref.inv_freq = rope_inv_freq(spec)
    ref.requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(0, spec.vocab_size, (batch, prompt_len), generator=g)  # [B, T]
    tokens, logits = generate(ref, prompt, steps + 1)
    ks, vs = ref.empty_cache(batch, "cpu")
    _, ks, vs = ref(prompt, torch.tensor(0), ks, vs)
    caches = {f"{kv}_cache.{i}": c for kv, cs in (("k", ks), ("v", vs)) for i, c in enumerate(cs)}
    for s in range(steps):  # the decode steps again, for the final caches
        _, ks, vs = ref(tokens[:, s : s + 1], torch.tensor(prompt_len + s), ks, vs)
    final = {
        f"{kv}_cache.{i}": c.numpy() for kv, cs in (("k", ks), ("v", vs)) for i, c in enumerate(cs)
    }
    return Run(
        spec=spec, fg=layout(spec), weights=weights, token0=tokens[:, 0], pos0=prompt_len,
        caches=caches, tokens=tokens[:, 1:].T.numpy(),
        logits=torch.stack(logits[1:-1]).numpy(), final=final,
    )  # fmt: skip


@functools.cache
def _tiny(name: str, batch: int) -> Run:
    return _reference(catalog.resolve(name), batch, 64, PROMPT, STEPS)


def _check(run: Run, sched: Schedule, order: str, seed: int = 0, steps: int | None = None) -> None:
    steps = len(run.tokens) if steps is None else steps
    r = interpret(sched, run.fg, run.weights, run.token0, run.pos0, steps, order=order, seed=seed,
                  caches=run.caches)  # fmt: skip
    assert np.array_equal(r.tokens, run.tokens[:steps]), (order, seed)
    scale = np.abs(run.logits).max()
    assert np.abs(r.logits - run.logits[:steps]).max() <= LOGITS_RTOL * scale, (order, seed)
    if steps == len(run.tokens):
        for n, c in run.final.items():
            assert np.abs(r.caches[n] - c).max() <= LOGITS_RTOL * np.abs(c).max(), n


# -- tiles --------------------------------------------------------------------------------


@pytest.mark.parametrize("opts", [Options(), Options(qkv_heads_per_task=3, row_tile=48, lm_head_rows=100,
                                                     kv_partitions=3, down_splits=3, embed_cols=96),
                                  Options(qkv_head_split=4), Options(qkv_rows=24)])  # fmt: skip
def test_tiles_touch_only_their_regions(opts: Options) -> None:
    """Everything outside a task's read regions is NaN; its writes must still be NaN-free, and
    nothing outside its write regions may change (regions.py and tiles.py agree)."""
    fg = layout(MISTRAL)
    sched = build_schedule(fg, ShapeTemplate(2, 40), opts)
    g = Geometry.of(fg, sched.bound())
    rng = np.random.default_rng(0)
    env = sched.bound()
    shapes = {b.name: concrete(b.shape, env) for b in fg.buffers}
    full = {n: rng.standard_normal(concrete(s, env)) * 0.3 for n, s in fg.weights}
    pos = 30  # window 16: keys 15..30
    poison = -(2**40)
    for t in sched.tasks:
        ins = fg.instrs[t.instr]
        acc = task_access(ins, t.params, g, pos)
        buf, wt = {}, {}
        for b in fg.buffers:
            integer = b.dtype is DType.I64
            buf[b.name] = np.full(
                shapes[b.name], poison if integer else np.nan, dtype=np.int64 if integer else float
            )
        for n, w in full.items():
            wt[n] = np.full(w.shape, np.nan)
        for n, box in acc.reads:
            if n in wt:
                wt[n][index(box)] = full[n][index(box)]
            elif n == "token":
                buf[n][index(box)] = rng.integers(0, g.V, size=g.B)
            elif n == "amax_idx":
                buf[n][index(box)] = rng.integers(0, g.V, size=buf[n][index(box)].shape)
            elif n == "attn_l":
                buf[n][index(box)] = rng.uniform(1, 2, size=buf[n][index(box)].shape)
            elif n == "rope_inv_freq":
                buf[n][...] = np.asarray(fg.buffer(n).value)
            else:
                buf[n][index(box)] = rng.standard_normal(buf[n][index(box)].shape)
        before = {n: a.copy() for n, a in buf.items()}
        run_task(ins, t.params, g, buf, wt, pos)
        written = {n: np.zeros(a.shape, dtype=bool) for n, a in buf.items()}
        for n, box in acc.writes:
            written[n][index(box)] = True
            region = buf[n][index(box)]
            assert not np.isnan(region).any() and np.all(region != poison), (t, n)  # m may be -inf
        for n, a in buf.items():
            assert np.array_equal(a[~written[n]], before[n][~written[n]], equal_nan=True), (t, n)


@pytest.mark.parametrize("split_", [2, 4, 32, "rows"])
def test_qkv_head_split_equals_the_whole_instruction(split_: int | str) -> None:
    """tiny-llama's QKV instruction in pair-order tiles of part of a head (qkv_head_split), or of
    40 rows across heads (qkv_rows), gives bit for bit what its whole-head tiles and its single
    whole-instruction tile give, and that is fused.py's semantics (`run_fused`, whole buffers)
    to float64 rounding."""
    fg = layout(TINY)
    qkv = fg.instrs[1]
    rng = np.random.default_rng(99 if split_ == "rows" else split_)
    env = {"B": 2, "S": 16, "P": 1, "KS": 1, "NT": 1}
    weights = {n: rng.standard_normal(concrete(sh, env)) * 0.2 for n, sh in fg.weights}
    x = rng.standard_normal((2, 256))
    caches = {n: rng.standard_normal((2, 2, 16, 64)) for n in qkv.inputs[7:9]}
    inv = np.asarray(fg.buffer("rope_inv_freq").value)
    pos = 11

    def run(opts: Options | None) -> dict[str, np.ndarray]:
        """The instruction's tiles under `opts`, or (None) its single whole-instruction tile."""
        sched = build_schedule(fg, ShapeTemplate(2, 16), opts or Options())
        g = Geometry.of(fg, sched.bound())
        buf = {"x": x.copy(), "q": np.full((2, 256), np.nan), "rope_inv_freq": inv}
        buf |= {n: c.copy() for n, c in caches.items()}
        params = [t.params for t in sched.tasks if t.instr == 1] if opts else [(0, g.qkv_rows)]
        want = -(-512 // 40) if opts and opts.qkv_rows else 8 * opts.qkv_head_split if opts else 1
        assert len(params) == want
        for p in params:
            run_task(qkv, p, g, buf, weights, pos)
        return {n: buf[n] for n in qkv.outputs}

    split = run(Options(qkv_rows=40) if split_ == "rows" else Options(qkv_head_split=int(split_)))
    for other in (run(Options()), run(None)):
        for n in qkv.outputs:
            assert np.array_equal(split[n], other[n]), n
    only_qkv = dataclasses.replace(fg, instrs=(qkv,))
    ref = run_fused(only_qkv, {"x": x, "pos": pos, "token": np.zeros(2, dtype=np.int64), **caches},
                    weights, env)  # fmt: skip
    for n in qkv.outputs:
        assert np.abs(split[n] - ref[n]).max() <= 1e-12 * np.abs(ref[n]).max(), n


def test_tiles_on_structured_input() -> None:
    """ones/arange inputs, whole-instruction tiles, checked by hand."""
    fg = layout(TINY)
    sched = build_schedule(fg, ShapeTemplate(1, 8), Options())
    g = Geometry.of(fg, sched.bound())
    buf = {"x": np.ones((1, 256)), "down": np.arange(4 * 256, dtype=float).reshape(4, 1, 256)}
    down_res = next(i for i in fg.instrs if i.kind is Kind.DOWN_RESIDUAL)
    run_task(down_res, (0, 256), g, buf, {}, 0)
    assert np.array_equal(buf["x"][0], 1 + np.arange(256) * 4 + 256 * (0 + 1 + 2 + 3))
    merge = next(i for i in fg.instrs if i.kind is Kind.ATTN_MERGE)
    buf = {"attn_o": np.ones((1, 4, 4, 64)), "attn_m": np.zeros((1, 4, 4)), "attn_l": np.full((1, 4, 4), 2.0),
           "attn": np.zeros((1, 256))}  # fmt: skip
    buf["attn_m"][..., 3] = -np.inf  # an empty partition contributes nothing
    buf["attn_o"][..., 1, :] = 4.0
    run_task(merge, (1,), g, buf, {}, 0)
    assert (
        np.allclose(buf["attn"][0, 128:], (1 + 4 + 1) / (2 * 3)) and not buf["attn"][0, :128].any()
    )
    argmax = fg.instrs[-1]
    buf = {"amax_val": np.array([[1.0, 3.0, 3.0, 2.0]]), "amax_idx": np.array([[5, 200, 300, 400]]),
           "token": np.zeros(1, dtype=np.int64)}  # fmt: skip
    out: list[np.ndarray] = []
    run_task(argmax, (), g, buf, {}, 0, out)
    assert buf["token"][0] == 200 and [int(o[0]) for o in out] == [200]  # first maximum
    lm = fg.instrs[-2]  # V = 5 in NT = 4 tiles of CV = 2 rows: tile 3 is past the vocabulary
    small = dataclasses.replace(g, V=5, NT=4)
    w = {lm.inputs[1]: np.ones(256), lm.inputs[2]: np.arange(5 * 256, dtype=float).reshape(5, 256)}
    buf = {"x": np.ones((1, 256)), "logits": np.zeros((1, 5)), "amax_val": np.zeros((1, 4)),
           "amax_idx": np.zeros((1, 4), dtype=np.int64)}  # fmt: skip
    for t in range(4):
        run_task(lm, (t,), small, buf, w, 0)
    assert buf["amax_idx"].tolist() == [[1, 3, 4, -1]] and buf["amax_val"][0, 3] == -np.inf
    assert "logits" not in dict(task_access(lm, (3,), small).writes)


@pytest.mark.parametrize("parts", [1, 4, 7])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral"])
def test_attention_tiles_are_the_instruction(name: str, parts: int) -> None:
    """Each ATTN_PARTIAL task at the runtime pos, given only its read regions (all else NaN),
    writes its partition of the whole instruction (fused_eval), at pos 0, 1, P-1, P, 100 and
    S-1; its partition is its share of the visible keys lo..pos (tiny-mistral: a window of 16),
    the shares of one KV head cover them once each, in order, the same for every batch row."""
    fg = layout(catalog.resolve(name))
    instr = next(i for i in fg.instrs if i.kind is Kind.ATTN_PARTIAL and i.layer == 0)
    binding = {"B": 2, "S": 128, "P": parts, "KS": 1, "NT": 1}
    g = Geometry.of(fg, binding)
    rng = np.random.default_rng(parts)
    cache = (g.B, g.KV, g.S, g.D)
    full = {"q": rng.standard_normal((g.B, g.Hq * g.D)), instr.inputs[1]: rng.standard_normal(cache),
            instr.inputs[2]: rng.standard_normal(cache)}  # fmt: skip
    for pos in sorted({0, 1, parts - 1, parts, 100, g.S - 1}):
        want = run_fused(dataclasses.replace(fg, instrs=(instr,)), full | {"pos": pos}, {}, binding)
        runs = [g.keys(p, pos) for p in range(parts)]
        assert [j for a, b in runs for j in range(a, b)] == list(range(g.lo(pos), pos + 1))
        for kv in range(g.KV):
            for p in range(parts):
                acc = task_access(instr, (kv, p), g, pos)
                buf = {n: np.full(want[n].shape, np.nan) for n in (*full, *instr.outputs)}
                for n, box in acc.reads:
                    buf[n][index(box)] = full[n][index(box)]
                run_task(instr, (kv, p), g, buf, {}, pos)
                for n, box in acc.writes:
                    got, ref = buf[n][index(box)], want[n][index(box)]
                    np.testing.assert_allclose(
                        got, ref, rtol=1e-12, atol=1e-12, err_msg=f"{n} {p=}"
                    )


# -- decode against the reference -----------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral"])
def test_decode_matches_reference_in_any_order(name: str, batch: int) -> None:
    run = _tiny(name, batch)
    assert run.pos0 + STEPS - 1 > 16  # tiny-mistral's window slides
    sched = build_schedule(run.fg, ShapeTemplate(batch, 64), Options())
    _check(run, sched, "adversarial")
    _check(run, sched, "program")
    for seed in range(RANDOM_ORDERS):
        _check(run, sched, "random", seed)


def test_orders_differ_and_steps_are_fenced() -> None:
    run = _tiny("tiny-llama", 1)
    sched = build_schedule(run.fg, ShapeTemplate(1, 64), Options(sm_count=16))
    traces = {
        (o, s): interpret(
            sched, run.fg, run.weights, run.token0, run.pos0, 2, order=o, seed=s, caches=run.caches
        ).trace
        for o, s in (("random", 0), ("random", 1), ("adversarial", 0), ("program", 0))
    }
    assert len({tuple(t) for t in traces.values()}) == 4
    for trace in traces.values():  # deps.py's fence: no task of step 1 before all of step 0
        steps = [s for s, _, _ in trace]
        assert steps == sorted(steps)


@pytest.mark.parametrize("opts", [Options(sm_count=108, policy="balanced"),
                                  Options(sm_count=108, policy="balanced", qkv_heads_per_task=3, row_tile=48,
                                          lm_head_rows=100, kv_partitions=3, down_splits=3, embed_cols=96),
                                  Options(sm_count=3), Options(qkv_head_split=2, sm_count=48),
                                  Options(qkv_head_split=8, policy="balanced"),
                                  Options(qkv_rows=40, sm_count=13)],
                         ids=["balanced", "odd", "3sm", "qkv_split2", "qkv_split8", "qkv_rows"])  # fmt: skip
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral"])
def test_other_options_match_reference(name: str, opts: Options) -> None:
    run = _tiny(name, 4)
    sched = build_schedule(run.fg, ShapeTemplate(4, 64), opts)
    _check(run, sched, "adversarial")
    for seed in range(3):
        _check(run, sched, "random", seed)


@pytest.mark.parametrize("batch", [1, 4, 8, 16])
def test_templates(batch: int) -> None:
    run = _reference(TINY, batch, 64, 5, 3, seed=batch)
    sched = build_schedule(run.fg, ShapeTemplate(batch, 64), Options())
    _check(run, sched, "adversarial")
    _check(run, sched, "random", 0)


@pytest.mark.slow
def test_llama2_7b_dimensions() -> None:
    """Two layers of llama-2-7b's shapes (H 4096, I 11008, 32 heads, V 32000), float64."""
    start = time.monotonic()
    spec = dataclasses.replace(catalog.resolve("llama-2-7b"), num_layers=2)
    run = _reference(spec, 1, 16, 4, 3)
    sched = build_schedule(run.fg, ShapeTemplate(1, 16), Options())
    _check(run, sched, "adversarial")
    _check(run, sched, "random", 0)
    assert time.monotonic() - start < 120


# -- planted bugs ----------------------------------------------------------------------------


def _set_waits(sched: Schedule, pick: object, waits: tuple[tuple[int, int, int], ...]) -> Schedule:
    tasks = tuple(dataclasses.replace(t, waits=waits) if pick(t) else t for t in sched.tasks)  # type: ignore[operator]
    return dataclasses.replace(sched, tasks=tasks)


def test_missing_raw_dependency_is_caught() -> None:
    run = _tiny("tiny-llama", 4)
    sched = build_schedule(run.fg, ShapeTemplate(4, 64), Options())
    victim = next(t for t in sched.tasks if t.kind is Kind.ATTN_PARTIAL and t.layer == 1)
    assert [sched.counters[c][0].split(".")[1] for c, _, _ in victim.waits] == ["qkv_rope_append"]
    bad = _set_waits(sched, lambda t: t.id == victim.id, ())
    with pytest.raises(
        ScheduleHazard, match=rf"task {victim.id} \(attn_partial, layer 1.* reads q"
    ):
        interpret(
            bad,
            run.fg,
            run.weights,
            run.token0,
            run.pos0,
            2,
            order="adversarial",
            caches=run.caches,
        )
    _check(run, sched, "adversarial", steps=2)  # the intact schedule passes the same run


def test_missing_cross_step_dependency_is_caught() -> None:
    run = _tiny("tiny-llama", 1)
    sched = build_schedule(run.fg, ShapeTemplate(1, 64), Options(sm_count=8))
    bad = _set_waits(sched, lambda t: t.kind is Kind.EMBED, ())
    with pytest.raises(ScheduleHazard, match=r"\(embed, layer -1.* of step 1 reads token"):
        interpret(
            bad,
            run.fg,
            run.weights,
            run.token0,
            run.pos0,
            3,
            order="adversarial",
            caches=run.caches,
        )


def _subprogram(fg: FusedGraph, kinds: tuple[Kind, ...]) -> FusedGraph:
    first = {k: i for i, k in reversed(list(enumerate(x.kind for x in fg.instrs)))}
    return dataclasses.replace(fg, instrs=tuple(fg.instrs[first[k]] for k in kinds))


def test_war_hazard_is_caught() -> None:
    """EMBED, QKV, OPROJ: OPROJ overwrites x, which QKV's norm reads (write after read)."""
    run = _tiny("tiny-llama", 1)
    fg = _subprogram(run.fg, (Kind.EMBED, Kind.QKV_ROPE_APPEND, Kind.OPROJ_RESIDUAL,
                              Kind.LMHEAD_ARGMAX, Kind.ARGMAX_REDUCE))  # fmt: skip
    sched = build_schedule(fg, ShapeTemplate(1, 64), Options())
    interpret(sched, fg, run.weights, run.token0, run.pos0, 2, order="adversarial")
    embed = next(t for t in sched.tasks if t.kind is Kind.EMBED)
    bad = _set_waits(sched, lambda t: t.kind is Kind.OPROJ_RESIDUAL, ((embed.signal, 1, 0),))
    with pytest.raises(
        ScheduleHazard,
        match=r"oproj_residual.* writes x.* before task \d+ \(qkv_rope_append.*write-after-read",
    ):
        interpret(bad, fg, run.weights, run.token0, run.pos0, 2, order="adversarial")


def test_waw_hazard_is_caught() -> None:
    """EMBED twice: the second must not write x before the first."""
    run = _tiny("tiny-llama", 1)
    embed = next(i for i in run.fg.instrs if i.kind is Kind.EMBED)
    fg = dataclasses.replace(run.fg, instrs=(embed, embed, *run.fg.instrs[-2:]))
    sched = build_schedule(fg, ShapeTemplate(1, 64), Options())
    interpret(sched, fg, run.weights, run.token0, run.pos0, 2, order="adversarial")
    bad = _set_waits(sched, lambda t: t.instr == 1, ())
    with pytest.raises(
        ScheduleHazard, match=r"writes over x.* expected the last writer to be instruction 0"
    ):
        interpret(bad, fg, run.weights, run.token0, run.pos0, 2, order="adversarial")


def test_broken_queue_order_deadlocks() -> None:
    run = _tiny("tiny-llama", 1)
    sched = build_schedule(run.fg, ShapeTemplate(1, 64), Options(sm_count=8))
    # a queue where a task waits on the counter of the task right before it; swap the two
    sm, k, waiter = next(
        (sm, k, sched.tasks[b])
        for sm, q in enumerate(sched.queues)
        for k, (a, b) in enumerate(itertools.pairwise(q))
        if any(c == sched.tasks[a].signal for c, _, _ in sched.tasks[b].waits)
    )
    q = list(sched.queues[sm])
    q[k], q[k + 1] = q[k + 1], q[k]
    bad = dataclasses.replace(sched, queues=(*sched.queues[:sm], tuple(q), *sched.queues[sm + 1 :]))
    with pytest.raises(
        ScheduleDeadlock, match=rf"sm {sm} step 0: task {waiter.id} \({waiter.kind.value}"
    ) as e:
        interpret(
            bad, run.fg, run.weights, run.token0, run.pos0, 2, order="random", caches=run.caches
        )
    blocked = {b["task"]: b for b in e.value.blocked}
    assert blocked[waiter.id]["waits"][0]["value"] < blocked[waiter.id]["waits"][0]["target"]


def test_double_coverage_is_caught() -> None:
    run = _tiny("tiny-llama", 1)
    sched = build_schedule(run.fg, ShapeTemplate(1, 64), Options())
    oproj = [t for t in sched.tasks if t.kind is Kind.OPROJ_RESIDUAL]
    tasks = list(sched.tasks)
    tasks[oproj[1].id] = dataclasses.replace(oproj[1], params=oproj[0].params)  # rows 0:64 twice
    bad = dataclasses.replace(sched, tasks=tuple(tasks))
    with pytest.raises(ScheduleHazard, match=r"x\[0, 0\] is written 2 times"):
        interpret(bad, run.fg, run.weights, run.token0, run.pos0, 1, caches=run.caches)


def test_interpret_rejects_bad_arguments() -> None:
    run = _tiny("tiny-llama", 1)
    sched = build_schedule(run.fg, ShapeTemplate(1, 64), Options())
    with pytest.raises(ValueError, match="order"):
        interpret(sched, run.fg, run.weights, run.token0, 0, 1, order="lifo")
    with pytest.raises(ValueError, match="capacity"):
        interpret(sched, run.fg, run.weights, run.token0, 63, 2)


def test_task_dataclass_is_what_interpret_runs() -> None:
    run = _tiny("tiny-llama", 1)
    sched = build_schedule(run.fg, ShapeTemplate(1, 64), Options(sm_count=4))
    r = interpret(
        sched, run.fg, run.weights, run.token0, run.pos0, 2, order="program", caches=run.caches
    )
    assert sorted(t for _, _, t in r.trace) == sorted(2 * [t.id for t in sched.tasks])
    assert all(isinstance(t, Task) for t in sched.tasks)
