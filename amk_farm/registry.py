"""The artifact registry: publish verified artifacts, list them, pull them back verified.

An artifact is keyed by (model hash, shape template, arch, compiler version). Its files live in
the blob store under their sha256; the database holds one `artifacts` row, one row per file and
the signature: a DSSE envelope over an in-toto statement whose subject is the manifest's sha256
and whose predicate names the key, the toolchain, the verdict (`attest`: the manifest's sha256,
the verifier, obligations proved of total) and every file's digest.

A signature means "proved here": `publish` signs only a verdict it derived itself from the
artifact as it is on disk (`attest.derive`, the verifier run with the publisher's proof cache)
or that the caller derived (the farm, from the certificates of the obligations it proved), and
refuses a proof/ that is not the proof of this manifest.

Publishing uploads every blob first and then inserts all rows in one transaction, so a reader
sees a whole artifact or none. Two publishers of one key race on the UNIQUE key: one inserts,
the other gets the integrity error and reports "already published".

Pulling trusts nothing it reads: the signature must verify against a key the puller trusts
(keys it holds in local files, passed in by the caller; never a database row), the attestation
must be "proved here" for the manifest it hands out (`attest.check`), its predicate must name
the rows' key and files, and every file
is checked against its sha256 (by the store while downloading, and against the manifest) in a
temporary directory beside the destination, which is renamed into place only when all passed.

Resources are made by the caller (the CLI) and passed in: an engine (`db.engine`), a blob store
(`store.open_store`) and keys (`signing`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import Engine, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from amk_farm import attest, signing
from amk_farm.attest import SUMMARY, Verdict
from amk_farm.db import Artifact, ArtifactFile, Benchmark, Model, Signature
from amk_farm.store import BlobStore, StoreError
from compiler.artifact import (
    MANIFEST,
    ArtifactError,
    Manifest,
    check_files,
    check_output,
    install,
    read_manifest,
    sha256_file,
)

BENCH = "bench.json"


class RegistryError(Exception):
    """Publishing or pulling refused: the message says what and why, in one line."""


@dataclass(frozen=True)
class Published:
    """What `publish` did: `status` is "published" or "already published"."""

    status: str
    model: str
    model_hash: str
    template: str
    arch: str
    compiler_version: str
    manifest_digest: str
    files: int
    key_id: str | None  # the signer of the artifact in the registry
    note: str | None = None  # e.g. the published manifest differs from this one

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Pulled:
    """What `pull` wrote: the artifact directory and what it was checked against."""

    out: str
    model: str
    model_hash: str
    template: str
    arch: str
    compiler_version: str
    manifest_digest: str
    key_id: str
    files: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _proof_summary(directory: Path) -> dict[str, Any]:
    """proof/summary.json, if it says verified with no failures; else RegistryError. (Only a
    first, cheap refusal: what is signed is the verdict derived again, `attest.derive`.)"""
    path = directory / SUMMARY
    fix = f"run `amk-farm verify {directory}` first"
    if not path.is_file():
        raise RegistryError(f"{directory}: not verified (no {SUMMARY}); {fix}")
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RegistryError(f"{path}: malformed JSON; {fix}") from None
    if not isinstance(summary, dict):
        raise RegistryError(f"{path}: not a proof summary; {fix}")
    failures = summary.get("failures")
    if summary.get("verified") is not True or failures or failures is None:
        first = failures[0] if isinstance(failures, list) and failures else "verified is false"
        raise RegistryError(f"{directory}: not verified ({first}); refusing to publish")
    if summary.get("proved") != summary.get("obligations"):
        raise RegistryError(f"{directory}: not every obligation is proved; refusing to publish")
    return summary


def _files(directory: Path, manifest: Manifest) -> dict[str, Path]:
    """Every file a published artifact holds: the manifest, its files, proof/, bench.json."""
    names = [MANIFEST, *manifest.files]
    names += [str(p.relative_to(directory)) for p in sorted((directory / "proof").rglob("*"))]
    if (directory / BENCH).is_file():
        names.append(BENCH)
    return {n: directory / n for n in dict.fromkeys(names) if (directory / n).is_file()}


def _bench_summary(path: Path, digest: str) -> dict[str, Any] | None:
    """The scalar fields and versions of bench.json (the rows stay in the blob)."""
    if not path.is_file():
        return None
    try:
        bench = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RegistryError(f"{path}: malformed JSON") from None
    if not isinstance(bench, dict):
        raise RegistryError(f"{path}: not a benchmark result")
    out = {k: v for k, v in bench.items() if isinstance(v, str | int | float | bool)}
    if isinstance(bench.get("versions"), dict):
        out["versions"] = bench["versions"]
    return {**out, "sha256": digest}


def _bound(directory: Path, summary: dict[str, Any], digest: str) -> None:
    """proof/summary.json is of the manifest whose sha256 is `digest`; else RegistryError."""
    named = summary.get("manifest_sha256")
    if named != digest:
        of = f"of manifest {named[:12]}" if isinstance(named, str) and named else "of no manifest"
        raise RegistryError(
            f"{directory / SUMMARY} is {of}, not of this one ({digest[:12]}): a stale proof; "
            f"run `amk-farm verify {directory}` again"
        )


def _predicate(
    manifest: Manifest, verdict: Verdict, digests: dict[str, str], bench: Any
) -> dict[str, Any]:
    return {
        "artifact": {
            "model": manifest.model,
            "model_hash": manifest.model_hash,
            "template": manifest.template,
            "arch": manifest.arch,
            "compiler_version": manifest.compiler_version,
            "options_hash": manifest.options_hash,
        },
        "toolchain": manifest.toolchain,
        "verification": verdict.predicate(),
        "benchmark": bench,
        "files": {n: d for n, d in sorted(digests.items()) if n != MANIFEST},
    }


def _key_filter(manifest: Manifest) -> Any:
    return (
        (Artifact.model_hash == manifest.model_hash)
        & (Artifact.template == manifest.template)
        & (Artifact.arch == manifest.arch)
        & (Artifact.compiler_version == manifest.compiler_version)
    )


def _already(s: Session, manifest: Manifest, digest: str) -> Published | None:
    art = s.scalars(
        select(Artifact).where(_key_filter(manifest)).options(selectinload(Artifact.files))
    ).first()
    if art is None:
        return None
    keys = s.scalars(select(Signature.key_id).where(Signature.artifact_id == art.id)).all()
    note = None
    if art.manifest_digest != digest:
        note = (
            f"the published manifest ({art.manifest_digest[:12]}) differs from this one "
            f"({digest[:12]}); the registry keeps the first"
        )
    return Published(
        "already published",
        art.model_name,
        *art.key,
        art.manifest_digest,
        len(art.files),
        keys[0] if keys else None,
        note,
    )


def _insert_ignore(s: Session, table: Any, **values: Any) -> None:
    """INSERT ... ON CONFLICT DO NOTHING (SQLite and PostgreSQL)."""
    if s.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        s.execute(pg_insert(table).values(**values).on_conflict_do_nothing())
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        s.execute(sqlite_insert(table).values(**values).on_conflict_do_nothing())


def publish(
    artifact_dir: Path,
    *,
    engine: Engine,
    store: BlobStore,
    private_key: Any,
    verdict: Verdict | None = None,
    cache: Any = None,
    jobs: int = 1,
) -> Published:
    """Publish a verified artifact directory: blobs to the store, signed rows to the database.

    Args:
        artifact_dir: an artifact directory whose `proof/` is the proof of its manifest.
        engine: the registry database (`db.engine`).
        store: where the blobs go.
        private_key: the Ed25519 signing key (`signing.load_private_key`).
        verdict: the verdict about this artifact, derived by the caller from what it proved;
            None: derive it here (`attest.derive`, with `cache` and `jobs`).
        cache: the publisher's `verifier.cache.ProofCache`, for `attest.derive`.
        jobs: solver processes for `attest.derive`.

    Returns:
        What was done; "already published" if the key was there (no error: publishing is
        idempotent, and of two concurrent publishers of one key exactly one inserts).

    Raises:
        RegistryError: the artifact is not proved as it is (the verdict derived again fails,
            or is of another manifest), its proof/ is stale or not of its obligations, it does
            not match its manifest, or a blob could not be stored.
    """
    directory = Path(artifact_dir)
    manifest = _checked(directory)
    if verdict is not None:
        return _sign_and_store(directory, directory, verdict, engine, store, private_key)
    with tempfile.TemporaryDirectory(prefix="amk-publish-") as tmp:
        # verified and published from one private copy: a writer of the directory cannot
        # show the verifier one file and the store another
        copy = _snapshot(directory, manifest, Path(tmp) / "artifact")
        verdict = attest.derive(copy, cache, jobs)
        return _sign_and_store(copy, directory, verdict, engine, store, private_key)


def _checked(directory: Path) -> Manifest:
    """The manifest of an artifact whose files match it and whose proof/ is of it."""
    try:
        manifest = read_manifest(directory)
        summary = _proof_summary(directory)
        check_files(directory, manifest)
    except ArtifactError as e:
        raise RegistryError(f"{e}; refusing to publish") from None
    _bound(directory, summary, sha256_file(directory / MANIFEST))
    _bench_summary(directory / BENCH, "")
    return manifest


def _snapshot(directory: Path, manifest: Manifest, copy: Path) -> Path:
    """The files a published artifact holds (`_files`), copied into `copy`."""
    for name, path in _files(directory, manifest).items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy / name)
    return copy


def _sign_and_store(
    where: Path, label: Path, verdict: Verdict, engine: Engine, store: BlobStore, private_key: Any
) -> Published:
    """Publish the artifact in `where` (named `label` in messages) with `verdict`."""
    try:
        manifest = _checked(where)
    except RegistryError as e:
        raise RegistryError(str(e).replace(str(where), str(label))) from None
    if not verdict.ok:
        first = verdict.failures[0] if verdict.failures else "not every obligation is proved"
        raise RegistryError(f"{label}: not verified as it is now ({first}); refusing to publish")
    why = attest.certificates(where, verdict.keys)
    if why:
        raise RegistryError(f"{label}: {why}; run `amk-farm verify {label}` again")
    files = _files(where, manifest)
    digests = {n: sha256_file(p) for n, p in files.items()}
    if any(digests[n] != d for n, d in manifest.files.items()):
        raise RegistryError(f"{label}: a file changed while publishing; refusing to publish")
    mdigest = digests[MANIFEST]
    if verdict.manifest_sha256 != mdigest:
        raise RegistryError(f"{label}: the manifest is not the one proved; refusing to publish")
    with Session(engine) as s:
        done = _already(s, manifest, mdigest)
    if done is not None:
        return done

    for name, path in files.items():  # blobs first: rows never name a missing blob
        try:
            got = store.put_file(path)
        except (StoreError, OSError) as e:
            raise RegistryError(f"could not store {name}: {e}") from None
        if got != digests[name]:
            raise RegistryError(f"{label / name} changed while publishing; refusing to publish")
    bench = _bench_summary(where / BENCH, digests.get(BENCH, ""))
    predicate = _predicate(manifest, verdict, digests, bench)
    subject = f"{manifest.model}/{manifest.template}/{manifest.arch}/{MANIFEST}"
    envelope = signing.sign(private_key, subject, mdigest, predicate)
    kid = signing.key_id(private_key)

    try:
        with Session(engine) as s, s.begin():  # rows last, all in one transaction
            done = _already(s, manifest, mdigest)
            if done is not None:
                return done
            art = Artifact(
                model_name=manifest.model,
                model_hash=manifest.model_hash,
                template=manifest.template,
                arch=manifest.arch,
                compiler_version=manifest.compiler_version,
                status="published",
                manifest_digest=mdigest,
                store_url=store.url,
            )
            art.files = [
                ArtifactFile(path=n, sha256=digests[n], size=p.stat().st_size)
                for n, p in files.items()
            ]
            s.add(art)
            s.add(Signature(artifact=art, key_id=kid, envelope=envelope))
            if bench is not None:
                result = json.loads((where / BENCH).read_text())
                gpu = result.get("versions", {}).get("card") if isinstance(result, dict) else None
                s.add(Benchmark(artifact=art, gpu=gpu, result=result))
            s.flush()  # the artifact's UNIQUE key is checked here
            _insert_ignore(s, Model.__table__, name=manifest.model, model_hash=manifest.model_hash)
    except IntegrityError:  # a concurrent publisher of the same key won
        with Session(engine) as s:
            done = _already(s, manifest, mdigest)
        if done is None:
            raise
        return done
    return Published(
        "published",
        manifest.model,
        *manifest.key,
        mdigest,
        len(files),
        kid,
    )


def list_artifacts(engine: Engine, model: str | None = None) -> list[dict[str, Any]]:
    """Published artifacts, newest first; `model` (a name, alias or model hash) filters."""
    with Session(engine) as s:
        q = select(Artifact).options(
            selectinload(Artifact.files), selectinload(Artifact.signatures)
        )
        if model is not None:
            q = q.where(_model_filter(model))
        rows = s.scalars(q.order_by(Artifact.created.desc(), Artifact.id.desc())).all()
        return [
            {
                "model": a.model_name,
                "model_hash": a.model_hash,
                "template": a.template,
                "arch": a.arch,
                "compiler_version": a.compiler_version,
                "status": a.status,
                "manifest_digest": a.manifest_digest,
                "files": len(a.files),
                "bytes": sum(f.size for f in a.files),
                "signed_by": [sig.key_id for sig in a.signatures],
                "store_url": a.store_url,
                "created": a.created.isoformat(),
            }
            for a in rows
        ]


def _model_filter(model: str) -> Any:
    """Rows of `model`: a model hash, or a catalog name or alias (or the name as given)."""
    from amk_farm import catalog
    from compiler.spec import SpecError

    names = {model}
    if re.fullmatch(r"[0-9a-f]{64}", model) is None:
        with contextlib.suppress(SpecError, OSError, ValueError):  # not a catalog name
            names.add(catalog.resolve(model).name)
    return or_(Artifact.model_hash == model, Artifact.model_name.in_(sorted(names)))


def _version_key(a: Artifact) -> tuple[Any, ...]:
    """Order compiler versions numerically ("0.10.0" after "0.9.1"), then by publication."""
    parts = tuple(int(n) for n in re.findall(r"\d+", a.compiler_version))
    return (parts, a.created, a.id)


def _safe_path(name: str) -> PurePosixPath:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not p.parts or "\\" in name:
        raise RegistryError(f"refusing a file path outside the artifact: {name!r}")
    return p


def _check_statement(art: Artifact, statement: dict[str, Any], rows: dict[str, str]) -> None:
    """The signed statement is about this manifest, this key and exactly these files."""
    desc = f"{art.model_name} {art.template} {art.arch}"
    if statement.get("predicateType") != signing.PREDICATE_TYPE:
        raise RegistryError(f"{desc}: the signature is not a verified-kernel attestation")
    why = attest.check(statement, art.manifest_digest)
    if why:
        raise RegistryError(f"{desc}: {why}")
    pred = statement["predicate"]
    signed = pred.get("artifact", {}) if isinstance(pred, dict) else {}
    key = (signed.get("model_hash"), signed.get("template"), signed.get("arch"))
    if (*key, signed.get("compiler_version")) != art.key:
        raise RegistryError(f"{desc}: the signature names another artifact key than the database")
    files = {n: d for n, d in rows.items() if n != MANIFEST}
    if pred.get("files") != files or rows.get(MANIFEST) != art.manifest_digest:
        raise RegistryError(f"{desc}: the database's file list is not the one that was signed")


def pull(
    model: str,
    template: str,
    arch: str,
    out_dir: Path,
    *,
    engine: Engine,
    store: BlobStore,
    trusted: Mapping[str, Any],
    force: bool = False,
) -> Pulled:
    """Fetch a published artifact into `out_dir`, checked end to end before anything appears.

    Args:
        model: a model name, alias or model hash.
        template: the shape template (`b1-s4096`).
        arch: the CUDA arch (`sm_90a`).
        out_dir: the artifact directory to write: absent or empty, or with `force` a directory
            whose files of the artifact's are replaced and whose other files are kept.
        engine: the registry database.
        store: the blob store holding the artifact's blobs.
        trusted: the public keys, by key id, that this puller trusts: the caller's own, from
            local files (never from the database, which any of its writers could fill).
        force: write into a non-empty `out_dir` (compiler/artifact.py `install`).

    Returns:
        What was pulled. If several compiler versions are published, the newest.

    Raises:
        RegistryError: not found, unsigned, signed by an unknown key, altered, or a blob that is
            missing or corrupt. `out_dir` is then as it was (not created if it did not exist).
    """
    out = Path(out_dir)
    check_output(out, force)  # before anything is fetched
    keys = dict(trusted)
    with Session(engine) as s:
        found = s.scalars(
            select(Artifact)
            .where(_model_filter(model), Artifact.template == template, Artifact.arch == arch)
            .options(selectinload(Artifact.files), selectinload(Artifact.signatures))
        ).all()
        if not found:
            raise RegistryError(f"no artifact of {model} {template} {arch} in the registry")
        art = max(found, key=_version_key)
        s.expunge_all()
    desc = f"{art.model_name} {art.template} {art.arch} (compiler {art.compiler_version})"
    rows = {f.path: f.sha256 for f in art.files}
    sizes = {f.path: f.size for f in art.files}

    if not art.signatures:
        raise RegistryError(f"{desc}: no signature in the registry; refusing to pull")
    if not keys:
        raise RegistryError("no trusted keys; add one with `amk-farm keys trust PEM_FILE`")
    why = ""
    signer = None
    for sig in art.signatures:
        try:
            statement = signing.verify(sig.envelope, keys)
            _check_statement(art, statement, rows)
        except (signing.SignatureError, RegistryError) as e:
            why = why or str(e)
            continue
        signer = sig.key_id
        break
    if signer is None:
        raise RegistryError(f"{desc}: {why}; refusing to pull")

    try:
        raw = store.get_bytes(art.manifest_digest)
        if hashlib.sha256(raw).hexdigest() != art.manifest_digest:
            raise RegistryError(f"{desc}: the stored manifest is not the one signed")
        manifest = Manifest.from_json(json.loads(raw))
    except StoreError as e:
        raise RegistryError(f"{desc}: manifest: {e}") from None
    except (ArtifactError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RegistryError(f"{desc}: the signed manifest is unreadable: {e}") from None
    if manifest.key != art.key:
        raise RegistryError(f"{desc}: the manifest names another artifact key than the database")
    for name, digest in manifest.files.items():
        if rows.get(name) != digest:
            raise RegistryError(f"{desc}: {name} is in the manifest but not in the database")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        for name, digest in sorted(rows.items()):
            dest = tmp / _safe_path(name)
            try:
                store.get_file(digest, dest)  # hashed while streaming; appears only if it matches
            except StoreError as e:
                raise RegistryError(f"{desc}: {name}: {e}") from None
            if sha256_file(dest) != digest or dest.stat().st_size != sizes[name]:
                raise RegistryError(f"{desc}: {name} does not match its sha256 or size")
        try:
            check_files(tmp, manifest)
        except ArtifactError as e:
            raise RegistryError(f"{desc}: {e}") from None
        install(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Pulled(
        str(out),
        art.model_name,
        *art.key,
        art.manifest_digest,
        signer,
        sorted(rows),
    )
