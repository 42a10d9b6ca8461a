"""Frontend (a): torch.export of the reference model on the `meta` device -> IR graph.

The decode step is exported in three pieces (prologue: embedding, RoPE tables and mask; one
decoder layer; epilogue: final norm, LM head, argmax) with symbolic batch `B` and cache
capacity `S`. The layer graph is instantiated once per layer with that layer's weight names,
so a 70B graph builds in seconds and never holds a weight: every parameter is a meta tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind

from compiler.ir.graph import Graph, GraphBuilder, IRError, Shape
from compiler.ir.ops import DType, Op
from compiler.reference import Reference, rope_inv_freq
from compiler.spec import ModelSpec

DTYPES = {
    torch.float64: DType.F64,
    torch.float32: DType.F32,
    torch.bfloat16: DType.BF16,
    torch.float16: DType.F16,
    torch.int64: DType.I64,
    torch.int32: DType.I32,
    torch.bool: DType.BOOL,
}
aten = torch.ops.aten
INT_MAX = 2**63 - 1


class _Prologue(nn.Module):
    def __init__(self, ref: Reference):
        super().__init__()
        self.ref = ref

    def forward(self, token: Tensor, pos: Tensor, k_cache: Tensor) -> tuple[Tensor, ...]:
        return self.ref.prologue(token[:, None], pos, k_cache.shape[2])


class _Epilogue(nn.Module):
    def __init__(self, ref: Reference):
        super().__init__()
        self.ref = ref

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.ref.epilogue(x)[:, 0]  # [B, V]
        return torch.argmax(logits, dim=-1), logits


class _Converter:
    """Turns one ExportedProgram into nodes of a shared GraphBuilder."""

    def __init__(self, gb: GraphBuilder, ep: ExportedProgram, symbols: Mapping[str, str]):
        self.gb, self.ep, self.symbols = gb, ep, symbols
        self.env: dict[str, Any] = {}  # fx node name -> IR node id, or a python value

    def shape(self, fx: torch.fx.Node) -> Shape:
        return tuple(self.dim(d) for d in fx.meta["val"].shape)

    def dim(self, d: Any) -> int | str:
        if isinstance(d, int):
            return d
        key = str(d.node.expr)
        if key not in self.symbols:
            raise IRError(f"torch.export produced a symbolic size {key} that is not B or S")
        return self.symbols[key]

    def dtype(self, fx: torch.fx.Node) -> DType:
        return DTYPES[fx.meta["val"].dtype]

    def arg(self, a: Any, like: torch.fx.Node | None = None) -> int:
        """IR node for an argument: an fx node, or a python scalar made a CONST."""
        if isinstance(a, torch.fx.Node):
            v = self.env[a.name]
            if not isinstance(v, int):
                raise IRError(f"symbolic size {a.name} used as a tensor")
            return v
        if isinstance(a, bool):
            return self.gb.const(a, (), DType.BOOL)
        if isinstance(a, int):
            return self.gb.const(a, (), DType.I64)
        if isinstance(a, float):
            dt = self.dtype(like) if like is not None and self.dtype(like).is_float else DType.F32
            return self.gb.const(a, (), dt)
        raise IRError(f"unsupported argument {a!r}")

    def run(
        self, leaves: Mapping[str, int], params: Mapping[str, str], constants: Mapping[str, Tensor]
    ) -> list[int]:
        """Convert; `leaves` maps user-input positions (as str) to IR ids, `params` FQN -> weight name."""
        specs = {s.arg.name: s for s in self.ep.graph_signature.input_specs}
        user = 0
        for fx in self.ep.graph.nodes:
            if fx.op == "placeholder":
                spec = specs[fx.name]
                if spec.kind is InputKind.PARAMETER:
                    name = params[spec.target]
                    self.env[fx.name] = self.gb.add(
                        Op.WEIGHT, (), self.shape(fx), self.dtype(fx), name=name
                    )
                elif spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                    value = constants[spec.target]
                    self.env[fx.name] = self.gb.const(
                        value.flatten().tolist(), tuple(value.shape), DTYPES[value.dtype]
                    )
                else:
                    self.env[fx.name] = leaves[str(user)]
                    user += 1
            elif fx.op == "call_function":
                self.env[fx.name] = self.call(fx)
            elif fx.op == "output":
                return [self.env[a.name] for a in fx.args[0]]
        raise IRError("exported program has no output")

    def call(self, fx: torch.fx.Node) -> Any:
        rule = RULES.get(fx.target)
        if rule is None:
            raise IRError(f"torch.export frontend: unsupported op {fx.target}")
        return rule(self, fx, *fx.args)

    def add(self, op: Op, fx: torch.fx.Node, inputs: list[int], **attrs: Any) -> int:
        return self.gb.add(op, inputs, self.shape(fx), self.dtype(fx), **attrs)


def _binary(op: Op) -> Callable[..., int]:
    def rule(c: _Converter, fx: torch.fx.Node, a: Any, b: Any, *rest: Any) -> int:
        like = a if isinstance(a, torch.fx.Node) else b
        return c.add(op, fx, [c.arg(a, like), c.arg(b, like)])

    return rule


def _unary(op: Op) -> Callable[..., int]:
    return lambda c, fx, a, *rest: c.add(op, fx, [c.arg(a)])


def _same(c: _Converter, fx: torch.fx.Node, a: Any, *rest: Any) -> int:
    return c.arg(a)


def _cast(c: _Converter, fx: torch.fx.Node, a: Any, *rest: Any) -> int:
    src = c.arg(a)
    if c.gb.nodes[src].dtype is c.dtype(fx):
        return src
    return c.add(Op.CAST, fx, [src])


def _reshape(c: _Converter, fx: torch.fx.Node, a: Any, *rest: Any) -> int:
    src = c.arg(a)
    if c.gb.nodes[src].shape == c.shape(fx):
        return src
    return c.add(Op.RESHAPE, fx, [src])


def _expand(c: _Converter, fx: torch.fx.Node, a: Any, *rest: Any) -> int:
    src = c.arg(a)
    return src if c.gb.nodes[src].shape == c.shape(fx) else c.add(Op.EXPAND, fx, [src])


def _transpose(c: _Converter, fx: torch.fx.Node, a: Any, d0: int = 0, d1: int = 1) -> int:
    rank = len(c.shape(fx))
    perm = list(range(rank))
    perm[d0 % rank], perm[d1 % rank] = perm[d1 % rank], perm[d0 % rank]
    return c.add(Op.TRANSPOSE, fx, [c.arg(a)], perm=perm)


def _linear(c: _Converter, fx: torch.fx.Node, x: Any, w: Any, bias: Any = None) -> int:
    if bias is not None:
        raise IRError("linear with bias is not a LLaMA op")
    wid = c.arg(w)
    wn = c.gb.nodes[wid]
    wt = c.gb.add(Op.TRANSPOSE, [wid], (wn.shape[1], wn.shape[0]), wn.dtype, perm=[1, 0])
    return c.add(Op.MATMUL, fx, [c.arg(x), wt])


def _slice(
    c: _Converter,
    fx: torch.fx.Node,
    a: Any,
    dim: int = 0,
    start: Any = None,
    end: Any = None,
    step: int = 1,
) -> int:
    src = c.arg(a)
    if c.gb.nodes[src].shape == c.shape(fx):
        return src
    if not all(v is None or isinstance(v, int) for v in (start, end)):
        raise IRError("slice with symbolic bounds")
    stop = None if end is None or end >= INT_MAX else end
    return c.add(Op.SLICE, fx, [src], axis=dim, start=start or 0, stop=stop, step=step)


def _reduce(op: Op) -> Callable[..., int]:
    def rule(
        c: _Converter, fx: torch.fx.Node, a: Any, dims: Any, keepdim: bool = False, **_: Any
    ) -> int:
        return c.add(op, fx, [c.arg(a)], axes=list(dims), keepdim=keepdim)

    return rule


def _argmax(c: _Converter, fx: torch.fx.Node, a: Any, dim: int, keepdim: bool = False) -> int:
    return c.add(Op.ARGMAX, fx, [c.arg(a)], axis=dim, keepdim=keepdim)


def _softmax(c: _Converter, fx: torch.fx.Node, a: Any, dim: int, *rest: Any) -> int:
    return c.add(Op.SOFTMAX, fx, [c.arg(a)], axis=dim)


def _cat(c: _Converter, fx: torch.fx.Node, xs: list[Any], dim: int = 0) -> int:
    return c.add(Op.CONCAT, fx, [c.arg(x) for x in xs], axis=dim)


def _embedding(c: _Converter, fx: torch.fx.Node, w: Any, idx: Any, *rest: Any) -> int:
    return c.add(Op.GATHER, fx, [c.arg(w), c.arg(idx)], axis=0)


def _select(c: _Converter, fx: torch.fx.Node, a: Any, dim: int, index: int) -> int:
    return c.add(Op.GATHER, fx, [c.arg(a), c.gb.const(index, (), DType.I64)], axis=dim)


def _index_copy(c: _Converter, fx: torch.fx.Node, dst: Any, dim: int, idx: Any, src: Any) -> int:
    return c.add(Op.INDEX_COPY, fx, [c.arg(dst), c.arg(idx), c.arg(src)], axis=dim)


def _masked_fill(c: _Converter, fx: torch.fx.Node, a: Any, mask: Any, value: Any) -> int:
    return c.add(Op.WHERE, fx, [c.arg(mask), c.arg(value, a), c.arg(a)])


def _arange(c: _Converter, fx: torch.fx.Node, *args: Any, **_: Any) -> int:
    start, step = (0, 1) if len(args) == 1 else (args[0], args[2] if len(args) > 2 else 1)
    if not isinstance(start, int) or not isinstance(step, int):
        raise IRError("arange with symbolic start or step")
    return c.add(Op.ARANGE, fx, [], start=start, step=step)


def _sym_size(c: _Converter, fx: torch.fx.Node, a: Any, dim: int) -> tuple[str, int | str]:
    return ("size", c.dim(fx.meta["val"]))  # only shapes use it; never an IR node


def _pow(c: _Converter, fx: torch.fx.Node, a: Any, e: Any) -> int:
    return c.add(Op.POW, fx, [c.arg(a), c.arg(float(e), a)])


RULES: dict[Any, Callable[..., Any]] = {
    aten.add.Tensor: _binary(Op.ADD),
    aten.sub.Tensor: _binary(Op.SUB),
    aten.mul.Tensor: _binary(Op.MUL),
    aten.div.Tensor: _binary(Op.DIV),
    aten.le.Tensor: _binary(Op.LE),
    aten.lt.Tensor: _binary(Op.LT),
    aten.gt.Tensor: _binary(Op.GT),
    aten.ge.Tensor: _binary(Op.GE),
    aten.eq.Tensor: _binary(Op.EQ),
    aten.bitwise_and.Tensor: _binary(Op.AND),
    aten.logical_and.default: _binary(Op.AND),
    aten.bitwise_or.Tensor: _binary(Op.OR),
    aten.__and__.Tensor: _binary(Op.AND),
    aten.__or__.Tensor: _binary(Op.OR),
    aten.pow.Tensor_Scalar: _pow,
    aten.neg.default: _unary(Op.NEG),
    aten.rsqrt.default: _unary(Op.RSQRT),
    aten.sqrt.default: _unary(Op.SQRT),
    aten.reciprocal.default: _unary(Op.RECIPROCAL),
    aten.exp.default: _unary(Op.EXP),
    aten.sin.default: _unary(Op.SIN),
    aten.cos.default: _unary(Op.COS),
    aten.sigmoid.default: _unary(Op.SIGMOID),
    aten.silu.default: _unary(Op.SILU),
    aten.bitwise_not.default: _unary(Op.NOT),
    aten.logical_not.default: _unary(Op.NOT),
    aten.to.dtype: _cast,
    aten._to_copy.default: _cast,
    aten.to.dtype_layout: _cast,
    aten.view.default: _reshape,
    aten.reshape.default: _reshape,
    aten.unsqueeze.default: _reshape,
    aten.squeeze.dim: _reshape,
    aten.expand.default: _expand,
    aten.transpose.int: _transpose,
    aten.t.default: lambda c, fx, a: _transpose(c, fx, a, 0, 1),
    aten.linear.default: _linear,
    aten.matmul.default: _binary(Op.MATMUL),
    aten.slice.Tensor: _slice,
    aten.cat.default: _cat,
    aten.select.int: _select,
    aten.mean.dim: _reduce(Op.MEAN),
    aten.sum.dim_IntList: _reduce(Op.SUM),
    aten.argmax.default: _argmax,
    aten.softmax.int: _softmax,
    aten._softmax.default: _softmax,
    aten.embedding.default: _embedding,
    aten.index_copy.default: _index_copy,
    aten.masked_fill.Scalar: _masked_fill,
    aten.arange.default: _arange,
    aten.arange.start: _arange,
    aten.arange.start_step: _arange,
    aten.sym_size.int: _sym_size,
    aten.lift_fresh_copy.default: _same,
    aten.contiguous.default: _same,
    aten.clone.default: _same,
    aten._assert_tensor_metadata.default: lambda c, fx, *a, **k: None,
}


def _export(mod: nn.Module, args: tuple[Any, ...], dynamic: tuple[Any, ...]) -> ExportedProgram:
    """torch.export with named dims B and S; where this torch cannot prove a guard that holds
    for every size (torch 2.11: `Min(64*S, 128*S) == 64*S`), again with `Dim.AUTO` in the same
    places, which records the guard instead of refusing it. `symbols` below then checks that
    B and S stayed symbolic."""
    try:
        return torch.export.export(mod, args, dynamic_shapes=dynamic, strict=False)
    except torch._dynamo.exc.UserError as e:
        auto = getattr(Dim, "AUTO", None)
        if auto is None or "Constraints violated" not in str(e):
            raise
    loose = tuple(None if d is None else dict.fromkeys(d, auto) for d in dynamic)
    return torch.export.export(mod, args, dynamic_shapes=loose, strict=False)


def graph_from_spec(spec: ModelSpec, dtype: torch.dtype = torch.bfloat16) -> Graph:
    """The decode-step graph of `spec`, symbolic in batch B and cache capacity S.

    Inputs: `token` [B] i64, `pos` [] i64, `k_cache.{l}` and `v_cache.{l}` [B, KV, S, D].
    Outputs: `next_token` [B], `logits` [B, V], then `k_cache.{l}`, `v_cache.{l}` updated.
    """
    one = dataclasses.replace(spec, num_layers=1)
    b_, s_ = 2, 16  # example sizes; exported symbolically
    with torch.device("meta"):
        ref = Reference(one, s_, dtype=dtype, device="meta")
    consts = {"ref.inv_freq": rope_inv_freq(spec), "inv_freq": rope_inv_freq(spec)}
    kv = (spec.num_kv_heads, spec.head_dim)
    bd, sd = Dim("B", min=1, max=4096), Dim("S", min=2, max=1 << 22)

    def meta(*shape: int, dt: torch.dtype = dtype) -> Tensor:
        return torch.empty(shape, dtype=dt, device="meta")

    tok, pos, cache = meta(b_, dt=torch.int64), meta(dt=torch.int64), meta(b_, kv[0], s_, kv[1])
    pro = _export(_Prologue(ref), (tok, pos, cache), ({0: bd}, None, {0: bd, 2: sd}))
    x, cos, sin, mask, positions = (
        meta(b_, 1, spec.hidden_size),
        meta(1, spec.head_dim),
        meta(1, spec.head_dim),
        meta(1, s_, dt=torch.bool),
        meta(1, dt=torch.int64),
    )
    k, v = meta(b_, kv[0], s_, kv[1]), meta(b_, kv[0], s_, kv[1])  # distinct: export dedups aliases
    layer = _export(
        ref.model.layers[0],
        (x, cos, sin, mask, positions, k, v),
        ({0: bd}, None, None, {1: sd}, None, {0: bd, 2: sd}, {0: bd, 2: sd}),
    )
    epi = _export(_Epilogue(ref), (x,), ({0: bd},))

    gb = GraphBuilder()
    cshape = ("B", kv[0], "S", kv[1])
    token = gb.add(Op.INPUT, (), ("B",), DType.I64, name="token")
    pos_id = gb.add(Op.INPUT, (), (), DType.I64, name="pos")
    ks = [
        gb.add(Op.INPUT, (), cshape, DTYPES[dtype], name=f"k_cache.{i}")
        for i in range(spec.num_layers)
    ]
    vs = [
        gb.add(Op.INPUT, (), cshape, DTYPES[dtype], name=f"v_cache.{i}")
        for i in range(spec.num_layers)
    ]

    def symbols(ep: ExportedProgram, where: list[tuple[int, int, str]]) -> dict[str, str]:
        user = [n for n in ep.graph.nodes if n.op == "placeholder"][
            -len(ep.graph_signature.user_inputs) :
        ]
        sizes = [(user[i].meta["val"].shape[d], sym) for i, d, sym in where]
        for size, sym in sizes:
            if not isinstance(size, torch.SymInt):
                raise IRError(f"torch.export specialized {sym} to {size}")
        return {str(size.node.expr): sym for size, sym in sizes}

    def params(ep: ExportedProgram, prefix: str) -> dict[str, str]:
        fqns = ep.graph_signature.parameters
        return {f: prefix + f.removeprefix("ref.") for f in fqns}

    psym = symbols(pro, [(0, 0, "B"), (2, 2, "S")])
    h, cos_i, sin_i, mask_i, positions_i = _Converter(gb, pro, psym).run(
        {"0": token, "1": pos_id, "2": ks[0]}, params(pro, ""), consts
    )
    lsym = symbols(layer, [(0, 0, "B"), (3, 1, "S")])
    for i in range(spec.num_layers):
        h, ks[i], vs[i] = _Converter(gb, layer, lsym).run(
            {"0": h, "1": cos_i, "2": sin_i, "3": mask_i, "4": positions_i, "5": ks[i], "6": vs[i]},
            params(layer, f"model.layers.{i}."),
            consts,
        )
    nxt, logits = _Converter(gb, epi, symbols(epi, [(0, 0, "B")])).run(
        {"0": h}, params(epi, ""), consts
    )
    gb.output("next_token", nxt)
    gb.output("logits", logits)
    for i in range(spec.num_layers):
        gb.output(f"k_cache.{i}", ks[i])
        gb.output(f"v_cache.{i}", vs[i])
    return gb.build().pruned()
