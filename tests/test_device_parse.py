"""verifier.device.parse: real kernel.cu renderings of tiny-llama (fma, mma, thread copies,
profile build; sm_80 and sm_90) parse whole, with the structure, `#if` branches and lines of the
text; constructs outside the subset fail naming their line; big tables parse fast."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterator

import pytest

from amk_farm import catalog
from compiler.codegen.kernel import render_kernel
from compiler.ir.fused_layout import layout
from compiler.schedule import build_schedule
from compiler.schedule.schedule import Options
from compiler.spec import ShapeTemplate
from verifier.device.nodes import (
    Asm,
    Binary,
    BraceInit,
    Call,
    Cast,
    Comma,
    Cond,
    Decl,
    ExprStmt,
    For,
    Function,
    If,
    Lambda,
    Name,
    Node,
    Num,
    ParseError,
    Unary,
    Unit,
    Using,
)
from verifier.device.parse import parse
from verifier.device.source import arch_of_cubin, tokenize

VARIANTS = {
    "fma": ({}, False),
    "mma": ({"matvec": "mma"}, False),
    "threads": ({"ring_copy": "threads"}, False),
    "profile": ({}, True),
}


@pytest.fixture(scope="module")
def kernels() -> dict[str, str]:
    fg = layout(catalog.resolve("tiny-llama"))
    out = {}
    for name, (opts, profile) in VARIANTS.items():
        options = Options(**opts)  # type: ignore[arg-type]
        sched = build_schedule(fg, ShapeTemplate.parse("b2-s64"), options)
        out[name] = render_kernel(fg, sched, profile=profile)
    return out


@pytest.fixture(scope="module")
def fma(kernels: dict[str, str]) -> str:
    return kernels["fma"]


def walk(node: object) -> Iterator[Node]:
    """Every node under `node` (itself included), depth first."""
    if isinstance(node, Node):
        yield node
        for f in dataclasses.fields(node):
            yield from walk(getattr(node, f.name))
    elif isinstance(node, tuple | list):
        for x in node:
            yield from walk(x)


def line_of(text: str, needle: str) -> int:
    """The 1-based line of the only line of `text` that contains `needle`."""
    hits = [n for n, s in enumerate(text.splitlines(), 1) if needle in s]
    assert len(hits) == 1, (needle, hits)
    return hits[0]


def asm_templates(f: Function) -> list[str]:
    return [n.template for n in walk(f.body) if isinstance(n, Asm)]


# ---- whole kernels ----------------------------------------------------------------------------

_DEFINITION = re.compile(
    r"\b(?:__device__|__global__)\b[^;{}=\[]*?"  # qualifiers and the return type
    r"\b(?!__launch_bounds__\b)([A-Za-z_]\w*)\s*\([^;{]*\)\s*\{"  # name(params) {
)


@pytest.mark.parametrize("arch", [800, 900])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_defined_function_is_parsed(kernels, variant, arch):
    text = kernels[variant]
    u = parse(text, arch)
    defined = set(_DEFINITION.findall(text))
    assert {"amk_megakernel", "advance", "cta_sync", "dot8", "group_sum"} <= defined
    assert {name.split("::")[-1] for name in u.functions} == defined
    assert "Ring::advance" in u.functions
    assert u.includes == ("cuda_bf16.h", "cuda/atomic") and u.arch == arch
    assert len(u.overloads["dot8"]) == 2
    assert u.overload("dot8", 3).params[1].name == "x"
    assert u.overload("dot8", 4).params[1].name == "lo"
    assert ("prof_now" in u.functions) == (variant == "profile")


def test_signal_task_structure(fma):
    body = parse(fma, 900).function("signal_task").body
    assert body is not None
    sync, cond = body.body
    assert isinstance(sync, ExprStmt) and isinstance(sync.expr, Call)
    assert sync.expr.func == Name(sync.line, "cta_sync") and sync.expr.args == ()
    assert isinstance(cond, If) and cond.other is None
    call = cond.then.expr  # type: ignore[union-attr]
    assert isinstance(call, Call) and call.func.name == "fetch_add"  # type: ignore[union-attr]
    assert call.args[1] == Name(cond.line, "cuda::memory_order_release")
    ctor = call.func.obj  # type: ignore[union-attr]
    assert isinstance(ctor, Call) and ctor.func == Name(cond.line, "counter_ref")


def test_pragmas_attach_to_their_loops(fma):
    u = parse(fma, 900)
    (loop,) = [n for n in walk(u.function("group_sum").body) if isinstance(n, For)]
    assert loop.pragma == "unroll"
    pragmas = [n.pragma for n in walk(u.function("matvec_fma").body) if isinstance(n, For)]
    assert "unroll 4" in pragmas and "" in pragmas
    assert u.function("group_sum").template[0].default == Num(loop.line - 3, 32, "32")


def test_asm_operands(kernels):
    u = parse(kernels["profile"], 900)
    (asm,) = u.function("cta_sync").body.body  # type: ignore[union-attr]
    assert isinstance(asm, Asm) and asm.volatile
    assert asm.template == "bar.sync 1, %0;"
    assert asm.outputs == () and asm.inputs == (("n", Name(asm.line, "THREADS")),)
    assert asm.clobbers == ("memory",)
    (mma,) = [n for n in walk(u.function("mma_bf16").body) if isinstance(n, Asm)]
    assert mma.template.startswith("mma.sync.aligned.m16n8k16") and mma.template.endswith(
        "{%8,%9}, {%0,%1,%2,%3};"
    )  # three literals joined
    assert [c for c, _ in mma.outputs] == ["+f"] * 4 and len(mma.inputs) == 6
    now = next(n for n in walk(u.function("prof_now").body) if isinstance(n, Asm))
    assert now.outputs == (("=l", Name(now.line, "t")),) and now.inputs == ()  # `::"memory"`
    assert now.clobbers == ("memory",)
    (fence,) = [n for n in walk(u.function("ring_init").body) if isinstance(n, Asm)]
    assert fence.outputs == fence.inputs == () and fence.clobbers == ("memory",)  # `:::`


def test_cuda_arch_picks_the_copy_branch(fma):
    produce = {arch: asm_templates(parse(fma, arch).function("produce")) for arch in (800, 900)}
    assert any(t.startswith("cp.async.bulk") for t in produce[900])
    assert not any(t.startswith("cp.async.cg") for t in produce[900])
    assert any(t.startswith("cp.async.cg") for t in produce[800])
    assert not any(t.startswith("cp.async.bulk") for t in produce[800])
    waits = {arch: asm_templates(parse(fma, arch).function("mbar_wait")) for arch in (800, 900)}
    assert "try_wait" in waits[900][0] and "test_wait" in waits[800][0]


def test_declarations_and_expressions(fma):
    u = parse(fma, 900)
    kernel = u.function("amk_megakernel")
    assert kernel.qualifiers == ('extern "C"', "__global__", "__launch_bounds__(BLOCK_THREADS, 1)")
    assert kernel.params[0].qualifiers == ("__grid_constant__",)
    assert kernel.params[0].type.text == "const Params"
    assert kernel.end_line == len(fma.rstrip("\n").splitlines())
    smem = kernel.body.body[0]  # type: ignore[union-attr]
    assert isinstance(smem, Decl) and smem.declarators[0].unsized
    assert smem.qualifiers == ("extern", "__shared__", "__align__(128)")
    push = u.function("softmax_push")
    assert [p.type.text for p in push.params] == [
        "float&",
        "float&",
        "float (&)[8]",
        "float",
        "const float (&)[8]",
    ]
    keys = u.function("attn_keys")
    assert keys.params[-1].type.text == "float (&)[G][8]"
    commas = [n for n in walk(keys.body) if isinstance(n, Comma)]
    assert len(commas[0].items) == 2  # m[h] = -INFINITY, l[h] = 0.f;
    lam = [n for n in walk(u.function("load_qkv_rope_append").body) if isinstance(n, Lambda)]
    assert lam[0].captures == "&" and lam[0].ret.text == "const bf16*"  # type: ignore[union-attr]
    assert [p.type.text for p in lam[0].params] == ["int"]
    casts = [n for n in walk(u.function("ld_weight8").body) if isinstance(n, Cast)]
    assert casts[0].kind == "reinterpret_cast" and casts[0].type.text == "const bf16x8*"
    tmpl = [n for n in walk(u.function("matvec").body) if isinstance(n, Call) and n.template_args]
    callees = [n.func.id for n in tmpl]  # type: ignore[union-attr]
    assert callees == ["rms_rstd", "matvec_mma", "matvec_fma"]
    assert u.function("load_matvec").template[1].kind == "class"
    inits = [n for n in walk(u.function("warp_argmax").body) if isinstance(n, BraceInit)]
    assert inits and inits[0].type is None and len(inits[0].items) == 2
    picks = [n for n in walk(u.function("lmhead_argmax").body) if isinstance(n, BraceInit)]
    assert any(b.type is not None and b.type.text == "ArgMax" for b in picks)
    ifs = [n for n in walk(u.function("weight_policy").body) if isinstance(n, If)]
    assert ifs[0].constexpr
    usings = {it.name: it.type.text for it in u.items if isinstance(it, Using)}
    assert usings["counter_ref"] == "cuda::atomic_ref<u64, cuda::thread_scope_device>"
    tasks = [it for it in u.items if isinstance(it, Decl) and it.declarators[0].name == "TASKS"]
    assert tasks[0].qualifiers == ("__device__",) and tasks[0].type.text == "const Task"
    table = tasks[0].declarators[0].init
    assert isinstance(table, BraceInit) and all(isinstance(r, BraceInit) for r in table.items)
    assert table.items[0].items[1] == Num(table.items[0].line, -1, "-1")  # type: ignore[union-attr]


def test_lines_are_the_first_token_lines(fma):
    u = parse(fma, 900)
    lines = fma.splitlines()
    cta = u.function("cta_sync")
    assert cta.line == line_of(fma, "void cta_sync()")
    first = cta.body.body[0]  # type: ignore[union-attr]
    assert first.line == line_of(fma, 'asm volatile("bar.sync 1, %0;"')
    assert (
        u.function("group_sum").line
        == line_of(fma, "__device__ __forceinline__ float group_sum") - 1
    )
    kernel = u.function("amk_megakernel")
    assert kernel.line == line_of(fma, 'extern "C" __global__')
    for node in walk(u.items):
        src = lines[node.line - 1]
        if isinstance(node, Name):
            assert node.id.split("::")[-1] in src, (node, src)
        elif isinstance(node, Num):
            assert node.text.lstrip("-") in src, (node, src)
        elif isinstance(node, For):
            assert "for (" in src, (node, src)
        elif isinstance(node, If):
            assert "if (" in src or "if constexpr (" in src, (node, src)
        elif isinstance(node, Asm):
            assert "asm volatile(" in src, (node, src)
        elif isinstance(node, Function):
            assert re.search(r"^(template|__device__|static|extern)\b", src.strip()), (node, src)


# ---- expressions in isolation -----------------------------------------------------------------


def _init(src: str) -> object:
    (decl,) = parse(f"constexpr int X = {src};", 900).items
    assert isinstance(decl, Decl)
    return decl.declarators[0].init


def test_precedence_is_cxx():
    e = _init("a || b && c | d ^ e & f == g < h << i + j * k")
    ops = []
    while isinstance(e, Binary):
        ops.append(e.op)
        e = e.right
    assert ops == ["||", "&&", "|", "^", "&", "==", "<", "<<", "+", "*"]
    c = _init("a ? b : c ? d : e")
    assert isinstance(c, Cond) and isinstance(c.other, Cond)
    u = _init("-x * !y")
    assert isinstance(u, Binary) and isinstance(u.left, Unary) and u.left.op == "-"
    s = _init("a - b - c")
    assert isinstance(s, Binary) and isinstance(s.left, Binary)  # left to right
    p = _init("*p++")
    assert isinstance(p, Unary) and p.op == "*" and isinstance(p.operand, Unary)
    assert p.operand.postfix


def test_template_calls_need_a_known_template():
    text = "template <int N = 32> __device__ int f(int v) { return v; }\n"
    text += "__device__ bool g(int a, int b) { return a < b && f<4>(a) > b; }\n"
    u = parse(text, 900)
    (ret,) = u.function("g").body.body  # type: ignore[union-attr]
    e = ret.value  # type: ignore[union-attr]
    assert isinstance(e, Binary) and e.op == "&&" and e.left.op == "<"  # type: ignore[union-attr]
    call = e.right.left  # type: ignore[union-attr]
    assert isinstance(call, Call) and call.template_args == (Num(2, 4, "4"),)


def test_numeric_literals():
    expect = {
        "0.f": 0.0,
        "1e-05f": 1e-05,
        "0xffff0000u": 0xFFFF0000,
        "-1.25e-01f": -0.125,
        "2ull": 2,
        "1.f": 1.0,
        "010": 8,
    }
    for text, value in expect.items():
        n = _init(text)
        assert isinstance(n, Num) and n.value == value and n.text == text
        assert type(n.value) is type(value)
    neg = _init("-1u")
    assert isinstance(neg, Unary) and neg.operand == Num(1, 1, "1u")


def test_float_tables_and_multiline_rows(fma):
    u = parse(fma, 900)
    decls = {it.declarators[0].name: it for it in u.items if isinstance(it, Decl)}
    freq = decls["INV_FREQ"].declarators[0].init
    assert isinstance(freq, BraceInit) and len(freq.items) == 32
    assert freq.items[0] == Num(freq.line + 1, 1.0, "1e+00f")
    assert decls["INV_FREQ"].qualifiers == ("__device__", "constexpr")
    queue_off = decls["QUEUE_OFF"].declarators[0].init
    assert isinstance(queue_off, BraceInit) and len(queue_off.items) == 133  # SM_COUNT + 1
    assert queue_off.items[16] == Num(queue_off.line + 2, 16, "16")  # second row of the table
    assert decls["EPS"].declarators[0].init == Num(decls["EPS"].line, 1e-05, "1e-05f")


def test_arch_of_cubin():
    assert arch_of_cubin("kernel.sm_90a.cubin") == 900
    assert arch_of_cubin("kernel.sm_80.cubin") == 800


def test_comments_keep_lines():
    toks = tokenize(
        "/* a\n b */ int /* c */ x; // d\n// e\n#if __CUDA_ARCH__ < 900\ny\n#endif\n", 800
    )
    assert list(zip(toks.texts, toks.lines, strict=True)) == [
        ("int", 2),
        ("x", 2),
        (";", 2),
        ("y", 5),
        ("end of file", 7),
    ]


# ---- outside the subset -----------------------------------------------------------------------


def _insert_after(text: str, needle: str, new: str) -> tuple[str, int]:
    """`text` with line `new` after the line holding `needle`, and the new line's number."""
    n = line_of(text, needle)
    lines = text.splitlines()
    lines.insert(n, new)
    return "\n".join(lines) + "\n", n + 1


