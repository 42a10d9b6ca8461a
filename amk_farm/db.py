"""The registry's SQL schema (SQLAlchemy 2.0 typed models) and its engine.

    models      a model graph by name and model hash
    jobs        a farm build of one (model, template, arch); stages and obligations hang off it
    artifacts   one published artifact, keyed by (model hash, template, arch, compiler version)
    artifact_files, signatures, benchmarks   what an artifact holds, who signed it, how fast it is
    trusted_keys  unused: `pull` trusts only the puller's own key files (`signing.trusted_keys`)

The schema is created and changed only by the Alembic migrations in `amk_farm/migrations`;
`engine()` brings a database up to their head on first use. SQLite (the default, a file in
AMK_HOME) and PostgreSQL (`postgresql+psycopg://...`) are both supported; on SQLite every
transaction is `BEGIN IMMEDIATE` with a busy timeout, so concurrent writers queue instead of
failing with "database is locked".
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    make_url,
    text,
)
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SQLITE_BUSY_TIMEOUT_S = 60  # concurrent publishers wait their turn this long before failing
_MIGRATION_LOCK = 0x616D6B66  # "amkf": PostgreSQL advisory lock held while migrating


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSON,
        dt.datetime: DateTime(timezone=True),
    }


class Model(Base):
    """A model graph: its catalog name (or config path) and model hash (graph digest)."""

    __tablename__ = "models"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    model_hash: Mapped[str] = mapped_column(String(64))
    created: Mapped[dt.datetime] = mapped_column(default=utcnow)
    __table_args__ = (UniqueConstraint("name", "model_hash", name="uq_models_name_hash"),)


class Job(Base):
    """One farm build of a model for a shape template and arch.

    `key` names the build (model hash, template, arch, compiler version, options, starting
    stage file): submitting the same build again finds this row. `owner` and `heartbeat` say
    which submitting process drives it; a heartbeat older than `farm.LEASE_S` is a dead owner,
    whose job the next submitter takes over and resumes.
    """

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    template: Mapped[str] = mapped_column(String(64))
    arch: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(32), default="queued")  # running failed published
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished: Mapped[dt.datetime | None]
    key: Mapped[str | None] = mapped_column(String(64), unique=True)
    owner: Mapped[str | None] = mapped_column(String(255))  # host:pid of the driving process
    heartbeat: Mapped[dt.datetime | None]
    error: Mapped[str | None] = mapped_column(Text)  # why it failed, one line
    summary: Mapped[dict[str, Any] | None]  # the proof summary and what was published
    model: Mapped[Model] = relationship()
    stages: Mapped[list[Stage]] = relationship(back_populates="job", order_by="Stage.id")


class Stage(Base):
    """One stage of a job (frontend, fuse, schedule, codegen, nvcc, obligations, prove, bench,
    publish): where and how long it ran, and the digest of what it stored."""

    __tablename__ = "stages"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(
        String(32), default="pending"
    )  # running done failed skipped
    started: Mapped[dt.datetime | None]
    finished: Mapped[dt.datetime | None]
    output_digest: Mapped[str | None] = mapped_column(String(64))  # the stage file's sha256
    error: Mapped[str | None] = mapped_column(Text)  # failed: why; skipped: why not run
    node: Mapped[str | None] = mapped_column(String(255))  # the Ray node (host, node id) it ran on
    seconds: Mapped[float | None] = mapped_column(Float)
    job: Mapped[Job] = relationship(back_populates="stages")
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_stages_job_name"),)


class Obligation(Base):
    """One proof obligation of a job, its verdict, and where its certificate is stored.

    `ordinal` is its place in the job's obligation list (one row each, UNIQUE). `status`:
    pending, running, proved (solved for this job), cached (the proof of an earlier obligation
    with the same structural key, in this job or another), failed (reason and counterexample).
    """

    __tablename__ = "obligations"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    layer: Mapped[int]  # -1: global
    cls: Mapped[str] = mapped_column("class", String(8))
    status: Mapped[str] = mapped_column(String(32))
    structural_key: Mapped[str] = mapped_column(String(64), index=True)
    solver_seconds: Mapped[float | None] = mapped_column(Float)
    certificate_digest: Mapped[str | None] = mapped_column(String(64))  # blob in the store
    ordinal: Mapped[int | None]
    check: Mapped[str | None] = mapped_column(Text)
    subject: Mapped[str | None] = mapped_column(Text)
    obligation_digest: Mapped[str | None] = mapped_column(String(64))  # its JSON in the store
    reason: Mapped[str | None] = mapped_column(Text)
    counterexample: Mapped[dict[str, Any] | None]
    node: Mapped[str | None] = mapped_column(String(255))
    finished: Mapped[dt.datetime | None]
    __table_args__ = (UniqueConstraint("job_id", "ordinal", name="uq_obligations_job_ordinal"),)


class Artifact(Base):
    """A published artifact. Its rows appear in one transaction, after all of its blobs."""

    __tablename__ = "artifacts"
    id: Mapped[int] = mapped_column(primary_key=True)
    model_name: Mapped[str] = mapped_column(String(255), index=True)
    model_hash: Mapped[str] = mapped_column(String(64))
    template: Mapped[str] = mapped_column(String(64))
    arch: Mapped[str] = mapped_column(String(32))
    compiler_version: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(32), default="published")
    manifest_digest: Mapped[str] = mapped_column(String(64))
    store_url: Mapped[str] = mapped_column(Text)
    created: Mapped[dt.datetime] = mapped_column(default=utcnow)
    files: Mapped[list[ArtifactFile]] = relationship(
        back_populates="artifact", order_by="ArtifactFile.path"
    )
    signatures: Mapped[list[Signature]] = relationship(back_populates="artifact")
    __table_args__ = (
        UniqueConstraint(
            "model_hash", "template", "arch", "compiler_version", name="uq_artifacts_key"
        ),
    )

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.model_hash, self.template, self.arch, self.compiler_version)


class ArtifactFile(Base):
    """One file of an artifact: its relative path, sha256 (the blob's name) and size."""

    __tablename__ = "artifact_files"
    id: Mapped[int] = mapped_column(primary_key=True)
    artifact_id: Mapped[int] = mapped_column(ForeignKey("artifacts.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    artifact: Mapped[Artifact] = relationship(back_populates="files")
    __table_args__ = (UniqueConstraint("artifact_id", "path", name="uq_artifact_files_path"),)


class Signature(Base):
    """A DSSE envelope (in-toto statement about the manifest) signed by `key_id`."""

    __tablename__ = "signatures"
    id: Mapped[int] = mapped_column(primary_key=True)
    artifact_id: Mapped[int] = mapped_column(
        ForeignKey("artifacts.id", ondelete="CASCADE"), index=True
    )
    key_id: Mapped[str] = mapped_column(String(128))
    envelope: Mapped[dict[str, Any]]
    created: Mapped[dt.datetime] = mapped_column(default=utcnow)
    artifact: Mapped[Artifact] = relationship(back_populates="signatures")


class Benchmark(Base):
    """A benchmark of an artifact (bench.json): where it ran and what it measured."""

    __tablename__ = "benchmarks"
    id: Mapped[int] = mapped_column(primary_key=True)
    artifact_id: Mapped[int] = mapped_column(
        ForeignKey("artifacts.id", ondelete="CASCADE"), index=True
    )
    gpu: Mapped[str | None] = mapped_column(String(255))
    result: Mapped[dict[str, Any]]
    created: Mapped[dt.datetime] = mapped_column(default=utcnow)
    artifact: Mapped[Artifact] = relationship()


class TrustedKey(Base):
    """Unused, kept so the schema stays at its migration: a database row is never a trust root
    (any writer of the database could add one); `pull` trusts only local key files."""

    __tablename__ = "trusted_keys"
    key_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    pem: Mapped[str] = mapped_column(Text)
    added: Mapped[dt.datetime] = mapped_column(default=utcnow)


def _sqlite_setup(engine: Engine) -> None:
    """Let pysqlite leave transactions to us and begin each one IMMEDIATE (takes the write
    lock up front), so two writers queue on the busy timeout instead of deadlocking."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_S * 1000}")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


class DatabaseURLError(ValueError):
    """A registry URL that names no database amk-farm supports."""


# backend -> the drivers accepted for it (None: the URL names none)
DRIVERS = {"sqlite": (None, "pysqlite"), "postgresql": (None, "psycopg")}
SUPPORTED_URLS = "sqlite:///FILE or postgresql+psycopg://USER@HOST/DB"


def parse_url(url: str) -> URL:
    """`url` as an SQLAlchemy URL of a supported database (`postgresql://` means psycopg 3).

    Raises:
        DatabaseURLError: unparsable, or not SQLite or PostgreSQL through psycopg.
    """
    try:
        u = make_url(url)
    except ArgumentError:
        shown = re.sub(r"(?<=:)[^:@/]*(?=@)", "***", url)[:60]  # no password in the message
        raise DatabaseURLError(
            f"not a database URL: {shown!r} (AMK_DB_URL takes {SUPPORTED_URLS})"
        ) from None
    backend, driver = u.get_backend_name(), u.drivername.partition("+")[2] or None
    if driver not in DRIVERS.get(backend, ()):
        shown = u.render_as_string(hide_password=True)[:80]
        raise DatabaseURLError(
            f"unsupported database URL {shown!r} (AMK_DB_URL takes {SUPPORTED_URLS})"
        )
    return u.set(drivername="postgresql+psycopg") if backend == "postgresql" else u


def create(url: str) -> Engine:
    """An engine for `url`, without touching the schema (see `engine`)."""
    u = parse_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        eng = create_engine(u, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
        _sqlite_setup(eng)
        return eng
    return create_engine(u, pool_pre_ping=True)


def _alembic_config(conn: Any = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.attributes["connection"] = conn
    return cfg


def head() -> str:
    """The newest migration revision."""
    from alembic.script import ScriptDirectory

    rev = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert rev is not None
    return rev


def current(eng: Engine) -> str | None:
    """The revision the database is at (None: an empty database)."""
    from alembic.runtime.migration import MigrationContext

    with eng.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(eng: Engine) -> tuple[str | None, str]:
    """Migrate the database to head, in one transaction; concurrent callers wait their turn.

    Returns:
        (revision before, revision after).
    """
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    with eng.begin() as conn:  # SQLite: BEGIN IMMEDIATE serialises migrators
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
        before = MigrationContext.configure(conn).get_current_revision()
        target = head()
        if before != target:
            command.upgrade(_alembic_config(conn), "head")
    return before, target


def engine(url: str) -> Engine:
    """An engine for `url` whose database is at the migrations' head (migrated if it was not)."""
    eng = create(url)
    if current(eng) != head():
        upgrade(eng)
    return eng
