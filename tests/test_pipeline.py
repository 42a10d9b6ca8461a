"""The compile pipeline and `amk-farm compile`, end to end on the CPU (nvcc, no GPU)."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from amk_farm.cli import app
from compiler.artifact import check_files, read_manifest
from compiler.ir.fused import FusedGraph
from compiler.ir.graph import Graph
from compiler.schedule.schedule import Schedule

runner = CliRunner()
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("AMK_HOME", str(tmp_path / "home"))


def compile_tiny(out, *extra):
    result = runner.invoke(
        app, ["compile", "tiny-llama", "-t", "b2-s64", "-o", str(out), "--json", *extra]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_compile_writes_every_stage_and_a_cubin(tmp_path, arch):
    out = tmp_path / "a"
    summary = compile_tiny(out, "--arch", arch)
    m = read_manifest(out)
    check_files(out, m)
    assert set(m.files) == {
        "graph.json",
        "fused.json",
        "schedule.json",
        "kernel.cu",
        f"kernel.{arch}.cubin",
    }
    assert (m.template, m.arch, m.model) == ("b2-s64", arch, "tiny-llama")
    graph = Graph.loads((out / "graph.json").read_text())
    fused = FusedGraph.loads((out / "fused.json").read_text())
    sched = Schedule.loads((out / "schedule.json").read_text())
    assert graph.digest() == m.model_hash == summary["model_hash"]
    assert fused.graph_digest == graph.digest() and sched.fused_digest == fused.digest()
    assert (out / "kernel.cu").read_text().count("__global__") == 1
    assert summary["cubin"] is True


def test_every_word_option_reaches_the_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "")  # no nvcc: the options, not the cubin
    words = {"policy": "balanced", "matvec": "mma", "weight_l2": "evict_first"}
    words["ring_copy"] = "threads"
    words["tile_policy"] = "fit"
    compile_tiny(tmp_path / "a", *(f"--option={k}={v}" for k, v in words.items()))
    options = read_manifest(tmp_path / "a").options
    assert {k: options[k] for k in words} == words


@needs_nvcc
def test_each_stage_file_is_an_entry_point(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    compile_tiny(a)
    compile_tiny(b, "--from", str(a / "schedule.json"))
    compile_tiny(c, "--from", str(a / "graph.json"))
    for d in (b, c):
        assert (d / "kernel.cu").read_bytes() == (a / "kernel.cu").read_bytes()
        assert read_manifest(d).files == read_manifest(a).files


def test_without_nvcc_the_rest_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    out = tmp_path / "a"
    result = runner.invoke(app, ["compile", "tiny-llama", "-t", "b1-s64", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "nvcc not found" in result.stderr
    assert set(read_manifest(out).files) == {
        "graph.json",
        "fused.json",
        "schedule.json",
        "kernel.cu",
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-t", "b0-s64"], "bad shape template"),
        (["--arch", "sm_70"], "unsupported arch"),
        (["--option", "row_tile=0"], "row_tile must be a positive integer"),
        (["--option", "nonsense=1"], "bad --option"),
        (["--option", "ring_copy=1"], "ring_copy must be one of async, threads"),
        (["--option", "stages=two"], "--option stages needs an integer"),
    ],
)
def test_bad_input_exits_nonzero_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "a"
    result = runner.invoke(app, ["compile", "tiny-llama", "-o", str(out), *args])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "home"] or not out.exists()
    assert not out.exists()


def test_weights_are_checked_and_recorded(tmp_path, monkeypatch):
    from amk_farm import catalog
    from compiler.frontend.synthetic import synthetic_state_dict, write_checkpoint

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # the checkpoint is what is tested here
    spec = catalog.resolve("tiny-llama")
    ckpt = write_checkpoint(spec, synthetic_state_dict(spec, seed=1), tmp_path / "ckpt")
    out = tmp_path / "a"
    result = runner.invoke(
        app, ["compile", "tiny-llama", "-t", "b1-s64", "--weights", str(ckpt), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert read_manifest(out).checkpoint_digest is not None
    wrong = runner.invoke(
        app, ["compile", "llama-2-7b", "--weights", str(ckpt), "-o", str(tmp_path / "b")]
    )
    assert wrong.exit_code == 1 and not (tmp_path / "b").exists()


@needs_nvcc
@pytest.mark.parametrize("template", ["b1-s128", "b4-s128", "b8-s128", "b16-s128"])
def test_every_batch_template_compiles_to_a_cubin(tmp_path, template):
    """Templates b1, b4, b8 and b16 (the interpreter runs them in test_interpret)."""
    out = tmp_path / "a"
    result = runner.invoke(app, ["compile", "tiny-llama", "-t", template, "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["cubin"] is True
    assert read_manifest(out).template == template
