"""The `amk-farm` command line, as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from amk_farm.cli import app
from compiler.ir import Graph, well_formed

runner = CliRunner()


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("AMK_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_graph_writes_a_loadable_graph_whose_digest_is_the_model_hash(tmp_path):
    out = tmp_path / "g.json"
    result = runner.invoke(app, ["graph", "tiny-llama", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    g = Graph.loads(out.read_text())
    well_formed(g)
    assert g.digest() == summary["model_hash"]
    assert summary["inputs"][:2] == ["token", "pos"]
    assert summary["outputs"][:2] == ["next_token", "logits"]
    assert summary["ops"]["index_copy"] == 4


def test_graph_of_alias_and_config_path_match_catalog(tmp_path):
    from amk_farm import catalog
    from compiler.spec import spec_to_hf_config

    cfg = tmp_path / "model"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps(spec_to_hf_config(catalog.resolve("tiny-llama"))))
    by_name = json.loads(runner.invoke(app, ["graph", "tiny-llama", "--json"]).stdout)["model_hash"]
    by_path = json.loads(runner.invoke(app, ["graph", str(cfg), "--json"]).stdout)["model_hash"]
    assert by_name == by_path


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            '{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}',
            "unsupported architecture 'GPT2LMHeadModel'",
        ),
        ("{not json", "malformed JSON"),
        ('{"model_type": "llama", "hidden_size": 64}', "must be a positive integer"),
    ],
)
def test_bad_config_exits_nonzero_with_one_line_and_writes_nothing(tmp_path, config, message):
    bad = tmp_path / "config.json"
    bad.write_text(config)
    out = tmp_path / "out" / "g.json"
    result = runner.invoke(app, ["graph", str(bad), "-o", str(out)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not out.exists() and not out.parent.exists()


def test_unknown_model_is_named():
    result = runner.invoke(app, ["graph", "llama-9000"])
    assert result.exit_code == 1
    assert "unknown model 'llama-9000'" in result.stderr


def test_models_lists_every_entry_with_a_stable_hash(home):
    first = runner.invoke(app, ["models", "--json"])
    assert first.exit_code == 0, first.output
    rows = json.loads(first.stdout)
    from amk_farm import catalog

    assert [r["name"] for r in rows] == catalog.names()
    assert all(len(r["model_hash"]) == 64 for r in rows)
    assert len({r["model_hash"] for r in rows}) == len(rows)
    by_name = {r["name"]: r for r in rows}
    assert by_name["llama-2-7b"]["params"] == 6_738_415_616
    assert by_name["llama-2-70b"]["aliases"] == ["llama-70b"]
    # A second run reads the cache; wiping it recomputes the same hashes.
    assert json.loads(runner.invoke(app, ["models", "--json"]).stdout) == rows
    for f in (home / "cache").iterdir():
        f.unlink()
    again = json.loads(runner.invoke(app, ["graph", "tiny-mistral", "--json"]).stdout)
    assert again["model_hash"] == by_name["tiny-mistral"]["model_hash"]
    table = runner.invoke(app, ["models"]).stdout
    assert "llama-2-70b (llama-70b)" in table


def test_console_script_builds_a_70b_graph_without_weights(tmp_path):
    """The installed entry point, in a fresh process: llama-70b's graph holds no weight data."""
    out = tmp_path / "g70.json"
    code = (
        "import resource, sys; from amk_farm.cli import main; sys.argv = ['amk-farm', 'graph', 'llama-70b', '-o', "
        f"{str(out)!r}, '--json']\ntry: main()\nexcept SystemExit: pass\n"
        "print('peak_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True
    )
    summary = json.loads(proc.stdout)
    assert summary["weights"] == 2 + 80 * 9 + 1  # embed, 9 per layer, norm, lm_head
    peak_kb = int(proc.stderr.split("peak_kb")[-1])
    assert peak_kb < 3 * 2**20, f"peak memory {peak_kb} KB"
    assert Graph.loads(out.read_text()).digest() == summary["model_hash"]


