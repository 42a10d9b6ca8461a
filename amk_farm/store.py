"""The content-addressed blob store: a local directory or an S3 bucket, keyed by sha256.

A blob's name is the sha256 of its bytes, so a blob never changes once written, two writers of
one blob write the same bytes, and a reader can check what it got. Every read is checked: bytes
are hashed while they stream, and a blob that does not hash to its name is an error, never a
result. A file fetched with `get_file` appears whole and verified, or not at all.

Layout:
    local:  <dir>/sha256/<d[:2]>/<d>   (written via a temporary file and a rename; read-only)
    S3:     s3://bucket/<prefix>/sha256/<d>   (multipart upload above a size threshold)

`open_store()` picks the backend from a URL: `s3://bucket/prefix` for S3 (any S3-compatible
server; its endpoint is `AMK_S3_ENDPOINT_URL`), a `file://` URL or a plain path for a local
directory, and by default `AMK_STORE_URL` (`AMK_HOME/store`).

Example:
    >>> store = open_store(str(tmp_path / "store"))
    >>> d = store.put_bytes(b"hello")
    >>> d[:12], store.get_bytes(d)
    ('2cf24dba5fb0', b'hello')
    >>> store.get_file(d, tmp_path / "hello.txt")  # verified, atomic
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import unquote, urlparse

from amk_farm import config

CHUNK = 1 << 20  # bytes read per step while hashing or copying
MULTIPART_THRESHOLD = 64 << 20  # S3: blobs at least this large go up in parts
MULTIPART_CHUNK = 16 << 20  # S3: part size (S3 needs >= 5 MiB for every part but the last)
_MIN_PART = 5 << 20
_DIGEST = re.compile(r"[0-9a-f]{64}")


class StoreError(Exception):
    """A blob is missing or corrupt, or the store cannot be reached; the message is one line."""


class BlobStore(Protocol):
    """What every store offers. Digests are sha256, 64 lowercase hex digits."""

    url: str

    def put_file(self, path: Path) -> str:
        """Store the file's bytes (no upload if the blob is there already); return the digest."""
        ...

    def put_bytes(self, data: bytes) -> str:
        """Store `data` (no upload if the blob is there already); return its digest."""
        ...

    def get_file(self, digest: str, dest: Path) -> None:
        """Write the blob to `dest`, verified, atomically; on error leave nothing behind."""
        ...

    def get_bytes(self, digest: str) -> bytes:
        """The blob's bytes, verified."""
        ...

    def exists(self, digest: str) -> bool:
        """Whether the store holds a blob named `digest` (its bytes are not checked)."""
        ...


def open_store(
    url: str | None = None,
    *,
    client: Any = None,
    multipart_threshold: int = MULTIPART_THRESHOLD,
    multipart_chunk: int = MULTIPART_CHUNK,
) -> BlobStore:
    """Open the blob store at `url`.

    Args:
        url: `s3://bucket/prefix`, `file:///dir`, or a directory path; None: `AMK_STORE_URL`.
        client: S3 only: a boto3 S3 client to use; None: one is made for
            `AMK_S3_ENDPOINT_URL` with the usual AWS credential chain.
        multipart_threshold: S3 only: blobs of at least this many bytes are uploaded in parts.
        multipart_chunk: S3 only: the part size (at least 5 MiB, as S3 requires).

    Returns:
        A `LocalStore` or an `S3Store`. Opening touches nothing; the first write creates what
        it needs.
    """
    cfg = config.load()
    url = url or cfg.store_url
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreError(f"{url}: an S3 store URL is s3://bucket/prefix")
        if client is None:
            client = _s3_client(cfg.s3_endpoint_url)
        return S3Store(
            parsed.netloc,
            parsed.path.strip("/"),
            client,
            multipart_threshold=multipart_threshold,
            multipart_chunk=multipart_chunk,
        )
    if parsed.scheme and len(parsed.scheme) > 1 and parsed.scheme != "file":  # "C:" is a drive
        raise StoreError(f"{url}: unsupported store URL (use s3://bucket/prefix or a directory)")
    if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
        raise StoreError(f"{url}: a file store URL names no host (file:///dir)")
    raw = unquote(parsed.path) if parsed.scheme == "file" else url
    if not raw.strip():
        raise StoreError(f"{url!r}: an empty store path (use s3://bucket/prefix or a directory)")
    root = Path(raw)
    if root.exists() and not root.is_dir():
        raise StoreError(f"{url}: the store is not a directory")
    return LocalStore(root)


def _check(digest: str) -> None:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise StoreError(f"{digest!r} is not a sha256 digest (64 lowercase hex digits)")


def _file_digest(path: Path) -> tuple[str, int]:
    """The sha256 and size of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _write_verified(
    digest: str, chunks: Iterator[bytes], dest: Path, mode: int | None = None
) -> None:
    """Stream `chunks` into `dest` through a temporary file in its directory, hashing as they
    pass; rename only if the hash is `digest`. On any error nothing is left behind.

    `mode` is the file's mode; None: a new file's usual mode (0666 less the umask)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                h.update(chunk)
                f.write(chunk)
        if h.hexdigest() != digest:
            raise StoreError(f"blob {digest} is corrupt: sha256 {h.hexdigest()}")
        if mode is None:  # mkstemp made it 0600; give it a normal file's mode
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_verified(digest: str, chunks: Iterator[bytes]) -> bytes:
    buf = io.BytesIO()
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
        buf.write(chunk)
    if h.hexdigest() != digest:
        raise StoreError(f"blob {digest} is corrupt: sha256 {h.hexdigest()}")
    return buf.getvalue()


