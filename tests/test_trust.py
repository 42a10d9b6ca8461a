"""The chain of trust, attacked: a signature means "proved here", and trust roots are the puller's
own. Each test is an attacker's move (an edited kernel with its manifest updated and the old
proof kept, a forged proof cache entry, a forged attestation signed by a trusted key, a key
slipped into the shared database, a `keys trust` of something that is not a public key) that
must be refused in one line with nothing stored or written, beside the honest move that must
still be accepted.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.orm import Session

from amk_farm import attest, db, registry, signing
from amk_farm.cli import app
from compiler.artifact import Manifest, read_manifest
from tests.test_registry import (
    ARCH,
    SECRET,
    TEMPLATE,
    Registry,
    _envelope,
    _registry,
    _set_envelope,
    assert_nothing_written,
    ok,
    pull,
    refused,
    runner,
    seed_cache,
    tree,
    verified_artifact,
    warm,
)
from verifier import mutate
from verifier.cache import ProofCache
from verifier.verify import Report, obligations_of, verify

SHORT_PARTITIONS = next(
    m for m in mutate.CATALOG if m.name == "kernel.cu: KV partitions of floor(n / P) keys"
)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-llama b2-s64, compiled and verified once for the module (as in test_registry)."""
    return verified_artifact(tmp_path_factory)


@pytest.fixture(params=["sqlite-local"])
def reg(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Registry]:
    """test_registry's registry, on SQLite (what is attacked here is not the database)."""
    yield from _registry(request, tmp_path, monkeypatch)


def edited_kernel(artifact: Path, out: Path) -> Path:
    """The artifact with a planted bug in kernel.cu (the last visible keys read by no KV
    partition), its sha256 updated in the manifest, proof/ kept as it was: a careless or hostile
    hand's edit after `verify`."""
    mutate.apply(artifact, out, SHORT_PARTITIONS.edit, SHORT_PARTITIONS.file)
    shutil.copytree(artifact / "proof", out / "proof")
    m = read_manifest(out)
    files = m.files | {"kernel.cu": hashlib.sha256((out / "kernel.cu").read_bytes()).hexdigest()}
    fixed = Manifest.from_json(m.to_json() | {"files": files})
    (out / "manifest.json").write_text(json.dumps(fixed.to_json(), indent=1, sort_keys=True))
    return out


def publish_cli(reg: Registry, directory: Path) -> Any:
    reg.home(reg.publisher)
    return runner.invoke(app, ["publish", str(directory), "--json"])


def nothing_published(reg: Registry, tmp_path: Path) -> None:
    assert registry.list_artifacts(reg.engine()) == []
    out = tmp_path / "pulled"
    refused(pull(reg, out), "no artifact of tiny-llama")
    assert_nothing_written(out)


# --- a signature means "proved here" ---------------------------------------------------------


def test_an_edited_kernel_with_updated_manifest_and_stale_proof_is_not_published(
    reg: Registry, artifact: Path, tmp_path: Path
):
    edited = edited_kernel(artifact, tmp_path / "edited")
    refused(publish_cli(reg, edited), "a stale proof; run `amk-farm verify")
    # the summary edited to name the new manifest: the verdict derived again still fails
    summary = json.loads((edited / "proof/summary.json").read_text())
    summary["manifest_sha256"] = hashlib.sha256((edited / "manifest.json").read_bytes()).hexdigest()
    (edited / "proof/summary.json").write_text(json.dumps(summary))
    refused(publish_cli(reg, edited), "not verified as it is now")
    nothing_published(reg, tmp_path)


def test_a_proof_dir_that_is_not_of_the_artifacts_obligations_is_not_published(
    reg: Registry, artifact: Path, tmp_path: Path
):
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    certs = sorted(p for p in (copy / "proof").glob("*.json") if p.name != "summary.json")
    certs[0].unlink()
    refused(publish_cli(reg, copy), "lacks 1")
    cert = json.loads(certs[1].read_text())
    cert["obligation"]["goal"] += "(assert true)\n"  # no longer the query its key names
    certs[1].write_text(json.dumps(cert))
    shutil.copy(artifact / "proof" / certs[0].name, certs[0])
    refused(publish_cli(reg, copy), "a certificate of another query")
    nothing_published(reg, tmp_path)


@pytest.mark.parametrize("secret", [None, SECRET], ids=["no-secret", "secret"])
def test_a_forged_proof_cache_entry_does_not_pass_an_edited_artifact(
    artifact: Path, tmp_path: Path, secret: bytes | None
):
    """Every query of the edited artifact that the cache does not hold gets a forged "proved"
    entry (a real proof copied under its key; with a secret, also with the key inside edited to
    match): none is believed, and the planted bug's obligation fails."""
    edited = edited_kernel(artifact, tmp_path / "edited")
    seed = seed_cache(artifact).directory
    cache = ProofCache(tmp_path / "proofs", secret)
    shutil.copytree(seed, cache.directory)
    honest = next(cache.directory.glob("*.json"))
    new = {ob.key for ob in obligations_of(edited, Report(str(edited)))} - {
        p.stem for p in seed.glob("*.json")
    }
    assert new
    for key in new:
        forged = json.loads(honest.read_text()) | ({"key": key} if secret else {})
        (cache.directory / f"{key}.json").write_text(json.dumps(forged))
    report = verify(edited, cache=cache, write_proof=False)
    judged = [(ob, r, cached) for ob, r, cached in report.results if ob.key in new]
    assert judged and not any(cached for _, _, cached in judged)
    assert any(ob.cls == "d" and not r.proved for ob, r, _ in judged), report.failures()
    assert not report.ok


