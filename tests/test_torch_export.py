"""torch.export frontend: the graph evaluates to the reference model, symbolically in B and S."""

import dataclasses

import numpy as np
import pytest
import torch

from amk_farm import catalog
from compiler.frontend.torch_export import graph_from_spec
from compiler.ir import Graph, Op, evaluate, well_formed
from compiler.reference import DecodeStep, Reference
from compiler.spec import ModelSpec, RopeScaling


@pytest.fixture(scope="module")
def graphs() -> dict[str, Graph]:
    return {name: graph_from_spec(catalog.resolve(name)) for name in ("tiny-llama", "tiny-mistral")}


def random_reference(spec: ModelSpec, max_seq: int, seed: int) -> Reference:
    torch.manual_seed(seed)
    ref = Reference(spec, max_seq)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, p.shape[-1] ** -0.5 if p.dim() == 2 and "embed" not in name else 1.0)
    return ref


def run_both(graph: Graph, ref: Reference, batch: int, pos: int, seed: int):
    spec = ref.spec
    gen = torch.Generator().manual_seed(seed)
    ks, vs = ref.empty_cache(batch)
    for c in ks + vs:
        c.copy_(torch.randn(c.shape, generator=gen, dtype=c.dtype))
    token = torch.randint(0, spec.vocab_size, (batch,), generator=gen)
    with torch.no_grad():
        want = DecodeStep(ref)(
            token, torch.tensor(pos), *[c for kv in zip(ks, vs, strict=True) for c in kv]
        )
    inputs = {"token": token, "pos": torch.tensor(pos)}
    for i in range(spec.num_layers):
        inputs[f"k_cache.{i}"], inputs[f"v_cache.{i}"] = ks[i], vs[i]
    got = evaluate(graph, inputs, dict(ref.state_dict()))
    return got, want


def test_graph_is_well_formed_and_symbolic(graphs):
    for g in graphs.values():
        well_formed(g)
        names = {n.name: n for n in g.nodes if n.op is Op.INPUT}
        assert names["token"].shape == ("B",)
        assert names["k_cache.1"].shape == ("B", 2, "S", 64)
        assert [o for o, _ in g.outputs][:2] == ["next_token", "logits"]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral"])
@pytest.mark.parametrize(("batch", "max_seq", "pos"), [(1, 8, 0), (1, 32, 20), (4, 32, 31)])
def test_graph_evaluates_to_reference(graphs, name, batch, max_seq, pos):
    spec = catalog.resolve(name)
    ref = random_reference(spec, max_seq, seed=batch + pos)
    got, want = run_both(graphs[name], ref, batch, pos, seed=pos)
    assert got["next_token"].tolist() == want[0].tolist()
    np.testing.assert_allclose(got["logits"], want[1].numpy(), rtol=1e-12, atol=1e-12)
    for i in range(spec.num_layers):
        np.testing.assert_allclose(
            got[f"k_cache.{i}"], want[2 + 2 * i].numpy(), rtol=1e-12, atol=1e-12
        )
        np.testing.assert_allclose(
            got[f"v_cache.{i}"], want[3 + 2 * i].numpy(), rtol=1e-12, atol=1e-12
        )


def test_sliding_window_is_in_the_graph(graphs):
    """Past the window, an old cache slot must not change mistral's logits (it must for llama)."""
    spec = catalog.resolve("tiny-mistral")
    ref = random_reference(spec, 32, seed=3)
    got, _ = run_both(graphs["tiny-mistral"], ref, 1, 30, seed=1)
    assert spec.sliding_window == 16
    ks, vs = ref.empty_cache(1)
    gen = torch.Generator().manual_seed(1)
    for c in ks + vs:
        c.copy_(torch.randn(c.shape, generator=gen, dtype=c.dtype))
    token = torch.randint(0, spec.vocab_size, (1,), generator=gen)
    inputs = {"token": token, "pos": torch.tensor(30)}
    for i in range(spec.num_layers):
        ks[i][:, :, 5] += 10.0  # position 5 < 30 - 16 + 1: outside the window
        inputs[f"k_cache.{i}"], inputs[f"v_cache.{i}"] = ks[i], vs[i]
    moved = evaluate(graphs["tiny-mistral"], inputs, dict(ref.state_dict()))
    np.testing.assert_allclose(moved["logits"], got["logits"], rtol=1e-13)


def test_model_hash_is_deterministic_and_weight_free(graphs):
    spec = catalog.resolve("tiny-llama")
    again = graph_from_spec(spec)
    assert again.digest() == graphs["tiny-llama"].digest()
    assert graph_from_spec(spec.with_name("other")).digest() == again.digest()
    assert all(
        "value" not in dict(n.attrs) or len(n.attr("value")) <= spec.head_dim for n in again.nodes
    )


ARCH_CHANGES = {
    "hidden_size": 384,
    "intermediate_size": 640,
    "num_layers": 3,
    "num_heads": 8,
    "num_kv_heads": 4,
    "head_dim": 32,
    "vocab_size": 500,
    "rms_norm_eps": 1e-6,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "rope_scaling": RopeScaling(8.0, 1.0, 4.0, 128),
}


@pytest.mark.parametrize("field", sorted(ARCH_CHANGES))
def test_every_architectural_field_changes_the_hash(graphs, field):
    spec = catalog.resolve("tiny-llama")
    changed = dataclasses.replace(spec, **{field: ARCH_CHANGES[field]})
    assert graph_from_spec(changed).digest() != graphs["tiny-llama"].digest()


def test_sliding_window_and_arch_change_the_hash(graphs):
    mistral = catalog.resolve("tiny-mistral")
    assert graphs["tiny-mistral"].digest() != graphs["tiny-llama"].digest()
    wider = dataclasses.replace(mistral, sliding_window=32)
    assert graph_from_spec(wider).digest() != graphs["tiny-mistral"].digest()


def test_export_falls_back_to_auto_dims_where_torch_cannot_prove_a_guard(graphs, monkeypatch):
    """torch 2.11 refuses the named dims with 'Constraints violated (S)' on a guard that holds
    for every size; the frontend then exports with Dim.AUTO and must build the same graph."""
    from torch._dynamo.exc import UserError, UserErrorType
    from torch.export import Dim

    real = torch.export.export
    refused = []

    def picky(mod, args, dynamic_shapes=None, strict=False):
        if any(isinstance(v, Dim) for d in dynamic_shapes if d for v in d.values()):
            refused.append(type(mod).__name__)
            raise UserError(UserErrorType.CONSTRAINT_VIOLATION, "Constraints violated (S)!")
        return real(mod, args, dynamic_shapes=dynamic_shapes, strict=strict)

    monkeypatch.setattr(torch.export, "export", picky)
    g = graph_from_spec(catalog.resolve("tiny-llama"))
    assert len(refused) == 3  # prologue, the decoder layer, epilogue
    assert g.digest() == graphs["tiny-llama"].digest()


def test_export_errors_other_than_unprovable_guards_are_not_retried(monkeypatch):
    from torch._dynamo.exc import UserError, UserErrorType

    def broken(mod, args, dynamic_shapes=None, strict=False):
        raise UserError(UserErrorType.INVALID_INPUT, "something else")

    monkeypatch.setattr(torch.export, "export", broken)
    with pytest.raises(UserError, match="something else"):
        graph_from_spec(catalog.resolve("tiny-llama"))
