"""Property tests (Hypothesis) of `amk-farm compile CONFIG -t TEMPLATE -o OUT` over fuzzed
config.json contents (huge, negative, zero, wrong-typed and missing fields, unknown keys, junk
bytes) and template strings.

For every input: either it is refused (exit code != 0, exactly one `error:` line on stderr, no
traceback, nothing written to OUT or AMK_HOME) or it reaches the compile itself, and then every
bound of compiler/limits.py holds for what reached it. Each example runs in-process with a
deadline, so an input that slipped past the limits into heavy work fails the test by time.
The compile stages are replaced by a stub in the first property (what is tested is what runs
before them); the second compiles small valid configs for real and expects success.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from amk_farm import catalog
from amk_farm.cli import app
from compiler import limits
from compiler.artifact import check_files, read_manifest
from compiler.spec import spec_to_hf_config

runner = CliRunner()
BASE = spec_to_hf_config(catalog.resolve("tiny-llama"))
INT_FIELDS = [
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
]
HF_FIELD = {hf: field for field, hf in limits.HF_NAMES.items()}
LIMIT = {
    k: limits.LIMITS[HF_FIELD.get(k, k)] for k in INT_FIELDS if HF_FIELD.get(k, k) in limits.LIMITS
}
LIMITED = sorted(LIMIT)
KEYS = [*BASE, "sliding_window", "rope_scaling", "rope_parameters", "qk_norm", "_comment"]

huge = st.integers(0, 400).map(lambda k: 10**k)
edges = st.sampled_from([0, -1, 1, 2, 7, 64, 256, 512, 513, 65536, 65537, 2**31, 2**63, 2**64])
# powers of two: most limits are one, so these land on a limit, just under it and just over it
plausible = st.one_of(
    st.integers(0, 22).map(lambda k: 2**k),
    st.integers(0, 22).map(lambda k: 2**k + 1),
    st.integers(1, 600),
)
bad = st.one_of(
    st.integers(-10, 10),
    st.integers(-(2**70), 2**70),
    huge,
    huge.map(lambda v: -v),
    edges,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.none(),
    st.booleans(),
    st.lists(st.integers(-3, 10**6), max_size=3),
    st.dictionaries(st.sampled_from(["rope_type", "factor", "type", "x"]), edges, max_size=3),
)
values = st.one_of(plausible, plausible, bad)


@st.composite
def config_bytes(draw: st.DrawFn) -> bytes:
    """A config.json: mostly tiny-llama's with fields changed, dropped or added; else junk."""
    cfg: Any = dict(BASE)
    if draw(st.integers(0, 3)) == 0:  # a field missing
        del cfg[draw(st.sampled_from(list(BASE)))]
    cfg.update(draw(st.dictionaries(st.sampled_from(INT_FIELDS), values, max_size=3)))
    mode = draw(st.integers(0, 5))
    if mode == 0:  # one field at its limit, or just over it
        key = draw(st.sampled_from(LIMITED))
        cfg[key] = LIMIT[key] + draw(st.sampled_from([-1, 0, 1, LIMIT[key]]))
    elif mode == 1:  # the big dimensions large together: each within its limit, the whole not
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
            cfg[key] = LIMIT[key] >> draw(st.integers(0, 4))
    if draw(st.integers(0, 3)) == 0:  # a field set that tiny-llama does not have, or bad
        cfg[draw(st.sampled_from(KEYS))] = draw(bad)
    text = json.dumps(cfg, allow_nan=True)
    kind = draw(st.integers(0, 9))
    if kind < 7:
        return text.encode()
    return draw(
        st.one_of(
            st.just(text[: len(text) // 2].encode()),  # truncated
            st.binary(max_size=64),
            st.text(max_size=64).map(str.encode),
            st.sampled_from([b"[" * 50_000, b"null", b"[]", b'"x"', b"1e999", b"{}"]),
        )
    )


digits = st.one_of(st.integers(-5, 10**6), huge, edges).map(str)
templates = st.one_of(
    st.builds(lambda b, s: f"b{b}-s{s}", st.integers(1, 300), plausible),
    st.builds(lambda b, s: f"b{b}-s{s}", st.integers(1, 300), plausible),
    st.builds(lambda b, s: f"b{b}-s{s}", digits, digits),
    st.sampled_from(["b1-s64", "b2-s64", "b1-s512", "b1-s513", "b01-s64", "b1-s64 ", "B1-S64"]),
    st.text(max_size=24),
)


class Reached(Exception):
    """Raised by the compile stub: every check before the stages passed."""


def assert_within_limits(spec: Any, template: Any, options: Any) -> None:
    """An independent look at what reached the compile: every stated bound holds."""
    for field in ("hidden_size", "intermediate_size", "num_layers", "num_heads"):
        assert 1 <= getattr(spec, field) <= limits.LIMITS[field], field
    for field in ("num_kv_heads", "head_dim", "vocab_size", "max_position_embeddings"):
        assert 1 <= getattr(spec, field) <= limits.LIMITS[field], field
    assert limits.MIN_RMS_NORM_EPS <= spec.rms_norm_eps <= limits.FLOAT_LIMITS["rms_norm_eps"]
    assert 0 < spec.rope_theta <= limits.FLOAT_LIMITS["rope_theta"]
    assert 1 <= template.batch <= limits.LIMITS["batch"]
    assert 1 <= template.max_seq <= spec.max_position_embeddings
    tasks = limits.schedule_tasks(spec, template, options)
    assert limits.compile_bytes(tasks) <= limits.COMPILE_MEMORY_LIMIT
    assert limits.device_bytes(spec, template) <= limits.DEVICE_MEMORY_LIMIT


def refused_cleanly(result: Any, out: Path, home: Path) -> None:
    assert result.exit_code != 0, result.stdout
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporaries
    assert not (home / "store").exists() and not (home / "proofs").exists()


# CI runs 100 examples (a few seconds); AMK_FUZZ_EXAMPLES=5000 searches longer.
EXAMPLES = int(os.environ.get("AMK_FUZZ_EXAMPLES", "100"))


@settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=3),
    suppress_health_check=[HealthCheck.too_slow],
)
@given(content=config_bytes(), template=templates)
def test_any_config_and_template_is_refused_in_one_line_or_within_limits(content, template):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        home, out, path = root / "home", root / "out" / "art", root / "config.json"
        out.parent.mkdir()
        path.write_bytes(content)
        reached: list[tuple[Any, ...]] = []

        def stub(spec: Any, shape: Any, arch: str, out_dir: Path, opts: Any, **_: Any) -> Any:
            reached.append((spec, shape, opts))
            raise Reached

        env = {"AMK_HOME": str(home), "PATH": str(root / "no-nvcc")}
        with mock.patch("compiler.pipeline.compile_model", stub):
            result = runner.invoke(
                app, ["compile", str(path), f"--template={template}", "-o", str(out)], env=env
            )
        event("reached the compile" if reached else "refused")
        if reached:
            assert isinstance(result.exception, Reached), result.output
            assert_within_limits(*reached[0])
            assert not out.exists()
        else:
            refused_cleanly(result, out, home)
            assert str(path) in result.stderr or "template" in result.stderr