def test_a_fresh_verified_artifact_publishes_with_its_verdict_and_pulls(
    reg: Registry, artifact: Path, tmp_path: Path
):
    published = json.loads(ok(publish_cli(reg, artifact)).stdout)
    out = tmp_path / "pulled"
    ok(pull(reg, out))
    assert tree(out) == tree(artifact)
    statement = json.loads(base64.b64decode(_envelope(reg)["payload"]))
    v = statement["predicate"]["verification"]
    summary = json.loads((artifact / "proof/summary.json").read_text())
    assert v["manifest_sha256"] == published["manifest_digest"] == summary["manifest_sha256"]
    assert v["proved"] == v["obligations"] == summary["obligations"] > 0
    assert v["verifier"] == summary["verifier"] and v["verifier"]["version"]


def _resign(reg: Registry, edit: Callable[[dict[str, Any]], None]) -> None:
    """Replace the signature row by one over the edited statement, signed by the publisher's
    own (trusted) key: what a publisher running a careless tool, or holding a stolen key
    but no proof, could produce."""
    statement = json.loads(base64.b64decode(_envelope(reg)["payload"]))
    edit(statement)
    reg.home(reg.publisher)
    subject = statement["subject"][0]
    env = signing.sign(
        signing.load_private_key(),
        subject["name"],
        subject["digest"]["sha256"],
        statement["predicate"],
    )
    _set_envelope(reg, env)


