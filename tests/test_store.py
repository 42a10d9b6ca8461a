"""The blob store: the same cases against a local directory and a real S3 server on loopback.

The S3 server is moto's, started in a thread on 127.0.0.1 and spoken to over HTTP through
boto3 with `AMK_S3_ENDPOINT_URL`, as a MinIO or AWS endpoint would be (no in-process patching).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest

from amk_farm.store import BlobStore, LocalStore, S3Store, StoreError, open_store
from tests.blobs import corrupt_blob

BUCKET = "amk-test"


@pytest.fixture(scope="module")
def s3_bucket(s3_endpoint: str) -> str:
    boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=BUCKET)
    return BUCKET


@pytest.fixture
def s3_env(
    s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> str:
    """Point amk-farm at the loopback server, with dummy credentials and nothing from ~/.aws."""
    monkeypatch.setenv("AMK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AMK_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_endpoint


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    """A fresh store of each kind (S3: a fresh prefix in the shared bucket)."""
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    request.getfixturevalue("s3_env")
    return open_store(f"s3://{BUCKET}/t-{uuid.uuid4().hex[:8]}")


def test_round_trip_of_bytes_and_files(store: BlobStore, tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()

    assert not store.exists(want)
    assert store.put_file(src) == want
    assert store.exists(want)
    assert store.get_bytes(want) == data
    dest = tmp_path / "out" / "dest.bin"
    store.get_file(want, dest)
    assert dest.read_bytes() == data
    assert sorted(p.name for p in dest.parent.iterdir()) == ["dest.bin"]  # no temp left

    small = store.put_bytes(b"hello")
    assert small == hashlib.sha256(b"hello").hexdigest()
    assert store.get_bytes(small) == b"hello"
    empty = store.put_bytes(b"")
    assert store.get_bytes(empty) == b""


def test_local_layout_is_sha256_sharded_and_read_only(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/store")
    d = store.put_bytes(b"layout")
    blob = tmp_path / "store" / "sha256" / d[:2] / d
    assert blob.read_bytes() == b"layout"
    assert blob.stat().st_mode & 0o777 == 0o444
    assert sorted(p.name for p in blob.parent.iterdir()) == [d]


def test_s3_layout_is_prefix_sha256_digest(s3_env: str) -> None:
    store = open_store(f"s3://{BUCKET}/layout/")
    assert isinstance(store, S3Store)
    d = store.put_bytes(b"layout")
    body = store.client.get_object(Bucket=BUCKET, Key=f"{store.prefix}/sha256/{d}")["Body"]
    assert body.read() == b"layout"
    assert store.url == f"s3://{BUCKET}/layout"


def _count_uploads(store: BlobStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every upload the store makes (local: every blob installed)."""
    calls: list[str] = []
    if isinstance(store, S3Store):
        real: Callable[..., Any] = store.client.upload_fileobj

        def upload(*args: Any, **kwargs: Any) -> Any:
            calls.append(args[2])
            return real(*args, **kwargs)

        monkeypatch.setattr(store.client, "upload_fileobj", upload)
    else:
        real_install = LocalStore._install

        def install(self: LocalStore, digest: str, chunks: Any) -> None:
            calls.append(digest)
            real_install(self, digest, chunks)

        monkeypatch.setattr(LocalStore, "_install", install)
    return calls