def test_graph_from_onnx_file(tmp_path):
    """`graph MODEL --onnx FILE`: the ONNX frontend, checked against MODEL's weights."""
    from amk_farm import catalog
    from tests.test_onnx_import import _export

    path = _export(catalog.resolve("tiny-llama"), tmp_path / "tiny.onnx")
    out = tmp_path / "g.json"
    result = runner.invoke(
        app, ["graph", "tiny-llama", "--onnx", str(path), "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["frontend"] == "onnx"
    assert Graph.loads(out.read_text()).digest() == summary["model_hash"]
    wrong = runner.invoke(app, ["graph", "tiny-mistral", "--onnx", str(path)])
    assert wrong.exit_code == 0  # same shapes: a mistral spec has the same weights
    other = runner.invoke(app, ["graph", "llama-2-7b", "--onnx", str(path)])
    assert other.exit_code == 1 and "is not a weight of llama-2-7b" in other.stderr
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01junk")
    junk = runner.invoke(app, ["graph", "tiny-llama", "--onnx", str(tmp_path / "junk.onnx")])
    assert junk.exit_code == 1 and junk.stderr.startswith("error: ")


def test_keys_init_then_show_print_one_key_id(home):
    init = runner.invoke(app, ["keys", "init", "--json"])
    assert init.exit_code == 0, init.output
    made = json.loads(init.stdout)
    assert made["private_key"] == str(home / "keys" / "signing.key")
    assert (os.stat(made["private_key"]).st_mode & 0o777) == 0o600
    show = runner.invoke(app, ["keys", "show", "--json"])
    assert show.exit_code == 0, show.output
    shown = json.loads(show.stdout)
    assert shown["key_id"] == made["key_id"]
    assert shown["public_key"].startswith("-----BEGIN PUBLIC KEY-----")
    assert "PRIVATE" not in show.stdout
    text = runner.invoke(app, ["keys", "show"])
    assert text.stdout.splitlines()[0] == f"key id  {made['key_id']}"


def test_keys_init_refuses_to_overwrite_without_force(home):
    assert runner.invoke(app, ["keys", "init"]).exit_code == 0
    key = (home / "keys" / "signing.key").read_bytes()
    again = runner.invoke(app, ["keys", "init"])
    assert again.exit_code == 1
    assert again.stderr.strip().splitlines() == [
        f"error: {home / 'keys' / 'signing.key'} exists; pass --force to replace it"
    ]
    assert (home / "keys" / "signing.key").read_bytes() == key
    forced = runner.invoke(app, ["keys", "init", "--force"])
    assert forced.exit_code == 0, forced.output
    assert (home / "keys" / "signing.key").read_bytes() != key


def test_keys_show_without_a_key_is_a_one_line_error(home):
    result = runner.invoke(app, ["keys", "show"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: no signing key at ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_verify_summary_folds_runs_of_alike_layers_in_layer_order():
    from amk_farm.cli import _folded

    per = {"a global": {"proved": 2}, "c global": {"proved": 4}}
    per |= {f"b layer {i}": {"proved": 3, "cached": 0} for i in range(12)}
    per |= {"b layer 12": {"proved": 1, "failed": 1}}
    per |= {f"c layer {i}": {"proved": 1} for i in (0, 1, 3)}
    assert _folded(dict(sorted(per.items()))) == [
        ("a global", "proved 2"),
        ("b layers 0-11 (each)", "proved 3"),
        ("b layer 12", "proved 1, failed 1"),
        ("c global", "proved 4"),
        ("c layers 0-1 (each)", "proved 1"),
        ("c layer 3", "proved 1"),
    ]


def test_a_schedule_json_keeps_its_own_options(home, tmp_path):
    """--from schedule.json builds with the options the schedule was made with (the manifest
    records them, so the kernel's constants match), and --option cannot change them."""
    first = tmp_path / "first"
    r = runner.invoke(app, ["compile", "tiny-llama", "-t", "b1-s64", "--option", "kv_partitions=5",
                            "-o", str(first)])  # fmt: skip
    assert r.exit_code == 0, r.output
    again = tmp_path / "again"
    r = runner.invoke(app, ["compile", "tiny-llama", "-t", "b1-s64", "--from",
                            str(first / "schedule.json"), "-o", str(again)])  # fmt: skip
    assert r.exit_code == 0, r.output
    manifest = json.loads((again / "manifest.json").read_text())
    assert manifest["options"]["kv_partitions"] == 5
    assert (again / "kernel.cu").read_text() == (first / "kernel.cu").read_text()
    bad = tmp_path / "bad"
    r = runner.invoke(app, ["compile", "tiny-llama", "-t", "b1-s64", "--from",
                            str(first / "schedule.json"), "--option", "row_tile=8", "-o", str(bad)])  # fmt: skip
    assert r.exit_code != 0 and "schedule.json's options" in r.output and not bad.exists()
