"""The GPU runtime: Params packing, the Session's bookkeeping, the kernel against PyTorch.

CPU tests run the Session over the CPU schedule interpreter (`device="cpu"`); `gpu` tests run
the compiled cubin on a CUDA device and are skipped without one (tests/conftest.py).

Prompts: tiny-llama's logits are bf16 in the reference and its vocabulary has 512 entries, so
exact ties and near-ties of the bf16 argmax are common (seen on about 1 step in 10 with random
prompts). The prompts below were chosen, on the CPU bf16 reference with synthetic seed 0, so
that no greedy choice over 33 steps is within 1% of a tie; on them any token difference is a
kernel bug, not rounding.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from amk_farm import catalog
from amk_farm.cli import app
from compiler.artifact import ArtifactError, read_manifest
from compiler.codegen.dims import kernel_dims
from compiler.codegen.params import params_layout
from compiler.pipeline import compile_model
from compiler.reference import Reference
from compiler.runtime.bench import StaticCacheStep
from compiler.runtime.check import (
    float32_check,
    float32_choices,
    forced_check,
    greedy_check,
    margin,
)
from compiler.runtime.launch import pack_params
from compiler.runtime.session import Session
from compiler.spec import ShapeTemplate

PROMPTS = [  # see the module docstring: torch.randint(0, 512, (1, 8)) with seeds 88, 35, 47, 1
    [472, 288, 463, 433, 362, 404, 101, 62],
    [201, 271, 492, 439, 33, 492, 447, 448],
    [135, 390, 327, 264, 72, 179, 336, 23],
    [37, 235, 396, 72, 255, 393, 203, 133],
]
STEPS = 32
# kernel logits vs a float32 reference from the same caches: bf16 weights and KV cache, fp32
# activations; the CPU interpreter's caches are rounded to bf16 too and land near 3e-4
FLOAT32_REL_TOL = 5e-3
BF16_REL_TOL = 3e-2  # kernel vs the bf16 reference (whose own rounding dominates)

gpu = pytest.mark.gpu


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """tiny-llama compiled for batch 1 and 4 (sm_90a; the cubin only if nvcc is on PATH).

    AMK_TEST_ARTIFACTS may name a directory holding them already compiled (`tiny-b1`,
    `tiny-b4`, template b{1,4}-s64), for GPU machines whose torch cannot run the frontend.
    """
    import os

    spec = catalog.resolve("tiny-llama")
    prebuilt = os.environ.get("AMK_TEST_ARTIFACTS")
    out = {}
    for b in (1, 4):
        if prebuilt:
            out[b] = Path(prebuilt) / f"tiny-b{b}"
            assert read_manifest(out[b]).template == f"b{b}-s64"
            continue
        d = tmp_path_factory.mktemp("art") / f"tiny-b{b}"
        compile_model(spec, ShapeTemplate.parse(f"b{b}-s64"), "sm_90a", d)
        out[b] = d
    return out


# ---- Params ------------------------------------------------------------------------------------


def test_pack_params_puts_each_pointer_at_its_offset_little_endian(artifacts):
    from compiler.ir.fused import FusedGraph

    fg = FusedGraph.loads((artifacts[1] / "fused.json").read_text())
    layout = params_layout(fg)
    ptrs = {f["name"]: 0x1000 * (i + 1) for i, f in enumerate(layout["fields"])}
    blob = pack_params(layout, ptrs)
    assert len(blob) == layout["size"] == 8 * len(layout["fields"])
    for f in layout["fields"]:
        got = int.from_bytes(blob[f["offset"] : f["offset"] + 8], "little")
        assert got == ptrs[f["name"]], f["name"]
    assert blob[:8] == (0x1000).to_bytes(8, "little")  # embed_tokens first


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p.pop("layers[1].v_cache"), "layers\\[1\\].v_cache has no pointer"),
        (lambda p: p.update(logits=0x1008), "logits: pointer 0x1008 is not 16-byte aligned"),
        (lambda p: p.update(token=0), "token: pointer 0x0"),
        (lambda p: p.update(bogus=0x2000), "no field 'bogus'"),
    ],
)
def test_pack_params_refuses_missing_misaligned_null_or_unknown_pointers(artifacts, edit, message):
    from compiler.ir.fused import FusedGraph

    layout = params_layout(FusedGraph.loads((artifacts[1] / "fused.json").read_text()))
    ptrs = {f["name"]: 0x1000 * (i + 1) for i, f in enumerate(layout["fields"])}
    edit(ptrs)
    with pytest.raises(ValueError, match=message):
        pack_params(layout, ptrs)


# ---- Session bookkeeping on the CPU (schedule interpreter) ---------------------------------------


@pytest.mark.parametrize(("batch", "per_launch"), [(1, 1), (4, 5)])
def test_cpu_session_greedy_tokens_match_reference(artifacts, batch, per_launch):
    s = Session(artifacts[batch], synthetic_seed=0, device="cpu")
    r = greedy_check(s, PROMPTS[:batch], 12, tokens_per_launch=per_launch)
    assert r.identical, (r.first_mismatch, r.ref_margin)
    assert r.logits_rel_err < BF16_REL_TOL
    assert s.pos == len(PROMPTS[0]) + 12
    assert s.step0 == 12


def test_cpu_session_logits_match_float32_reference(artifacts):
    s = Session(artifacts[1], synthetic_seed=0, device="cpu")
    errs = float32_check(s, PROMPTS[:1], 4)
    assert errs[0] < 1e-5  # first step: the same caches, the interpreter is float64
    assert max(errs) < FLOAT32_REL_TOL


def test_float32_choices_of_the_cpu_kernel_are_the_float32_argmax(artifacts):
    s = Session(artifacts[4], synthetic_seed=0, device="cpu")
    r = float32_choices(s, PROMPTS[:4], 3)
    assert r.steps == 12 and r.same + len(r.differ) == 12
    assert all(gap < 1e-2 for _, _, gap in r.differ)  # float64 kernel: at most a near-tie


def test_margin_is_the_closest_call_over_the_rows():
    logits = torch.tensor([[1.0, 4.0, 2.0], [10.0, 9.9, -1.0]])
    assert margin(logits) == pytest.approx(0.1 / 10.0, rel=1e-5)  # float32 logits
    assert margin(torch.tensor([[3.0, 3.0]])) == 0.0  # an exact tie


@pytest.mark.parametrize("batch", [1, 4])
def test_forced_check_accepts_the_cpu_kernel_and_catches_a_wrong_token(artifacts, batch):
    s = Session(artifacts[batch], synthetic_seed=0, device="cpu")
    r = forced_check(s, PROMPTS[:batch], 3)
    assert r.ok and r.steps == 3 * batch and r.agree + r.ties + r.near == r.steps

    real = s.decode

    def off_by_one(n: int, tokens_per_launch: int = 1) -> torch.Tensor:
        toks = real(n, tokens_per_launch)
        toks[2, 0] = (toks[2, 0] + 1) % s.spec.vocab_size  # the last step, row 0: another token
        return toks

    s.decode = off_by_one  # type: ignore[method-assign]
    assert forced_check(s, PROMPTS[:batch], 3, near=0.0).wrong == ((2, 0),)


def test_session_refuses_an_artifact_of_another_launch_interface(artifacts, tmp_path):
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(artifacts[1], old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["compiler_version"] = "0.1.0"  # kernels without the producer warp
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"compiled by amk-farm 0\.1\.0.*recompile it"):
        Session(old, synthetic_seed=0, device="cpu")


def test_session_refuses_bad_prompts_and_decode_before_prefill(artifacts):
    s = Session(artifacts[4], synthetic_seed=0, device="cpu")
    with pytest.raises(RuntimeError, match="prefill"):
        s.decode(1)
    with pytest.raises(ValueError, match="B=4"):
        s.prefill(PROMPTS[:1])
    with pytest.raises(ValueError, match="prompt length 64"):
        s.prefill([[1] * 64] * 4)
    with pytest.raises(ValueError, match="ids must be in"):
        s.prefill([[512]] * 4)
    s.prefill([[1] * 60] * 4)
    with pytest.raises(ValueError, match="exceed the cache capacity"):
        s.decode(5)


@torch.no_grad()
def test_static_cache_baseline_equals_reference_forward():
    """The benchmark's baseline step computes what Reference computes (float64, CPU)."""
    spec = catalog.resolve("tiny-llama")
    torch.manual_seed(0)
    ref = Reference(spec, 32, dtype=torch.float64)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.1)
    step = StaticCacheStep(ref, 2, 32, torch.device("cpu"))
    ks, vs = ref.empty_cache(2)
    prompt = torch.randint(0, spec.vocab_size, (2, 5))
    _, ks, vs = ref(prompt, torch.tensor(0), ks, vs)
    step.k, step.v = [k.clone() for k in ks], [v.clone() for v in vs]  # float64 caches
    token = torch.tensor([3, 7])
    want, ks_after, _ = ref(token[:, None], torch.tensor(5), ks, vs)
    got_tok, got = step(token, torch.tensor(5))
    assert torch.allclose(got, want[:, 0], rtol=1e-10, atol=1e-10)
    assert torch.equal(got_tok, want[:, 0].argmax(-1))
    # the baseline's cache was updated in place at position 5, as the reference's new cache says
    assert torch.allclose(step.k[1], ks_after[1], rtol=1e-10, atol=1e-12)
    assert not torch.equal(step.k[1][:, :, 5], ks[1][:, :, 5])


