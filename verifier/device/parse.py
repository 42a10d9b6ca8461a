"""kernel.cu -> `Unit`: a recursive-descent parser for the CUDA C++ subset codegen emits.

`parse(text, arch)` reads the whole file (amk.cuh included, as codegen pastes it): constexpr
dims, `using`, `static_assert`, structs with fields and inline methods, `enum Op : unsigned
short {..}`, `__device__ const` tables, `__device__` functions and templates, and the one
`extern "C" __global__` kernel. `source.tokenize` has already dropped comments and resolved
`#if __CUDA_ARCH__` for `arch`; `cursor.py` knows the type names and reads types, `expr.py`
expressions, `stmt.py` statements and declarations, this file the top level. Every node keeps
the kernel.cu line of its first token; anything outside the subset is a `ParseError("kernel.cu
line N: ...")` naming the line and what was found there, never skipped.

Templates. `a < b` and `f<K>(x)` look alike; the rule: a name followed by `<` opens template
arguments only if it is a template known at that point: a function declared with
`template <...>` earlier in kernel.cu, a C++ cast (`static_cast` and its kin), or a template
type of the toolkit the subset allows (`cuda::atomic_ref`). Everywhere else `<` is less-than.
kernel.cu declares its templates before their use (C++ demands as much), so the rule reads it
as nvcc does. Inside template arguments the first `>` outside parentheses closes them, and a
`>>` closing two lists is split in two.

Why kernel.cu, not PTX or SASS. A counterexample must name something a person can fix: a
device function and a kernel.cu line of code we generate, not a register in a listing of tens
of thousands of instructions. The code is ours and small (one file, about a thousand lines of
device code in a fixed subset, most of it amk.cuh), so a parser for exactly that subset is
cheap, and it refuses the rest. What runs is tied to what was read by `verifier.provenance`,
which recompiles kernel.cu with nvcc and compares the cubin's sha256 with the artifact's: nvcc
and ptxas stay trusted, as the CUDA toolkit's headers (`Unit.includes`) are.
"""

from __future__ import annotations

import gc

from verifier.device.nodes import (
    Decl,
    Enum,
    Expr,
    Function,
    ParseError,
    StaticAssert,
    Struct,
    TemplateParam,
    Type,
    Unit,
    Using,
)
from verifier.device.source import Tokens, tokenize
from verifier.device.stmt import StmtParser

Item = Function | Struct | Using | Enum | Decl | StaticAssert


def parse(text: str, arch: int) -> Unit:
    """kernel.cu's syntax tree, its `#if __CUDA_ARCH__` branches resolved for `arch`.

    Args:
        text: the whole kernel.cu.
        arch: `__CUDA_ARCH__` of the cubin being judged, e.g. 900 (sm_90a) or 800 (sm_80);
            `source.arch_of_cubin` reads it from a cubin's name.

    Raises:
        ParseError: the text is outside the subset, naming the kernel.cu line.
    """
    # a 70B kernel's tables are over a million nodes, none in a reference cycle: the cyclic
    # collector would walk them again and again as they are made (a third of the time)
    collecting = gc.isenabled()
    gc.disable()
    try:
        toks = tokenize(text, arch)
        p = Parser(toks)
        items = p.unit_items()
    finally:
        if collecting:
            gc.enable()
    functions: dict[str, Function] = {}
    overloads: dict[str, list[Function]] = {}
    for f in p.functions:
        defined = overloads.setdefault(f.name, [])
        if f.body is None and any(g.body is not None for g in defined):
            continue
        defined[:] = [g for g in defined if g.body is not None]
        defined.append(f)
    for name, fs in overloads.items():
        functions[name] = fs[0]
    return Unit(
        items=tuple(items),
        includes=toks.includes,
        arch=arch,
        functions=functions,
        overloads={n: tuple(fs) for n, fs in overloads.items()},
    )