def _v(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(st: dict[str, Any]) -> None:
        if value is None:
            del st["predicate"]["verification"][field]
        else:
            st["predicate"]["verification"][field] = value

    return edit


def _proved_one_less(st: dict[str, Any]) -> None:
    st["predicate"]["verification"]["proved"] -= 1


def _other_subject(st: dict[str, Any]) -> None:
    st["subject"][0]["digest"]["sha256"] = "0" * 64


def _no_verification(st: dict[str, Any]) -> None:
    del st["predicate"]["verification"]


FORGED = [
    (_proved_one_less, "verification.proved"),
    (_v("proved", True), "verification.proved"),
    (_v("obligations", 0), "verification.obligations"),
    (_v("verified", False), "verification.verified"),
    (_v("manifest_sha256", "0" * 64), "verification.manifest_sha256"),
    (_v("manifest_sha256", None), "verification.manifest_sha256"),  # the old form
    (_v("verifier", None), "verification.verifier"),
    (_v("verifier", {"version": ""}), "verification.verifier"),
    (_other_subject, "about another manifest"),
    (_no_verification, "no verification record"),
]


def test_pull_refuses_an_attestation_that_is_not_proved_here(
    reg: Registry, artifact: Path, tmp_path: Path
):
    ok(publish_cli(reg, artifact))
    out = tmp_path / "pulled"
    _resign(reg, lambda st: None)  # the harness alone: re-signed unchanged, still accepted
    ok(pull(reg, out))
    shutil.rmtree(out)
    original = _envelope(reg)
    for edit, message in FORGED:
        _set_envelope(reg, original)
        _resign(reg, edit)
        refused(pull(reg, out), message)
        assert_nothing_written(out)


# --- trust roots are the puller's own ----------------------------------------------------------


def test_a_key_added_through_the_database_only_is_not_trusted(
    reg: Registry, artifact: Path, tmp_path: Path
):
    """Another user publishes with their own key, puts it in the shared database's
    trusted_keys table and runs `keys trust` on it: the puller, who trusts only the
    publisher's key, still refuses; given the key itself (--key), the same artifact pulls."""
    mallory = tmp_path / "mallory"
    reg.home(mallory)
    ok(runner.invoke(app, ["keys", "init"]))
    warm(mallory, artifact)
    ok(runner.invoke(app, ["publish", str(artifact)]))
    pub = mallory / "keys" / "signing.key.pub"
    ok(runner.invoke(app, ["keys", "trust", str(pub)]))
    assert (mallory / "trusted").is_dir()  # mallory's own trust, in mallory's home
    key = signing.load_public_key(pub)
    with Session(reg.engine()) as s, s.begin():
        assert s.query(db.TrustedKey).count() == 0  # `keys trust` wrote nothing shared
        s.add(db.TrustedKey(key_id=signing.key_id(key), pem=signing.public_pem(key)))
    out = tmp_path / "pulled"
    refused(pull(reg, out), "signed by unknown key")
    assert_nothing_written(out)
    ok(
        runner.invoke(
            app,
            [
                "pull",
                "tiny-llama",
                "-t",
                TEMPLATE,
                "--arch",
                ARCH,
                "-o",
                str(out),
                "--key",
                str(pub),
            ],
        )
    )


def _pem_public(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _private_pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


GOOD = Ed25519PrivateKey.generate()
NOT_KEYS = {
    "a path to a key": lambda d: str(d / "good.pem").encode(),
    "a private key": lambda d: _private_pem(GOOD),
    "garbage": lambda d: b"hello\n",
    "empty": lambda d: b"",
    "two keys": lambda d: _pem_public(GOOD) + _pem_public(Ed25519PrivateKey.generate()),
    "a key and more": lambda d: _pem_public(GOOD) + b"/etc/passwd\n",
    "an RSA key": lambda d: _pem_public(
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ),
    "binary": lambda d: bytes(range(256)) * 40,
}


@pytest.mark.parametrize("what", sorted(NOT_KEYS))
def test_keys_trust_refuses_anything_but_one_ed25519_public_key(
    what: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    home = tmp_path / "home"
    monkeypatch.setenv("AMK_HOME", str(home))
    (tmp_path / "good.pem").write_bytes(_pem_public(GOOD))
    bad = tmp_path / "bad.pem"
    bad.write_bytes(NOT_KEYS[what](tmp_path))
    result = runner.invoke(app, ["keys", "trust", str(bad)])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad} "), result.stderr
    assert "PRIVATE" not in result.stderr and "BEGIN" not in result.stderr
    assert not home.exists()  # nothing written, not even the directory


def test_keys_trust_of_a_public_key_writes_it_into_the_users_trusted_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    home = tmp_path / "home"
    monkeypatch.setenv("AMK_HOME", str(home))
    monkeypatch.delenv("AMK_SIGNING_KEY", raising=False)
    good = tmp_path / "good.pem"
    good.write_bytes(b"\n" + _pem_public(GOOD) + b"\n")  # surrounding whitespace is fine
    first = json.loads(ok(runner.invoke(app, ["keys", "trust", str(good), "--json"])).stdout)
    assert first["added"] and first["key_id"] == signing.key_id(GOOD)
    assert Path(first["path"]).read_bytes() == _pem_public(GOOD)
    assert Path(first["path"]).parent == home / "trusted"
    again = json.loads(ok(runner.invoke(app, ["keys", "trust", str(good), "--json"])).stdout)
    assert not again["added"]
    assert list(signing.trusted_keys()) == [signing.key_id(GOOD)]
    for missing in (tmp_path / "none.pem", tmp_path):  # no file; a directory
        refused(runner.invoke(app, ["keys", "trust", str(missing)]), str(missing))


# --- the farm's verdict ----------------------------------------------------------------------


class _Row:
    def __init__(self, key: str, status: str, cls: str = "b"):
        self.structural_key, self.status, self.cls = key, status, cls


def test_the_farms_verdict_is_of_its_manifest_and_its_index_only():
    from amk_farm.farm import FarmError, _verdict

    m = "a" * 64
    index = {
        "manifest": m,
        "verifier": {"version": "0.3.0", "source_sha256": "b" * 64, "z3": "4"},
        "obligations": [{"key": "k1"}, {"key": "k2"}, {"key": "k2"}],
        "checks": [{"check": "c", "ok": True, "why": ""}],
        "skipped": [],
    }
    rows = [_Row("k1", "proved"), _Row("k2", "proved"), _Row("k2", "cached")]
    summary = {"failures": []}
    v = _verdict(m, index, summary, rows)
    assert v.ok and (v.obligations, v.proved, v.keys) == (3, 3, frozenset({"k1", "k2"}))
    assert v.predicate()["manifest_sha256"] == m and v.predicate()["verifier"]["version"]
    with pytest.raises(FarmError, match="not of the manifest"):  # an index of another build
        _verdict("c" * 64, index, summary, rows)
    with pytest.raises(FarmError, match="not of the manifest"):  # an index naming none
        _verdict(m, {k: v for k, v in index.items() if k != "manifest"}, summary, rows)
    with pytest.raises(FarmError, match="not those of its index"):  # a row slipped in
        _verdict(m, index, summary, [*rows, _Row("k3", "proved")])
    failed = _verdict(m, index, summary, [_Row("k1", "failed"), *rows[1:]])
    assert not failed.ok and failed.proved == 2


def test_publish_refuses_a_given_verdict_about_another_manifest(reg: Registry, artifact: Path):
    reg.home(reg.publisher)
    verdict = attest.derive(artifact, seed_cache(artifact))
    assert verdict.ok
    other = dataclasses.replace(verdict, manifest_sha256="0" * 64)
    with pytest.raises(registry.RegistryError, match="not the one proved"):
        registry.publish(
            artifact,
            engine=reg.engine(),
            store=reg.store,
            private_key=signing.load_private_key(),
            verdict=other,
        )
    assert registry.list_artifacts(reg.engine()) == []