# ---- CLI without a GPU -------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
@pytest.mark.parametrize(
    "args",
    [
        ["generate", "{art}", "--synthetic", "--prompt-ids", "1,2,3", "--tokens", "4"],
        ["bench", "{art}", "--no-compile"],
    ],
)
def test_gpu_commands_without_a_gpu_exit_1_with_one_line(artifacts, args):
    result = CliRunner().invoke(app, [a.format(art=artifacts[1]) for a in args])
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == "error: no CUDA device is visible to PyTorch (the kernel needs a GPU)"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt-ids", "1,2"], "give exactly one of --weights DIR or --synthetic"),
        (
            ["--synthetic", "--prompt-ids", "1,x"],
            "--prompt-ids must be comma-separated integers, got '1,x'",
        ),
        (
            ["--synthetic", "--prompt-ids", "1", "--batch", "2"],
            "the artifact is compiled for batch 1, not 2",
        ),
    ],
)
def test_generate_refuses_bad_arguments_before_touching_a_device(artifacts, args, message):
    result = CliRunner().invoke(app, ["generate", str(artifacts[1]), *args])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {message}"


# ---- on the GPU --------------------------------------------------------------------------------


def _needs_cubin(d: Path) -> None:
    if not (d / "kernel.sm_90a.cubin").is_file():
        pytest.skip("no cubin (nvcc was not on PATH)")
    cap = torch.cuda.get_device_capability()
    if cap != (9, 0):
        pytest.skip(f"the tiny artifacts are built for sm_90a; this GPU is sm_{cap[0]}{cap[1]}")
    pytest.importorskip("cupy", reason="the GPU runtime needs CuPy")