def _chunks(f: IO[bytes]) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


class LocalStore:
    """Blobs in a directory: `<root>/sha256/<d[:2]>/<d>`, written atomically, read-only."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().absolute()
        self.url = str(self.root)

    def _path(self, digest: str) -> Path:
        _check(digest)
        return self.root / "sha256" / digest[:2] / digest

    def exists(self, digest: str) -> bool:
        return self._path(digest).is_file()

    def put_file(self, path: Path) -> str:
        digest, size = _file_digest(path)
        if not self._present(digest, size):
            with path.open("rb") as f:  # re-hashed on the way in: a file edited since is refused
                self._install(digest, _chunks(f))
        return digest

    def put_bytes(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if not self._present(digest, len(data)):
            self._install(digest, iter([data]))
        return digest

    def _present(self, digest: str, size: int) -> bool:
        """Whether the blob is there with the right size (a truncated one is replaced)."""
        try:
            return self._path(digest).stat().st_size == size
        except FileNotFoundError:
            return False

    def _install(self, digest: str, chunks: Iterator[bytes]) -> None:
        path = self._path(digest)
        try:
            # Read-only: blobs are immutable, so a stray write fails instead of corrupting one.
            _write_verified(digest, chunks, path, mode=0o444)
        except StoreError:
            raise StoreError(f"blob {digest[:12]} changed while it was being stored") from None

    def get_file(self, digest: str, dest: Path) -> None:
        with self._open(digest) as f:
            _write_verified(digest, _chunks(f), dest)

    def get_bytes(self, digest: str) -> bytes:
        with self._open(digest) as f:
            return _read_verified(digest, _chunks(f))

    @contextmanager
    def _open(self, digest: str) -> Iterator[IO[bytes]]:
        try:
            f = self._path(digest).open("rb")
        except FileNotFoundError:
            raise StoreError(f"blob {digest[:12]} is missing from {self.url}") from None
        with f:
            yield f


def _s3_client(endpoint_url: str | None) -> Any:
    import boto3
    from botocore.config import Config

    # Path-style addressing: MinIO and most S3-compatible servers have no per-bucket DNS names.
    cfg = Config(s3={"addressing_style": "path"}) if endpoint_url else None
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=cfg)


def _not_found(e: Any) -> bool:
    """Whether a botocore `ClientError` says the object does not exist."""
    return str(e.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound")


class S3Store:
    """Blobs in an S3 bucket under `<prefix>/sha256/<d>`; any S3-compatible server."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        client: Any,
        *,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        multipart_chunk: int = MULTIPART_CHUNK,
    ) -> None:
        from boto3.s3.transfer import TransferConfig

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.client = client
        self.transfer = TransferConfig(
            multipart_threshold=max(1, multipart_threshold),
            multipart_chunksize=max(_MIN_PART, multipart_chunk),
        )

    def _key(self, digest: str) -> str:
        _check(digest)
        return f"{self.prefix}/sha256/{digest}" if self.prefix else f"sha256/{digest}"

    @contextmanager
    def _errors(self, digest: str) -> Iterator[None]:
        """S3 and network failures as one-line `StoreError`s."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as e:
            if _not_found(e):
                raise StoreError(f"blob {digest[:12]} is missing from {self.url}") from None
            error = e.response.get("Error", {})
            code, msg = error.get("Code", "error"), error.get("Message") or ""
            raise StoreError(f"{self.url}: {code} {msg}".strip().splitlines()[0]) from None
        except BotoCoreError as e:
            raise StoreError(f"{self.url}: {e}".splitlines()[0]) from None

    def _size(self, digest: str) -> int | None:
        """The stored object's size, or None if there is none."""
        from botocore.exceptions import ClientError

        key = self._key(digest)
        with self._errors(digest):
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as e:
                if _not_found(e):
                    return None
                raise
        return int(head["ContentLength"])

    def exists(self, digest: str) -> bool:
        return self._size(digest) is not None

    def put_file(self, path: Path) -> str:
        digest, size = _file_digest(path)
        if self._size(digest) != size:
            with path.open("rb") as f:
                self._upload(digest, f)
        return digest

    def put_bytes(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if self._size(digest) != len(data):
            self._upload(digest, io.BytesIO(data))
        return digest

    def _upload(self, digest: str, f: IO[bytes]) -> None:
        # upload_fileobj goes multipart (parallel parts) at or above the threshold.
        with self._errors(digest):
            self.client.upload_fileobj(f, self.bucket, self._key(digest), Config=self.transfer)

    def _stream(self, digest: str) -> Iterator[bytes]:
        with self._errors(digest):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(digest))["Body"]
            try:
                yield from body.iter_chunks(CHUNK)
            finally:
                body.close()

    def get_file(self, digest: str, dest: Path) -> None:
        _write_verified(digest, self._stream(digest), dest)

    def get_bytes(self, digest: str) -> bytes:
        return _read_verified(digest, self._stream(digest))
