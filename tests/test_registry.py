"""The registry end to end: a verified tiny-llama artifact is published from one AMK_HOME and
pulled bit-exact into another that holds only the trusted public key; every way of tampering
with the database or the store is refused with one line, exit 1, and no partial directory.

Every test runs on SQLite and on PostgreSQL (a fresh database per test, dropped after; skipped
when 127.0.0.1:5432 does not answer), each with a local store and with S3 (moto's server on
loopback, spoken to over HTTP as MinIO would be).
"""

from __future__ import annotations

import json
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from amk_farm import attest, catalog, db, registry, signing
from amk_farm.cli import app
from amk_farm.store import BlobStore, open_store
from compiler.artifact import read_manifest, sha256_file
from compiler.pipeline import compile_model
from compiler.schedule.schedule import Options
from compiler.spec import ShapeTemplate
from tests.blobs import corrupt_blob, delete_blob
from verifier.cache import ProofCache
from verifier.verify import verify

runner = CliRunner()
BUCKET = "amk-registry-test"
TEMPLATE, ARCH = "b2-s64", "sm_90a"


SECRET = b"s" * 32  # the proof cache secret of every publisher home here


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-llama b2-s64, compiled and verified (proof/ written) once for the module."""
    return verified_artifact(tmp_path_factory)


def verified_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-llama b2-s64, compiled and verified (proof/ written); its proofs are in
    `seed_cache(artifact)`, MACed with SECRET, for publishers to start from (`warm`)."""
    out = tmp_path_factory.mktemp("registry") / "tiny"
    spec, shape = catalog.resolve("tiny-llama"), ShapeTemplate.parse(TEMPLATE)
    compile_model(spec, shape, ARCH, out, Options.for_target(ARCH, shape.batch))
    report = verify(out, jobs=2, cache=seed_cache(out))
    assert report.ok, report.failures()
    return out


def seed_cache(artifact: Path) -> ProofCache:
    return ProofCache(artifact.parent / "proofs", SECRET)


def warm(home: Path, artifact: Path) -> None:
    """Give `home` the artifact's proof cache (and its secret), as if it had verified it."""
    (home / "keys").mkdir(parents=True, exist_ok=True)
    (home / "keys" / "proof-cache.key").write_bytes(SECRET)
    shutil.copytree(seed_cache(artifact).directory, home / "proofs", dirs_exist_ok=True)


@dataclass
class Registry:
    db_url: str
    store_url: str
    store: BlobStore
    publisher: Path  # AMK_HOME with the signing key
    puller: Path  # AMK_HOME with only the trusted public key
    monkeypatch: pytest.MonkeyPatch

    def home(self, home: Path) -> None:
        """Run what follows as `home` (database and store are shared)."""
        self.monkeypatch.setenv("AMK_HOME", str(home))

    def engine(self) -> Any:
        return db.engine(self.db_url)

    def sql(self, statement: str, **params: Any) -> None:
        eng = self.engine()
        with eng.begin() as conn:
            conn.execute(text(statement), params)
        eng.dispose()


def _registry(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Registry]:
    kind, where = request.param.split("-")
    if kind == "postgresql":
        db_url = request.getfixturevalue("pg_database")
    else:
        db_url = f"sqlite:///{tmp_path / 'registry.db'}"
    if where == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        for name, value in {
            "AMK_S3_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        }.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        store_url = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"
    else:
        store_url = str(tmp_path / "store")
    monkeypatch.setenv("AMK_DB_URL", db_url)
    monkeypatch.setenv("AMK_STORE_URL", store_url)
    monkeypatch.delenv("AMK_SIGNING_KEY", raising=False)
    r = Registry(
        db_url, store_url, open_store(store_url), tmp_path / "a", tmp_path / "b", monkeypatch
    )
    r.home(r.publisher)
    ok(runner.invoke(app, ["keys", "init"]))
    warm(r.publisher, request.getfixturevalue("artifact"))
    pub = r.publisher / "keys" / "signing.key.pub"
    r.puller.mkdir()
    shutil.copy(pub, r.puller / "trusted.pub")
    yield r


@pytest.fixture(params=["sqlite-local", "postgresql-local", "sqlite-s3", "postgresql-s3"])
def reg(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Registry]:
    """A fresh registry (database + store), a publisher home with a key, a puller home that
    trusts only the publisher's public key: every database with every store."""
    yield from _registry(request, tmp_path, monkeypatch)


@pytest.fixture(params=["sqlite-local", "postgresql-local"])
def reg_db(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Registry]:
    """As `reg`, for tests of the database and signatures alone: the local store only."""
    yield from _registry(request, tmp_path, monkeypatch)


def ok(result: Any) -> Any:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result


def refused(result: Any, message: str) -> None:
    """Exit 1 with exactly one line `error: ...` containing `message` on stderr."""
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]