@st.composite
def small_valid(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """A config the compiler supports, small enough to compile in about a second, and a
    template within its positions."""
    heads = draw(st.sampled_from([2, 4]))
    positions = draw(st.integers(16, 512))
    cfg = dict(BASE)
    cfg.update(
        hidden_size=draw(st.sampled_from([64, 128, 256])),
        intermediate_size=draw(st.sampled_from([128, 256, 512])),
        num_hidden_layers=draw(st.integers(1, 2)),
        num_attention_heads=heads,
        num_key_value_heads=draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0])),
        head_dim=draw(st.sampled_from([32, 64])),
        vocab_size=draw(st.integers(8, 600)),
        max_position_embeddings=positions,
    )
    template = f"b{draw(st.sampled_from([1, 2, 4]))}-s{draw(st.integers(1, positions))}"
    return cfg, template


@settings(max_examples=6, deadline=timedelta(seconds=20))
@given(case=small_valid())
def test_small_valid_configs_compile(case):
    cfg, template = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path, out = root / "config.json", root / "art"
        path.write_text(json.dumps(cfg))
        env = {"AMK_HOME": str(root / "home"), "PATH": str(root / "no-nvcc")}
        result = runner.invoke(app, ["compile", str(path), "-t", template, "-o", str(out)], env=env)
        assert result.exit_code == 0, result.output
        manifest = read_manifest(out)
        check_files(out, manifest)
        assert manifest.template == template