class Parser(StmtParser):
    """The top-level items of kernel.cu."""

    def __init__(self, toks: Tokens) -> None:
        super().__init__(toks)
        self.functions: list[Function] = []

    # ---- top level --------------------------------------------------------------------------

    def unit_items(self) -> list[Item]:
        items: list[Item] = []
        while self.kinds[self.i] != "eof":
            items.append(self.item())
        return items

    def item(self) -> Item:
        tx = self.tok
        if self.kinds[self.i] == "pragma":
            raise self.error("#pragma unroll outside a function")
        self.refuse()
        if tx == "template":
            line = self.line
            tparams = self.template_params()
            return self.function_or_decl(line, tparams)
        if tx == "using":
            return self.using()
        if tx == "static_assert":
            return self.static_assert()
        if tx == "struct":
            return self.struct()
        if tx == "enum":
            return self.enum()
        return self.function_or_decl(self.line, ())

    def template_params(self) -> tuple[TemplateParam, ...]:
        self.expect("template")
        self.expect("<")
        out: list[TemplateParam] = []
        while True:
            line = self.line
            if self.tok in ("class", "typename"):
                self.i += 1
                name = self.ident("a template parameter name")
                if name in self.types:
                    raise self.error(f"template parameter {name} hides a type", self.i - 1)
                self.types.add(name)  # a type inside this template (dropped after it)
                default: Expr | Type | None = self.type_() if self.accept("=") else None
                out.append(TemplateParam(line, "class", name, default))
            else:
                ty = self.type_()
                if ty.text not in ("int", "unsigned", "bool", "long", "short", "size_t"):
                    raise self.error(f"template parameter of type {ty.text}")
                name = self.ident("a template parameter name")
                default = None
                if self.accept("="):
                    outer, self.no_gt = self.no_gt, True
                    default = self.cond()
                    self.no_gt = outer
                out.append(TemplateParam(line, "int", name, default))
            if not self.accept(","):
                break
        self.close_angle()
        return tuple(out)

    def function_or_decl(self, line: int, tparams: tuple[TemplateParam, ...]) -> Function | Decl:
        quals = self.qualifiers()
        ty = self.type_()
        quals += self.qualifiers()  # `void __launch_bounds__(..) amk_megakernel(..)`
        if self.texts[self.i + 1] == "(" or (tparams and self.kinds[self.i] == "id"):
            name = self.ident("a function name")
            if tparams:
                self.template_funcs.add(name)
            f = self.function(line, name, ty, quals, tparams)
            for tp in tparams:
                if tp.kind == "class":
                    self.types.discard(tp.name)
            return f
        if tparams:
            raise self.error("a template that is not a function")
        return self.declaration(line, ty, quals)

    def function(
        self,
        line: int,
        name: str,
        ret: Type,
        quals: list[str],
        tparams: tuple[TemplateParam, ...] = (),
    ) -> Function:
        params = self.params()
        body = None
        end = 0
        if self.accept(";"):
            pass
        else:
            if self.tok != "{":
                raise self.error(f"expected the body of {name}")
            body = self.block()
            end = self.lines[self.i - 1]
        f = Function(line, name, ret, params, body, tparams, tuple(quals), end)
        self.functions.append(f)
        return f

    def using(self) -> Using:
        line = self.expect("using")
        name = self.ident("a type name")
        self.expect("=")
        ty = self.type_()
        self.expect(";")
        self.types.add(name)
        return Using(line, name, ty)

    def struct(self) -> Struct:
        line = self.expect("struct")
        name = self.ident("a struct name")
        self.types.add(name)
        self.expect("{")
        fields: list[Decl] = []
        methods: list[Function] = []
        while self.tok != "}":
            if self.kinds[self.i] == "eof":
                raise ParseError(f"kernel.cu line {line}: struct {name} is never closed")
            self.refuse()
            mline = self.line
            quals = self.qualifiers()
            ty = self.type_()
            if self.texts[self.i + 1] == "(":
                method = self.ident("a method name")
                methods.append(self.function(mline, f"{name}::{method}", ty, quals))
            else:
                fields.append(self.declaration(mline, ty, quals))
        self.i += 1
        self.expect(";")
        return Struct(line, name, tuple(fields), tuple(methods))

    def enum(self) -> Enum:
        line = self.expect("enum")
        self.accept("class")
        name = self.ident("an enum name") if self.kinds[self.i] == "id" else ""
        base = self.type_() if self.accept(":") else None
        if name:
            self.types.add(name)
        self.expect("{")
        members: list[tuple[str, Expr | None]] = []
        while self.tok != "}":
            member = self.ident("an enumerator")
            members.append((member, self.assign() if self.accept("=") else None))
            if not self.accept(","):
                break
        self.expect("}")
        self.expect(";")
        return Enum(line, name, tuple(members), base)
