"""Regression tests of issue 15's input handling: no user file deleted by `-o`, every input
bounded before work starts (compiler/limits.py), one `error:` line and no traceback."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from amk_farm import catalog, db
from amk_farm.cli import app
from amk_farm.store import StoreError, open_store
from compiler import limits
from compiler.artifact import ArtifactError, check_files, install, read_manifest
from compiler.schedule.schedule import Options
from compiler.spec import ShapeTemplate, spec_to_hf_config

runner = CliRunner()


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AMK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PATH", str(tmp_path / "no-nvcc"))  # the artifact files, not a cubin
    return tmp_path / "home"


def one_error(result, *fragments: str, code: int = 1) -> str:
    """Exit `code`, exactly one line on stderr, `error: ...` holding every fragment."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def compile_tiny(out: Path, *extra: str):
    return runner.invoke(app, ["compile", "tiny-llama", "-t", "b2-s64", "-o", str(out), *extra])


# item 3: nothing of the user's is deleted


def test_compile_over_a_users_directory_is_refused_and_force_keeps_their_files(tmp_path: Path):
    out = tmp_path / "art"
    assert compile_tiny(out).exit_code == 0
    (out / "proof").mkdir()
    (out / "proof" / "summary.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    (out / "bench.json").write_text("[]")
    before = tree(out)
    one_error(compile_tiny(out), str(out), "not empty", "--force")
    assert tree(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert compile_tiny(out, "--force", "--option", "row_tile=32").exit_code == 0
    after = tree(out)
    for mine in ("proof/summary.json", "notes.txt", "bench.json"):
        assert after[mine] == before[mine]
    m = read_manifest(out)
    check_files(out, m)
    assert m.options["row_tile"] == 32 and after["schedule.json"] != before["schedule.json"]


def test_compile_into_an_empty_directory_or_over_a_file(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert compile_tiny(empty).exit_code == 0
    check_files(empty, read_manifest(empty))
    (tmp_path / "f").write_text("x")
    one_error(compile_tiny(tmp_path / "f", "--force"), "not a directory")
    assert (tmp_path / "f").read_text() == "x"


def test_install_refuses_to_write_through_links_or_over_directories(tmp_path: Path):
    def staged(name: str) -> Path:
        tmp = tmp_path / f".stage-{name}"
        (tmp / "proof").mkdir(parents=True)
        (tmp / "proof" / "c.smt2").write_text("new")
        (tmp / "manifest.json").write_text("{}")
        return tmp

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    (out / "proof").symlink_to(elsewhere)
    with pytest.raises(ArtifactError, match=r"not a directory; not writing proof/c\.smt2"):
        install(staged("a"), out, force=True)
    assert list(elsewhere.iterdir()) == []
    (out / "proof").unlink()
    (out / "manifest.json").mkdir()
    with pytest.raises(ArtifactError, match="is a directory; not replacing it"):
        install(staged("b"), out, force=True)
    (out / "manifest.json").rmdir()
    install(staged("c"), out, force=True)
    assert tree(out) == {"keep": b"mine", "manifest.json": b"{}", "proof/c.smt2": b"new"}


def test_graph_does_not_overwrite_a_file_without_force(tmp_path: Path):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    one_error(runner.invoke(app, ["graph", "tiny-llama", "-o", str(path)]), "exists", "--force")
    assert path.read_text() == "mine"
    assert runner.invoke(app, ["graph", "tiny-llama", "-o", str(path), "--force"]).exit_code == 0
    assert json.loads(path.read_text())["ir_version"]
    one_error(runner.invoke(app, ["graph", "tiny-llama", "-o", str(tmp_path)]), "directory")


# item 4: every input bounded before work starts


def config_file(tmp_path: Path, **changes: object) -> Path:
    cfg = {**spec_to_hf_config(catalog.resolve("tiny-llama")), **changes}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"hidden_size": 10**12, "head_dim": 64}, ["hidden_size 1000000000000", "limit 65536"]),
        ({"num_hidden_layers": 10**9}, ["num_hidden_layers 1000000000", "limit 512"]),
        ({"vocab_size": 2**40}, ["vocab_size", "limit 1048576"]),
        ({"intermediate_size": 10**30}, ["intermediate_size", "limit 262144"]),
        ({"num_attention_heads": 4096, "num_key_value_heads": 2}, ["num_attention_heads"]),
        ({"head_dim": 1024}, ["head_dim 1024", "limit 256"]),
        ({"max_position_embeddings": 10**7}, ["max_position_embeddings", "limit 1048576"]),
        ({"rms_norm_eps": 10**400}, ["rms_norm_eps", "limit 1"]),  # float() would overflow
        ({"rms_norm_eps": 1e-300}, ["rms_norm_eps", "float32"]),
        ({"rope_theta": 1e300}, ["rope_theta", "limit 1e+12"]),
    ],
)
def test_huge_config_fields_are_refused_at_once_naming_field_limit_and_file(
    tmp_path: Path, changes: dict[str, object], fragments: list[str]
):
    path = config_file(tmp_path, **changes)
    t0 = time.monotonic()
    result = runner.invoke(app, ["compile", str(path), "-t", "b1-s64", "-o", str(tmp_path / "a")])
    one_error(result, str(path), *fragments)
    assert time.monotonic() - t0 < 5 and not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("[" * 100_000, "malformed JSON"),  # RecursionError inside json
        ('{"hidden_size": ' + "9" * 5000 + "}", "malformed JSON"),  # int digit limit
        (" " * (2 << 20), "over the limit"),  # a 2 MiB "config"
    ],
)
def test_pathological_json_is_one_line_naming_the_file(tmp_path: Path, content: str, fragment):
    path = tmp_path / "config.json"
    path.write_text(content)
    one_error(runner.invoke(app, ["graph", str(path)]), str(path), fragment)


