"""Which array each pointer field of kernel.cu's `Params` is, for the symbolic executor.

The launch fills `Params` field by field (compiler/codegen/params.py's layout; sizeof(Params) is
checked by the compiler's static_assert): a field named like a FusedGraph buffer holds that
buffer (`p.x` is x), `p.embed_tokens`, `p.norm` hold the weights model.<field>.weight,
`p.lm_head` the LM head (the embedding table when tied), and a field of `p.layers[l]` holds
layer l's weight whose name ends in `.<field>.weight`, or its cache `<field>.<l>`. Arrays are
named by role (`verifier.fused_terms.role`), so a task's own layer drops out of every term.
Field element types come from the Params and Layer structs of kernel.cu.
"""

from __future__ import annotations

from compiler.ir.fused import FusedGraph
from verifier.device.kernel import Kernel
from verifier.device.values import Ptr, Unsupported
from verifier.fused_terms import role
from verifier.graph_terms import unflatten
from verifier.model import Geometry
from verifier.terms import Aff, Ranges

ELEM = {"float*": "float", "__nv_bfloat16*": "bf16", "long long*": "i64"}


class Binding:
    def __init__(self, kernel: Kernel, fused: FusedGraph, g: Geometry, layer: int, ranges: Ranges):
        self.k, self.fused, self.layer, self.ranges = kernel, fused, layer, ranges
        sizes = {"B": g.B, "S": g.S, "P": g.P, "KS": g.KS, "NT": g.NT}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.names: dict[str, str] = {}  # role -> FusedGraph name
        for b in fused.buffers:
            self._add(b.name, tuple(d if isinstance(d, int) else sizes[d] for d in b.shape))
        for w, shape in fused.weights:
            self._add(w, tuple(int(d) for d in shape))
        self.params = dict(kernel.struct_fields("Params"))
        self.layer_fields = dict(kernel.struct_fields("Layer")) if "Layer" in kernel.structs else {}

    def _add(self, name: str, shape: tuple[int, ...]) -> None:
        r = role(name, self.layer)  # other layers' arrays keep their number
        self.shapes[r], self.names[r] = shape, name

    def fused_name(self, field: str, offset: int) -> str:
        weights = {w for w, _ in self.fused.weights}
        buffers = {b.name for b in self.fused.buffers}
        if offset == -1:
            for cand in (field, f"model.{field}.weight", f"{field}.weight"):
                if cand in buffers or cand in weights:
                    return cand
            if field == "lm_head" and self.fused.dim("tied"):
                return "model.embed_tokens.weight"
            raise Unsupported(f"p.{field} binds no buffer or weight of fused.json")
        layer = self.layer + offset
        if field in ("k_cache", "v_cache"):
            return f"{field}.{layer}"
        prefix = f"model.layers.{layer}."
        fits = [w for w in weights if w.startswith(prefix) and w.endswith(f".{field}.weight")]
        if len(fits) != 1:
            raise Unsupported(f"p.layers[l].{field} binds no single weight of layer {layer}")
        return fits[0]

    def pointer(self, field: str, offset: int) -> Ptr:
        """`p.<field>` (offset -1) or `p.layers[task layer + offset].<field>`."""
        types = self.params if offset == -1 else self.layer_fields
        if field not in types:
            raise Unsupported(f"{'Params' if offset == -1 else 'Layer'} has no field {field}")
        elem = ELEM.get(self.k.base_type(types[field]))
        if elem is None:
            raise Unsupported(f"p.{field} is not a pointer to float, bf16 or i64")
        name = self.fused_name(field, offset)
        r = role(name, self.layer)
        if r not in self.shapes:
            raise Unsupported(f"fused.json has no array {name}")
        return Ptr(r, elem, Aff(0), elem)

    def element(self, array: str, offset: Aff) -> tuple[Aff, ...]:
        """The index tuple of flat element `offset` of `array` (row-major)."""
        return unflatten(offset, self.shapes[array], self.ranges)
