"""Tampering with a blob store behind its back, for the store and registry tests."""

from __future__ import annotations

from amk_farm.store import BlobStore, LocalStore, S3Store


def corrupt_blob(store: BlobStore, digest: str) -> None:
    """Flip one byte of a stored blob."""
    if isinstance(store, LocalStore):
        path = store.root / "sha256" / digest[:2] / digest
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.chmod(0o644)
        path.write_bytes(bytes(data))
    else:
        assert isinstance(store, S3Store)
        key = f"{store.prefix}/sha256/{digest}"
        data = bytearray(store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read())
        data[len(data) // 2] ^= 0x01
        store.client.put_object(Bucket=store.bucket, Key=key, Body=bytes(data))


def delete_blob(store: BlobStore, digest: str) -> None:
    if isinstance(store, LocalStore):
        (store.root / "sha256" / digest[:2] / digest).unlink()
    else:
        assert isinstance(store, S3Store)
        store.client.delete_object(Bucket=store.bucket, Key=f"{store.prefix}/sha256/{digest}")