@pytest.mark.parametrize(
    ("template", "fragments"),
    [
        ("b1-s99999999999999999999", ["max_seq 99999999999999999999", "limit 1048576"]),
        ("b1-s" + "9" * 5000, ["max_seq", "(5000 digits)"]),
        ("b1-s1000000000", ["max_seq 1000000000", "limit 1048576"]),
        ("b1-s1024", ["max_seq 1024", "tiny-llama's max_position_embeddings 512"]),
        ("b257-s64", ["batch 257", "limit 256"]),
        ("b0-s64", ["bad shape template"]),
        ("b1-s-5", ["bad shape template"]),
        ("b１-s64", ["bad shape template"]),  # a full-width digit
    ],
)
def test_templates_are_parsed_strictly_and_bounded(tmp_path: Path, template: str, fragments):
    out = tmp_path / "a"
    result = runner.invoke(app, ["compile", "tiny-llama", "-t", template, "-o", str(out)])
    line = one_error(result, *fragments)
    assert len(line) < 300 and not out.exists()


def test_template_limits_also_hold_for_parse_and_submit(tmp_path: Path):
    with pytest.raises(ValueError, match="max_seq 2000000 exceeds the limit"):
        ShapeTemplate.parse("b1-s2000000")
    assert ShapeTemplate.default(catalog.resolve("tiny-llama")) == ShapeTemplate(1, 512)
    assert str(ShapeTemplate.default(catalog.resolve("llama-2-7b"))) == "b1-s4096"
    result = runner.invoke(app, ["submit", "tiny-llama", "-t", "b1-s4096"])
    one_error(result, "max_position_embeddings 512")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--sm-count", "1000000000"], ["option sm_count 1000000000", "limit 1024"]),
        (["--option", "row_tile=" + "9" * 30], ["option row_tile", "limit 65536"]),
        (["--option", "down_splits=100000"], ["option down_splits 100000", "limit 4096"]),
    ],
)
def test_schedule_options_are_bounded(tmp_path: Path, args: list[str], fragments: list[str]):
    out = tmp_path / "a"
    one_error(runner.invoke(app, ["compile", "tiny-llama", "-o", str(out), *args]), *fragments)
    assert not out.exists()


