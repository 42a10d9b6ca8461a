"""The proof cache, attacked: an entry copied under another query's key, one forged without the
secret, one of other verifier code, one that is not a proof; each is a miss (the query is proved
again), while an honest entry is reused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from verifier import cache as cache_mod
from verifier.cache import ProofCache
from verifier.obligation import Obligation
from verifier.solve import run

SECRET = b"k" * 32
DECL = "(declare-const x Int)\n(assert (> x 0))\n"
TRUE = Obligation("b", "x is positive", 0, "x", DECL, "(assert (<= x 0))\n")  # proved
FALSE = Obligation("b", "x is big", 0, "x", DECL, "(assert (<= x 1000))\n")  # refuted


def _entry(cache: ProofCache, ob: Obligation) -> Path:
    return cache.directory / f"{ob.key}.json"


def _read(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


@pytest.fixture(params=[None, SECRET], ids=["no-secret", "secret"])
def cache(request: pytest.FixtureRequest, tmp_path: Path) -> ProofCache:
    return ProofCache(tmp_path / "proofs", request.param)


def test_a_proved_result_is_reused_and_a_failure_never_cached(cache: ProofCache) -> None:
    proved, failed = run(TRUE), run(FALSE)
    assert proved.proved and not failed.proved
    cache.put(TRUE, proved)
    cache.put(FALSE, failed)
    assert cache.get(TRUE) == proved
    assert cache.get(FALSE) is None and not _entry(cache, FALSE).exists()
    assert _read(_entry(cache, TRUE))["key"] == TRUE.key


def test_a_proof_copied_under_another_querys_key_is_ignored(cache: ProofCache) -> None:
    cache.put(TRUE, run(TRUE))
    shutil.copy(_entry(cache, TRUE), _entry(cache, FALSE))  # the refuted query's file
    assert cache.get(FALSE) is None


def test_an_entry_forged_without_the_secret_is_ignored(tmp_path: Path) -> None:
    cache = ProofCache(tmp_path / "proofs", SECRET)
    cache.put(TRUE, run(TRUE))
    forged = _read(_entry(cache, TRUE)) | {"key": FALSE.key}  # key and content agree now
    _entry(cache, FALSE).write_text(json.dumps(forged))
    assert cache.get(FALSE) is None
    for mac in ("", "0" * 64):  # no MAC, a made-up one
        _entry(cache, FALSE).write_text(json.dumps(forged | {"mac": mac}))
        assert cache.get(FALSE) is None
    other = ProofCache(tmp_path / "proofs", b"x" * 32)  # MACed under another secret
    other.put(FALSE, run(TRUE))
    assert cache.get(FALSE) is None
    assert cache.get(TRUE) is not None  # the honest entry still counts


def test_an_entry_of_other_verifier_code_is_stale(
    cache: ProofCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_mod, "source_digest", lambda: "0" * 64)
    cache.put(TRUE, run(TRUE))  # written by "another verifier"
    monkeypatch.undo()
    assert cache.get(TRUE) is None


def test_an_entry_that_is_not_a_proof_is_ignored(cache: ProofCache) -> None:
    cache.put(TRUE, run(TRUE))
    entry = _read(_entry(cache, TRUE))
    path = _entry(cache, TRUE)
    for bad in (
        entry | {"result": {**entry["result"], "status": "failed"}},
        entry | {"result": "proved"},
        entry | {"result": {"status": "proved", "extra": 1}},
        [entry],
    ):
        path.write_text(json.dumps(bad))
        assert cache.get(TRUE) is None
    path.write_bytes(b"\xff\x00 not json")
    assert cache.get(TRUE) is None