@pytest.mark.parametrize(
    "new, found",
    [
        ("  goto done;", "goto"),
        ("#define NWARPS 4", "#define"),
        ("#if FOO", "FOO"),
        ("  do { cta_sync(); } while (0);", "do-while"),
        ('#include "amk.cuh"', "#include"),
        ("#pragma once", "#pragma once"),
        ("  x = y @ z;", "'@'"),
        ("  union { int a; float b; } u;", "union"),
        ("  cudaStream_t s = 0;", "'cudaStream_t' is not a type"),
        ("  x = {1, 2;", "expected ',' or '}'"),
        ("  for (int i : idx) {}", "expected ';', found ':'"),
    ],
)
def test_unsupported_constructs_name_their_line(fma, new, found):
    text, line = _insert_after(fma, "__device__ __forceinline__ void signal_task", new)
    with pytest.raises(ParseError, match=rf"^kernel\.cu line {line}: .*{re.escape(found)}"):
        parse(text, 900)


def test_unterminated_block_names_its_brace(fma):
    text = fma.rstrip().removesuffix("}")
    line = line_of(fma, "amk_megakernel(const __grid_constant__ Params p")
    with pytest.raises(ParseError, match=rf"^kernel\.cu line {line}: .*never closed"):
        parse(text, 900)


