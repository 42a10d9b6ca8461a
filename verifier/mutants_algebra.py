"""Planted bugs for the algebra classes: (f) edits of fused.json and kernel.cu's RoPE table,
(e) an attention instruction pointed at another layer's cache, and (a) bugs in the fusion
rules themselves (`RULE_MUTANTS`: a compiler pass wrapped so that every instruction it makes
is wrong the same way; `patched_rule` installs one while the verifier runs).

fused.json operators get the parsed fused graph (a dict, edited in place) and return a short
description of the edit, or None where the artifact offers no place for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from compiler.ir.fused import Instr
from verifier.mutate import Mutant, _kernel

Doc = dict[str, Any]


def _instr(doc: Doc, kind: str, layer: int) -> dict[str, Any] | None:
    return next((i for i in doc["instrs"] if i["kind"] == kind and i["layer"] == layer), None)


def _operand(kind: str, layer: int, slot: int, to: str) -> Callable[[Doc], str | None]:
    def edit(doc: Doc) -> str | None:
        i = _instr(doc, kind, layer)
        if i is None or slot >= len(i["inputs"]) or i["inputs"][slot] == to:
            return None
        was, i["inputs"][slot] = i["inputs"][slot], to
        return f"fused.json: {kind} of layer {layer} reads {to} instead of {was}"

    return edit


def _swap(kind: str, layer: int, a: int, b: int) -> Callable[[Doc], str | None]:
    def edit(doc: Doc) -> str | None:
        i = _instr(doc, kind, layer)
        if i is None:
            return None
        i["inputs"][a], i["inputs"][b] = i["inputs"][b], i["inputs"][a]
        return f"fused.json: {kind} of layer {layer}: operands {a} and {b} swapped"

    return edit


def _eps(kind: str, layer: int, factor: float) -> Callable[[Doc], str | None]:
    def edit(doc: Doc) -> str | None:
        i = _instr(doc, kind, layer)
        if i is None or "eps" not in i["attrs"]:
            return None
        i["attrs"]["eps"] *= factor
        return f"fused.json: {kind} of layer {layer}: eps x{factor}"

    return edit


def _rope_shift(doc: Doc) -> str | None:
    buf = next((b for b in doc["buffers"] if b["name"] == "rope_inv_freq"), None)
    if buf is None or len(buf.get("value", ())) < 2:
        return None
    buf["value"] = [*buf["value"][1:], buf["value"][-1]]
    return "fused.json: RoPE frequencies shifted by one index"


L0, L1 = "model.layers.0.", "model.layers.1."
F = "fused.json"
MUTANTS: tuple[Mutant, ...] = (
    Mutant("SiLU on up (gate and up swapped)", "f", _swap("gate_up_silu", 0, 2, 3), F),
    Mutant("Q and K projections swapped", "f", _swap("qkv_rope_append", 0, 2, 3), F),
    Mutant("RMSNorm eps x10", "f", _eps("qkv_rope_append", 0, 10.0), F),
    Mutant("RoPE frequency index off by one", "f", _rope_shift, F),
    Mutant("residual from the wrong buffer", "f", _operand("oproj_residual", 1, 2, "attn"), F),
    Mutant(
        "QKV of layer 1 with layer 0's q_proj",
        "f",
        _operand("qkv_rope_append", 1, 2, L0 + "self_attn.q_proj.weight"),
        F,
    ),
    Mutant(
        "MLP norm with the attention norm's gamma",
        "f",
        _operand("gate_up_silu", 0, 1, L0 + "input_layernorm.weight"),
        F,
    ),
    Mutant(
        "final norm replaced by a layer's norm",
        "f",
        _operand("lmhead_argmax", -1, 1, L1 + "post_attention_layernorm.weight"),
        F,
    ),
    Mutant("embedding from the LM head", "f", _operand("embed", -1, 1, "lm_head.weight"), F),
    Mutant(
        "kernel.cu: a RoPE frequency changed",
        "f",
        _kernel(
            r"(INV_FREQ\[D / 2\] = \{\n  )([^,]+),",
            lambda m: f"{m.group(1)}5e-01f,",
            "INV_FREQ[0] = 0.5",
        ),
        "kernel.cu",
    ),
    Mutant(
        "attention of layer 1 reads layer 0's keys",
        "e",
        _operand("attn_partial", 1, 1, "k_cache.0"),
        F,
    ),
)


@dataclass(frozen=True)
class RuleMutant:
    name: str
    rule: str  # the compiler pass (compiler.passes.PASSES) it breaks
    edit: Callable[[Instr], Instr]


def _rule_swap(a: int, b: int) -> Callable[[Instr], Instr]:
    def edit(i: Instr) -> Instr:
        ins = list(i.inputs)
        ins[a], ins[b] = ins[b], ins[a]
        return dataclasses.replace(i, inputs=tuple(ins))

    return edit


def _rule_eps(factor: float) -> Callable[[Instr], Instr]:
    def edit(i: Instr) -> Instr:
        attrs = tuple((k, v * factor if k == "eps" else v) for k, v in i.attrs)
        return dataclasses.replace(i, attrs=attrs)

    return edit


def _rule_operand(slot: int, suffix: str) -> Callable[[Instr], Instr]:
    def edit(i: Instr) -> Instr:
        ins = list(i.inputs)
        ins[slot] = f"model.layers.{max(i.layer, 0)}.{suffix}"
        return dataclasses.replace(i, inputs=tuple(ins))

    return edit


RULE_MUTANTS: tuple[RuleMutant, ...] = (
    RuleMutant("rule: SiLU on up", "gate_up_silu", _rule_swap(2, 3)),
    RuleMutant("rule: eps scaled", "qkv_rope_append", _rule_eps(100.0)),
    RuleMutant("rule: V read through the K projection", "qkv_rope_append", _rule_swap(3, 4)),
    RuleMutant(
        "rule: final norm is the last layer's MLP norm",
        "lm_head_argmax",
        _rule_operand(1, "post_attention_layernorm.weight"),
    ),
    RuleMutant("rule: o-projection residual from attn", "oproj_residual", _rule_swap(0, 2)),
)


@contextlib.contextmanager
def patched_rule(m: RuleMutant) -> Iterator[None]:
    """Run with the pass `m.rule` replaced by one whose instructions `m.edit` breaks."""
    from compiler import passes
    from verifier import rules

    at = next(i for i, (name, _) in enumerate(passes.PASSES) if name == m.rule)
    name, run = passes.PASSES[at]

    def broken(f: Any) -> Any:
        before = len(f.steps)
        out = run(f)
        steps = list(out.steps)
        for k in range(before, len(steps)):
            steps[k] = dataclasses.replace(steps[k], instr=m.edit(steps[k].instr))
        return dataclasses.replace(out, steps=tuple(steps))

    passes.PASSES[at] = (name, broken)
    rules.forget()
    try:
        yield
    finally:
        passes.PASSES[at] = (name, run)
        rules.forget()