@gpu
@pytest.mark.parametrize("batch", [1, 4])
def test_gpu_greedy_tokens_identical_to_bf16_reference(artifacts, batch):
    _needs_cubin(artifacts[batch])
    s = Session(artifacts[batch], synthetic_seed=0)
    r = greedy_check(s, PROMPTS[:batch], STEPS)
    assert r.identical, f"first mismatch {r.first_mismatch}, reference margin {r.ref_margin}"
    assert r.logits_rel_err < BF16_REL_TOL


@gpu
@pytest.mark.parametrize("batch", [1, 4])
def test_gpu_logits_match_float32_reference(artifacts, batch):
    _needs_cubin(artifacts[batch])
    s = Session(artifacts[batch], synthetic_seed=0)
    errs = float32_check(s, PROMPTS[:batch], 8)
    assert max(errs) < FLOAT32_REL_TOL, errs


@gpu
@pytest.mark.parametrize("batch", [1, 4])
def test_gpu_repeated_runs_and_multi_token_launches_are_bitwise_identical(artifacts, batch):
    _needs_cubin(artifacts[batch])
    s = Session(artifacts[batch], synthetic_seed=0)
    runs = []
    for per_launch in (1, 1, STEPS, 7):  # counters keep counting across runs (step0 grows)
        s.prefill(PROMPTS[:batch])
        runs.append((s.decode(STEPS, tokens_per_launch=per_launch).cpu(), s.logits.cpu()))
    assert s.step0 == 4 * STEPS
    for toks, logits in runs[1:]:
        assert torch.equal(toks, runs[0][0])
        assert torch.equal(logits.view(torch.int32), runs[0][1].view(torch.int32))


@gpu
def test_gpu_launch_errors_name_the_curesult(artifacts):
    from compiler.runtime.launch import CudaLauncher, LaunchError

    _needs_cubin(artifacts[1])
    s = Session(artifacts[1], synthetic_seed=0)
    d = kernel_dims(s.fused, s.schedule)
    cubin = artifacts[1] / "kernel.sm_90a.cubin"
    too_many = 64 * torch.cuda.get_device_properties(0).multi_processor_count
    with pytest.raises(LaunchError, match="CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE"):
        CudaLauncher(cubin, s.layout, too_many, d.block_threads, d.smem_bytes, 0)
    with pytest.raises(LaunchError, match="shared memory per CTA exceed"):
        CudaLauncher(cubin, s.layout, d.sm_count, d.block_threads, 1 << 20, 0)