def test_unbalanced_if_is_refused():
    with pytest.raises(ParseError, match=r"^kernel\.cu line 2: #if without #endif"):
        parse("int x;\n#if __CUDA_ARCH__ >= 900\nint y;\n", 900)
    with pytest.raises(ParseError, match=r"^kernel\.cu line 1: #else without an #if"):
        parse("#else\n", 900)


def test_pragma_must_precede_a_for():
    text = "__device__ void f() {\n#pragma unroll\n  int x = 0;\n}\n"
    with pytest.raises(ParseError, match=r"^kernel\.cu line 3: .*before a for loop"):
        parse(text, 900)


# ---- speed --------------------------------------------------------------------------------------


def test_tiny_kernel_parses_fast(fma):
    t0 = time.perf_counter()
    parse(fma, 900)
    assert time.perf_counter() - t0 < 1.0


def test_a_table_of_50k_tasks_parses_in_seconds(fma):
    start = fma.index("__device__ const Task TASKS[NTASKS] = {")
    end = fma.index("};", start)
    rows = "".join(
        f"  {{{i % 10},{i % 80 - 1},{i % 512},{i % 512 + 64},0,1,{i},{i % 33}}},\n"
        for i in range(50_000)
    )
    text = fma[:start] + "__device__ const Task TASKS[50000] = {\n" + rows + fma[end:]
    t0 = time.perf_counter()
    u: Unit = parse(text, 900)
    elapsed = time.perf_counter() - t0
    (tasks,) = [it for it in u.items if isinstance(it, Decl) and it.declarators[0].name == "TASKS"]
    table = tasks.declarators[0].init
    assert isinstance(table, BraceInit) and len(table.items) == 50_000
    last = table.items[-1]
    assert isinstance(last, BraceInit) and last.items[6] == Num(last.line, 49_999, "49999")
    assert elapsed < 5.0, elapsed