def test_put_is_idempotent_and_does_not_upload_again(
    store: BlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uploads = _count_uploads(store, monkeypatch)
    src = tmp_path / "a.bin"
    src.write_bytes(b"same bytes" * 100)
    d1 = store.put_file(src)
    d2 = store.put_file(src)
    d3 = store.put_bytes(src.read_bytes())
    assert d1 == d2 == d3
    assert len(uploads) == 1
    assert store.get_bytes(d1) == src.read_bytes()


def test_flipped_byte_is_refused_and_leaves_no_file(store: BlobStore, tmp_path: Path) -> None:
    data = os.urandom(100_000)
    d = store.put_bytes(data)
    corrupt_blob(store, d)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(StoreError, match=f"^blob {d} is corrupt: sha256 [0-9a-f]{{64}}$"):
        store.get_file(d, out / "dest.bin")
    assert list(out.iterdir()) == []  # neither dest nor a temporary file
    with pytest.raises(StoreError, match="is corrupt"):
        store.get_bytes(d)


def test_missing_blob_is_one_line_error_and_leaves_no_file(
    store: BlobStore, tmp_path: Path
) -> None:
    d = hashlib.sha256(b"never stored").hexdigest()
    assert not store.exists(d)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(StoreError) as e:
        store.get_file(d, out / "dest.bin")
    assert str(e.value) == f"blob {d[:12]} is missing from {store.url}"
    assert list(out.iterdir()) == []
    with pytest.raises(StoreError, match="is missing"):
        store.get_bytes(d)


def test_a_bad_digest_is_refused(store: BlobStore, tmp_path: Path) -> None:
    for bad in ["../../etc/passwd", "ABC", "a" * 63, "A" * 64]:
        with pytest.raises(StoreError, match="not a sha256 digest"):
            store.get_file(bad, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_multipart_upload_forced_by_a_small_threshold(
    s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(
        f"s3://{BUCKET}/multipart", multipart_threshold=1 << 20, multipart_chunk=5 << 20
    )
    assert isinstance(store, S3Store)
    parts: list[int] = []
    real = store.client.upload_part

    def upload_part(**kwargs: Any) -> Any:
        parts.append(kwargs["PartNumber"])
        return real(**kwargs)

    monkeypatch.setattr(store.client, "upload_part", upload_part)
    data = os.urandom((5 << 20) + 123_456)  # two parts: 5 MiB and the rest
    src = tmp_path / "big.bin"
    src.write_bytes(data)

    d = store.put_file(src)
    assert sorted(parts) == [1, 2]
    head = store.client.head_object(Bucket=BUCKET, Key=f"multipart/sha256/{d}")
    assert head["ETag"].strip('"').endswith("-2")  # S3 marks a multipart object's ETag
    dest = tmp_path / "dest.bin"
    store.get_file(d, dest)
    assert dest.read_bytes() == data
    # Below the threshold: one plain upload.
    store.put_bytes(b"small")
    assert sorted(parts) == [1, 2]


def test_open_store_default_is_amk_home_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMK_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("AMK_STORE_URL", raising=False)
    store = open_store()
    assert isinstance(store, LocalStore)
    assert store.root == tmp_path / "home" / "store"
    monkeypatch.setenv("AMK_STORE_URL", "s3://bucket/some/prefix")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3 = open_store()
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.url) == ("bucket", "some/prefix", "s3://bucket/some/prefix")


def test_unreachable_s3_is_a_one_line_store_error(s3_env: str, monkeypatch) -> None:
    monkeypatch.setenv("AMK_S3_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: refused
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url="http://127.0.0.1:9",
        config=Config(retries={"max_attempts": 1}, connect_timeout=2),
    )
    store = open_store(f"s3://{BUCKET}/x", client=client)
    with pytest.raises(StoreError) as e:
        store.exists("0" * 64)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"s3://{BUCKET}/x: ")


def test_no_such_bucket_is_a_store_error(s3_env: str) -> None:
    store = open_store("s3://no-such-bucket/x")
    with pytest.raises(StoreError, match="NoSuchBucket"):
        store.put_bytes(b"x")


def test_a_file_edited_while_it_is_stored_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import amk_farm.store as store_module

    store = open_store(str(tmp_path / "store"))
    src = tmp_path / "src.bin"
    src.write_bytes(b"after")
    stale = hashlib.sha256(b"befor").hexdigest()  # what was hashed before the edit
    monkeypatch.setattr(store_module, "_file_digest", lambda path: (stale, 5))
    with pytest.raises(StoreError, match="changed while it was being stored"):
        store.put_file(src)
    assert not store.exists(stale)
    assert list((tmp_path / "store" / "sha256" / stale[:2]).iterdir()) == []