def test_memory_estimates_refuse_what_would_not_fit():
    big = catalog.resolve("llama-2-70b")
    tiles = Options.for_target("sm_90a", 1, row_tile=1)
    with pytest.raises(limits.LimitError, match=r"compile would take about .* GiB .* over the"):
        limits.check_compile(big, ShapeTemplate(1, 4096), tiles)
    small = catalog.resolve("llama-3.2-1b")
    with pytest.raises(limits.LimitError, match=r"device memory .* over the limit 144 GiB"):
        limits.check_compile(small, ShapeTemplate(256, 131072), Options())


@pytest.mark.parametrize("name", catalog.names())
def test_every_catalog_model_is_within_the_limits(name: str):
    spec = catalog.resolve(name)
    shape = ShapeTemplate.default(spec)
    limits.check_compile(spec, shape, Options.for_target("sm_90a", shape.batch))
    if name in ("llama-2-70b", "llama-3-70b"):  # the largest, at their full context too
        full = ShapeTemplate(1, spec.max_position_embeddings)
        limits.check_compile(spec, full, Options.for_target("sm_90a", 1))


@pytest.mark.parametrize(
    ("name", "template"), [("tiny-llama", "b2-s64"), ("tiny-mistral", "b4-s7")]
)
def test_the_task_estimate_is_the_schedules_task_count(name: str, template: str):
    """The compile-memory estimate counts tasks exactly as build_schedule makes them."""
    from compiler.ir.fused_layout import layout
    from compiler.schedule import build_schedule

    spec, shape = catalog.resolve(name), ShapeTemplate.parse(template)
    for opts in (Options(), Options(row_tile=32, kv_partitions=3, down_splits=3, sm_count=5)):
        built = build_schedule(layout(spec), shape, opts)
        assert limits.schedule_tasks(spec, shape, opts) == len(built.tasks)


# one line for every bad database URL, store URL and job id


@pytest.mark.parametrize("url", ["mysql://u:secret@h/db", "junk", "postgresql+psycopg2://h/d"])
@pytest.mark.parametrize("command", [["list"], ["status"], ["db", "upgrade"]])
def test_unsupported_database_urls_are_one_line(monkeypatch, url: str, command: list[str]):
    monkeypatch.setenv("AMK_DB_URL", url)
    line = one_error(runner.invoke(app, command), "database URL", "sqlite:///FILE")
    assert "secret" not in line


def test_postgresql_means_psycopg_3():
    assert db.parse_url("postgresql://u@h/d").drivername == "postgresql+psycopg"
    assert db.parse_url("sqlite:///x.db").get_backend_name() == "sqlite"


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ftp://h/x", "unsupported store URL"),
        ("file://", "empty store path"),
        ("file://host/x", "names no host"),
        ("s3://", "s3://bucket/prefix"),
    ],
)
def test_unsupported_store_urls_are_refused(url: str, fragment: str):
    with pytest.raises(StoreError, match=fragment):
        open_store(url)


def test_a_store_that_is_a_file_is_refused(tmp_path: Path):
    (tmp_path / "f").write_text("")
    with pytest.raises(StoreError, match="not a directory"):
        open_store(str(tmp_path / "f"))


@pytest.mark.parametrize("job", ["abc", "0", "-3", "99999999999999999999999", "1.5"])
def test_status_of_a_bad_job_id_is_one_line(job: str):
    one_error(runner.invoke(app, ["status", "--", job]), "amk-farm status", "job", code=2)


def test_usage_errors_are_one_line_and_help_still_works():
    one_error(runner.invoke(app, ["no-such-command"]), "No such command", code=2)
    one_error(runner.invoke(app, ["pull", "tiny-llama"]), "Missing option", code=2)
    helped = runner.invoke(app, ["compile", "--help"])
    assert helped.exit_code == 0 and "--force" in helped.stdout
    assert runner.invoke(app, ["status", "1"]).stderr.startswith("error: no job 1")
    assert os.environ["AMK_HOME"]  # (the autouse fixture's home was used)
