"""Shared pytest configuration: tests marked `gpu` are skipped where no CUDA GPU is visible;
the services tests talk to (PostgreSQL at 127.0.0.1:5432, an S3 server on loopback) as
session fixtures, and a fresh PostgreSQL database per use (`pg_database`)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

POSTGRES = "postgresql+psycopg://root@127.0.0.1:5432"
_PG_ADMIN = "host=127.0.0.1 port=5432 user=root dbname=postgres"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """The PostgreSQL server URL (no database), or a skip saying why there is none."""
    import psycopg

    try:
        psycopg.connect(_PG_ADMIN, connect_timeout=3).close()
    except psycopg.OperationalError as e:
        pytest.skip(f"PostgreSQL is not reachable at 127.0.0.1:5432 ({str(e).strip()[:80]})")
    yield POSTGRES


def pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(_PG_ADMIN, autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


@pytest.fixture
def pg_database(postgres: str) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped afterwards."""
    name = f"amk_test_{uuid.uuid4().hex[:12]}"
    pg_admin(f"CREATE DATABASE {name}")
    yield f"{postgres}/{name}"
    pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on loopback, spoken to over HTTP as MinIO would be."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