def publish(reg: Registry, artifact: Path) -> dict[str, Any]:
    reg.home(reg.publisher)
    return json.loads(ok(runner.invoke(app, ["publish", str(artifact), "--json"])).stdout)


def pull(reg: Registry, out: Path, *extra: str, trust: bool = True) -> Any:
    reg.home(reg.puller)
    if trust:
        ok(runner.invoke(app, ["keys", "trust", str(reg.puller / "trusted.pub")]))
    return runner.invoke(
        app,
        ["pull", "tiny-llama", "-t", TEMPLATE, "--arch", ARCH, "-o", str(out), "--json", *extra],
    )


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def tree(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def file_digest(reg: Registry, path: str) -> str:
    eng = reg.engine()
    with eng.connect() as conn:
        digest = conn.execute(
            text("SELECT sha256 FROM artifact_files WHERE path = :p"), {"p": path}
        ).scalar_one()
    eng.dispose()
    return str(digest)


def test_publish_then_pull_elsewhere_is_bit_exact(reg: Registry, artifact: Path, tmp_path: Path):
    published = publish(reg, artifact)
    manifest = read_manifest(artifact)
    assert published["status"] == "published"
    assert published["manifest_digest"] == sha256_file(artifact / "manifest.json")
    assert (published["model_hash"], published["template"]) == (manifest.model_hash, TEMPLATE)
    assert not (reg.puller / "keys" / "signing.key").exists()  # the puller has no private key
    out = tmp_path / "pulled" / "tiny"
    result = ok(pull(reg, out))
    assert json.loads(result.stdout)["key_id"] == published["key_id"]
    assert tree(out) == tree(artifact)  # manifest, stage files, kernel.cu, proof/ certificates
    assert any(name.startswith("proof/") for name in tree(out))
    listed = json.loads(ok(runner.invoke(app, ["list", "--model", "tiny-llama", "--json"])).stdout)
    assert [(a["template"], a["arch"], a["files"]) for a in listed] == [
        (TEMPLATE, ARCH, len(tree(artifact)))
    ]
    assert listed[0]["signed_by"] == [published["key_id"]]
    by_hash = runner.invoke(app, ["list", "--model", manifest.model_hash, "--json"])
    assert json.loads(by_hash.stdout) == listed
    assert json.loads(runner.invoke(app, ["list", "--model", "llama-2-7b", "--json"]).stdout) == []
    refused(pull(reg, out), "not empty; use --force")  # nothing of the user's is replaced
    (out / "notes.txt").write_text("mine")
    again = ok(pull(reg, out, "--force"))  # the artifact's files replaced, notes.txt kept
    assert json.loads(again.stdout)["manifest_digest"] == published["manifest_digest"]
    assert tree(out) == {**tree(artifact), "notes.txt": b"mine"}


def test_publishing_twice_says_already_published(reg_db: Registry, artifact: Path):
    first = publish(reg_db, artifact)
    second = publish(reg_db, artifact)
    assert (first["status"], second["status"]) == ("published", "already published")
    assert second["manifest_digest"] == first["manifest_digest"]
    text_out = ok(runner.invoke(app, ["publish", str(artifact)])).stdout
    assert "already published" in text_out
    assert len(registry.list_artifacts(reg_db.engine())) == 1


def test_eight_concurrent_publishers_make_one_artifact(reg: Registry, artifact: Path):
    """Eight threads, each with its own engine and store client, publish one key at once."""
    reg.home(reg.publisher)
    key = signing.load_private_key()
    verdict = attest.derive(artifact, seed_cache(artifact))  # derived once, signed by each
    barrier = threading.Barrier(8)
    results: list[Any] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            engine, store = db.engine(reg.db_url), open_store(reg.store_url)
            barrier.wait()
            results.append(
                registry.publish(
                    artifact, engine=engine, store=store, private_key=key, verdict=verdict
                )
            )
            engine.dispose()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    statuses = sorted(r.status for r in results)
    assert statuses == ["already published"] * 7 + ["published"]
    assert len({r.manifest_digest for r in results}) == 1
    assert len(registry.list_artifacts(reg.engine())) == 1
    eng = reg.engine()
    with eng.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM signatures")).scalar_one() == 1
        files = conn.execute(text("SELECT count(*) FROM artifact_files")).scalar_one()
    eng.dispose()
    assert files == len(tree(artifact))


def test_flipped_byte_in_a_stored_blob_is_refused(reg: Registry, artifact: Path, tmp_path: Path):
    publish(reg, artifact)
    corrupt_blob(reg.store, file_digest(reg, "kernel.cu"))
    out = tmp_path / "tiny"
    refused(pull(reg, out), "kernel.cu: blob")
    assert_nothing_written(out)


def test_existing_directory_is_untouched_when_a_pull_fails(
    reg: Registry, artifact: Path, tmp_path: Path
):
    publish(reg, artifact)
    out = tmp_path / "tiny"
    ok(pull(reg, out))
    before = tree(out)
    corrupt_blob(reg.store, file_digest(reg, "schedule.json"))
    refused(pull(reg, out, "--force"), "corrupt")  # over an artifact: only with --force
    assert tree(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tiny.")]


def test_unknown_signing_key_is_refused(reg_db: Registry, artifact: Path, tmp_path: Path):
    publish(reg_db, artifact)
    reg_db.home(tmp_path / "other")  # another key, trusted by the puller instead of the publisher's
    ok(runner.invoke(app, ["keys", "init"]))
    reg_db.home(reg_db.puller)
    ok(runner.invoke(app, ["keys", "trust", str(tmp_path / "other/keys/signing.key.pub")]))
    out = tmp_path / "tiny"
    refused(pull(reg_db, out, trust=False), "signed by unknown key")
    assert_nothing_written(out)
    shutil.rmtree(reg_db.puller / "trusted")  # no trusted key at all: its own message
    refused(pull(reg_db, out, trust=False), "no trusted keys")
    assert_nothing_written(out)
    # a key given on the command line is trusted for that pull
    ok(
        runner.invoke(
            app,
            [
                *("pull", "tiny-llama", "-t", TEMPLATE, "--arch", ARCH, "-o", str(out)),
                *("--key", str(reg_db.puller / "trusted.pub")),
            ],
        )
    )
    assert tree(out) == tree(artifact)


def test_missing_signature_row_is_refused(reg_db: Registry, artifact: Path, tmp_path: Path):
    publish(reg_db, artifact)
    reg_db.sql("DELETE FROM signatures")
    out = tmp_path / "tiny"
    refused(pull(reg_db, out), "no signature")
    assert_nothing_written(out)


def _envelope(reg: Registry) -> dict[str, Any]:
    eng = reg.engine()
    with eng.connect() as conn:
        raw = conn.execute(text("SELECT envelope FROM signatures")).scalar_one()
    eng.dispose()
    return raw if isinstance(raw, dict) else json.loads(raw)


def _set_envelope(reg: Registry, envelope: dict[str, Any]) -> None:
    reg.sql("UPDATE signatures SET envelope = :e", e=json.dumps(envelope))


def test_altered_signature_is_refused(reg_db: Registry, artifact: Path, tmp_path: Path):
    import base64

    publish(reg_db, artifact)
    env = _envelope(reg_db)
    sig = bytearray(base64.b64decode(env["signatures"][0]["sig"]))
    sig[0] ^= 0x01
    env["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    _set_envelope(reg_db, env)
    out = tmp_path / "tiny"
    refused(pull(reg_db, out), "signature does not verify")
    assert_nothing_written(out)


def test_altered_statement_is_refused(reg_db: Registry, artifact: Path, tmp_path: Path):
    """The payload edited to vouch for another kernel.cu: the signature no longer covers it."""
    import base64

    publish(reg_db, artifact)
    env = _envelope(reg_db)
    statement = json.loads(base64.b64decode(env["payload"]))
    statement["predicate"]["files"]["kernel.cu"] = "0" * 64
    env["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    _set_envelope(reg_db, env)
    out = tmp_path / "tiny"
    refused(pull(reg_db, out), "signature does not verify")
    assert_nothing_written(out)


def test_row_whose_blob_is_gone_is_refused(reg: Registry, artifact: Path, tmp_path: Path):
    publish(reg, artifact)
    delete_blob(reg.store, file_digest(reg, "fused.json"))
    out = tmp_path / "tiny"
    refused(pull(reg, out), "missing")
    assert_nothing_written(out)


def test_row_pointing_at_another_blob_is_refused(reg_db: Registry, artifact: Path, tmp_path: Path):
    """A file row re-pointed at another stored blob: not the file list that was signed."""
    publish(reg_db, artifact)
    other = file_digest(reg_db, "graph.json")
    reg_db.sql("UPDATE artifact_files SET sha256 = :d WHERE path = 'kernel.cu'", d=other)
    out = tmp_path / "tiny"
    refused(pull(reg_db, out), "file list is not the one that was signed")
    assert_nothing_written(out)


def test_unverified_or_edited_artifact_is_not_published(
    reg_db: Registry, artifact: Path, tmp_path: Path
):
    reg_db.home(reg_db.publisher)
    bare = tmp_path / "bare"
    shutil.copytree(artifact, bare, ignore=shutil.ignore_patterns("proof"))
    refused(runner.invoke(app, ["publish", str(bare)]), "not verified (no proof/summary.json)")
    failed = tmp_path / "failed"
    shutil.copytree(artifact, failed)
    summary = json.loads((failed / "proof/summary.json").read_text())
    summary |= {"verified": False, "failures": ["(b) layer 0: refuted: counterexample"]}
    (failed / "proof/summary.json").write_text(json.dumps(summary))
    refused(runner.invoke(app, ["publish", str(failed)]), "not verified ((b) layer 0: refuted")
    edited = tmp_path / "edited"
    shutil.copytree(artifact, edited)
    (edited / "kernel.cu").write_text((edited / "kernel.cu").read_text() + "// edited\n")
    refused(runner.invoke(app, ["publish", str(edited)]), "kernel.cu does not match its sha256")
    assert registry.list_artifacts(reg_db.engine()) == []
    out = tmp_path / "tiny"
    refused(pull(reg_db, out), "no artifact of tiny-llama b2-s64 sm_90a")
    assert_nothing_written(out)


def test_db_upgrade_migrates_an_empty_database_once(reg_db: Registry):
    first = json.loads(ok(runner.invoke(app, ["db", "upgrade", "--json"])).stdout)
    assert (first["from"], first["to"]) == (None, db.head())
    again = json.loads(ok(runner.invoke(app, ["db", "upgrade", "--json"])).stdout)
    assert (again["from"], again["to"]) == (db.head(), db.head())
    assert db.current(reg_db.engine()) == db.head()


@pytest.mark.slow  # eight interpreters on a 2-core machine: ~30 s per database
def test_eight_publisher_processes_make_one_artifact(reg_db: Registry, artifact: Path):
    """Eight `amk-farm publish` processes at once: one publishes, seven say already published."""
    import os
    import subprocess
    import sys

    reg_db.home(reg_db.publisher)
    cmd = [sys.executable, "-m", "amk_farm.cli", "publish", str(artifact), "--json"]
    procs = [
        subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(8)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [err for _, err in outs]
    statuses = sorted(json.loads(out)["status"] for out, _ in outs)
    assert statuses == ["already published"] * 7 + ["published"]
    assert len(registry.list_artifacts(reg_db.engine())) == 1


def test_a_home_holding_only_the_public_key_pulls(reg_db: Registry, artifact: Path, tmp_path: Path):
    """AMK_HOME/trusted/*.pem is the puller's own trust: no table row, no --key."""
    publish(reg_db, artifact)
    (reg_db.puller / "trusted").mkdir()
    shutil.copy(reg_db.puller / "trusted.pub", reg_db.puller / "trusted" / "publisher.pem")
    (reg_db.puller / "trusted.pub").unlink()
    out = tmp_path / "tiny"
    ok(pull(reg_db, out, trust=False))
    assert tree(out) == tree(artifact)
    assert sorted(p.name for p in reg_db.puller.rglob("*") if p.is_file()) == ["publisher.pem"]
