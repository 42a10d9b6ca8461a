"""Signing: Ed25519 keys, and DSSE envelopes that carry an in-toto statement.

The farm signs what it publishes: an in-toto Statement v1 whose subject is the signed thing (a
manifest, by name and sha256) and whose predicate says what was established about it
(`PREDICATE_TYPE`), wrapped in a DSSE envelope. The signature covers DSSE's pre-authentication
encoding of the payload type and the payload bytes, never re-serialized JSON, so a verifier
checks exactly the bytes that were signed. `verify` accepts an envelope only if it carries at
least one signature by a trusted key and every signature by a trusted key verifies.

Keys are PEM files: the private key (PKCS#8, unencrypted, mode 0600) at `AMK_SIGNING_KEY`
(default `AMK_HOME/keys/signing.key`) and the public key (SubjectPublicKeyInfo) next to it,
with `.pub` appended. A key's id is the sha256 of its raw 32-byte public key.

The private key never leaves its file: it is never written to the registry database, the blob
store, an envelope or a log. Only public keys and key ids are shared.

Trust roots are the user's own files, never database rows: `trusted_keys` is the user's own
public key, the PEM files in `AMK_HOME/trusted/` (where `trust` puts a key the user chose) and
any given on the command line. A public key file is one Ed25519 `PUBLIC KEY` PEM block and
nothing else (`load_public_key`): not a private key, not a path to elsewhere.

The proof cache's secret (`cache_secret`, `AMK_HOME/keys/proof-cache.key`, 32 random bytes,
mode 0600) lives beside the signing key: whoever can forge a cache entry could take the key too.

Example:
    >>> private = Ed25519PrivateKey.generate()
    >>> env = sign(private, "manifest.json", "ab" * 32, {"proved": 10, "obligations": 10})
    >>> verify(env, {key_id(private.public_key()): private.public_key()})["predicate"]
    {'obligations': 10, 'proved': 10}
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from amk_farm import config

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://amk-farm.dev/verified-kernel/v1"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n[A-Za-z0-9+/=\r\n]+-----END \1-----")
MAX_PEM_BYTES = 4096  # an Ed25519 public key PEM is 113 bytes


class SignatureError(Exception):
    """An envelope that does not verify, or a key that cannot be used; the message is one line."""


def public_key_path(private_path: Path) -> Path:
    """Where the public key of the private key at `private_path` lives: the same name + `.pub`."""
    return private_path.with_name(private_path.name + ".pub")


def init_keys(force: bool = False) -> tuple[Path, Path]:
    """Generate a signing key pair at `AMK_SIGNING_KEY` and its `.pub` next to it.

    Args:
        force: replace an existing key (signatures made with it will no longer verify against
            the new public key).

    Returns:
        (private key path, public key path).

    Raises:
        FileExistsError: a key is there already and `force` is False.
    """
    private_path = config.load().signing_key
    public_path = public_key_path(private_path)
    if private_path.exists() and not force:
        raise FileExistsError(f"{private_path} exists; pass --force to replace it")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    private_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_atomic(private_path, private_pem, 0o600)
    _write_atomic(public_path, _public_pem(key.public_key()), 0o644)
    return private_path, public_path


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write `data` through a temporary file (created with mode 0600 by mkstemp) and rename, so
    the key is never readable by others, not even for a moment, and never half-written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_pem(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The public key as PEM text (of the private key's public half, given a private key)."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return _public_pem(key).decode()


def load_private_key(path: Path | None = None) -> Ed25519PrivateKey:
    """Load the Ed25519 private key at `path` (default `AMK_SIGNING_KEY`).

    Raises:
        FileNotFoundError: no key there (run `amk-farm keys init`).
        SignatureError: the file is not an unencrypted Ed25519 private key in PEM.
    """
    path = path or config.load().signing_key
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no signing key at {path}; run `amk-farm keys init` or set AMK_SIGNING_KEY"
        ) from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise SignatureError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(file_or_pem: Path | str | bytes) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM file (`Path`) or PEM text (`str` or `bytes`).

    The text must be exactly one `PUBLIC KEY` PEM block (surrounding whitespace aside): a
    private key, several blocks, anything else around the block, or a file naming another file
    is refused; nothing inside it is ever read as a path.

    Raises:
        FileNotFoundError: a path that does not exist.
        SignatureError: not a single Ed25519 public key in PEM; the message names the file.
    """
    where = "public key"
    if isinstance(file_or_pem, bytes):
        pem = file_or_pem
    elif isinstance(file_or_pem, str):
        pem = file_or_pem.encode()
    else:
        where = str(file_or_pem)
        try:
            if file_or_pem.stat().st_size > MAX_PEM_BYTES:
                raise SignatureError(
                    f"{where} is not a PEM public key (over {MAX_PEM_BYTES} bytes)"
                )
            pem = file_or_pem.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"no public key at {file_or_pem}") from None
        except IsADirectoryError:
            raise SignatureError(f"{where} is a directory, not a PEM public key") from None
    if b"PRIVATE KEY" in pem:
        raise SignatureError(f"{where} holds a private key; give its public key (keys show)")
    m = _PEM.fullmatch(pem.strip())
    if m is None or m.group(1) != b"PUBLIC KEY" or len(pem) > MAX_PEM_BYTES:
        raise SignatureError(f"{where} is not a PEM public key (one PUBLIC KEY block, no more)")
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise SignatureError(f"{where} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{where} is not an Ed25519 public key")
    return key


def trusted_dir() -> Path:
    """`AMK_HOME/trusted`: the PEM files of the keys this user trusts."""
    return config.load().home / "trusted"


def trust(pem_file: Path) -> tuple[str, Path, bool]:
    """Trust the Ed25519 public key in `pem_file`: a copy goes to `trusted_dir()`.

    Returns:
        (its key id, where it was written, whether it was new).

    Raises:
        FileNotFoundError, SignatureError: `pem_file` is not one Ed25519 public key in PEM;
            nothing is written.
    """
    key = load_public_key(pem_file)
    kid = key_id(key)
    dest = trusted_dir() / f"{kid}.pem"
    if dest.is_file() and dest.read_bytes() == _public_pem(key):
        return kid, dest, False
    dest.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(dest, _public_pem(key), 0o644)
    return kid, dest, True


def trusted_keys(extra: list[Path] | None = None) -> dict[str, Ed25519PublicKey]:
    """The keys this user trusts, by key id: the own public key (AMK_SIGNING_KEY's `.pub`), the
    PEM files in `trusted_dir()`, and `extra` (e.g. `pull --key`). Only local files: nothing
    that a writer of the registry database can add.

    Raises:
        FileNotFoundError, SignatureError: one of them is not an Ed25519 public key PEM.
    """
    own = public_key_path(config.load().signing_key)
    folder = trusted_dir()
    paths = [*([own] if own.is_file() else []), *sorted(folder.glob("*.pem")), *(extra or [])]
    out = {}
    for path in paths:
        public = load_public_key(path)
        out[key_id(public)] = public
    return out


def cache_secret() -> bytes:
    """The proof cache's MAC secret, `AMK_HOME/keys/proof-cache.key`, made on first use."""
    path = config.load().home / "keys" / "proof-cache.key"
    if not path.is_file():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32))
            os.link(tmp, path)  # never replaces one another process made meanwhile
        except FileExistsError:
            pass
        finally:
            Path(tmp).unlink(missing_ok=True)
    secret = path.read_bytes()
    if len(secret) != 32:
        raise SignatureError(f"{path} is not a proof cache secret (32 bytes)")
    return secret


def key_id(public_key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The key's id: sha256 hex of its raw 32-byte public key (a private key: of its public half)."""
    if isinstance(public_key, Ed25519PrivateKey):
        public_key = public_key.public_key()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the signature covers.

    `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`, lengths as ASCII decimal byte counts.
    """
    t = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(t), t, len(payload), payload)


def statement(subject_name: str, subject_digest: str, predicate: dict[str, Any]) -> dict[str, Any]:
    """The in-toto Statement v1 about one subject, with the farm's predicate type."""
    if not _SHA256.fullmatch(subject_digest):
        raise ValueError(f"{subject_digest!r} is not a sha256 digest (64 lowercase hex digits)")
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": subject_name, "digest": {"sha256": subject_digest}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": predicate,
    }


def sign(
    private_key: Ed25519PrivateKey,
    subject_name: str,
    subject_digest: str,
    predicate: dict[str, Any],
) -> dict[str, Any]:
    """Sign an in-toto statement about (`subject_name`, `subject_digest`) into a DSSE envelope.

    Args:
        private_key: the signing key.
        subject_name: the subject's name (e.g. `manifest.json`).
        subject_digest: the subject's sha256, 64 lowercase hex digits.
        predicate: what is attested (JSON-serializable).

    Returns:
        `{"payloadType", "payload": base64(statement JSON), "signatures": [{"keyid", "sig"}]}`.
    """
    body = json.dumps(
        statement(subject_name, subject_digest, predicate), sort_keys=True, separators=(",", ":")
    ).encode()
    sig = private_key.sign(pae(PAYLOAD_TYPE, body))
    return {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(body).decode(),
        "signatures": [{"keyid": key_id(private_key), "sig": base64.b64encode(sig).decode()}],
    }


def _b64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError("not a base64 string")
    return base64.b64decode(text, validate=True)


def verify(envelope: dict[str, Any], trusted: Mapping[str, Ed25519PublicKey]) -> dict[str, Any]:
    """Check a DSSE envelope against trusted keys and return the in-toto statement it carries.

    Args:
        envelope: as `sign` makes it.
        trusted: public keys by key id.

    Returns:
        The statement (`_type`, `subject`, `predicateType`, `predicate`); the caller checks that
        its subject and predicate are what it expects.

    Raises:
        SignatureError: no signature; no signature by a trusted key ("signed by unknown key");
            a trusted key's signature that does not verify; a payload that is not an in-toto
            statement.
    """
    if not isinstance(envelope, dict):
        raise SignatureError("envelope is not a JSON object")
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or not signatures:
        raise SignatureError("no signature")
    payload_type = envelope.get("payloadType")
    try:
        body = _b64(envelope.get("payload"))
    except (ValueError, binascii.Error):
        raise SignatureError("payload is not an in-toto statement") from None
    if not isinstance(payload_type, str):
        raise SignatureError("payload is not an in-toto statement")
    message = pae(payload_type, body)
    checked = 0
    for s in signatures:
        keyid = s.get("keyid") if isinstance(s, dict) else None
        key = trusted.get(keyid) if isinstance(keyid, str) else None
        if key is None:
            continue
        try:
            key.verify(_b64(s.get("sig")), message)
        except (InvalidSignature, ValueError, binascii.Error):
            raise SignatureError("signature does not verify") from None
        checked += 1
    if not checked:
        first = signatures[0].get("keyid") if isinstance(signatures[0], dict) else None
        raise SignatureError(f"signed by unknown key {first or '(no key id)'}")
    return _statement(payload_type, body)


def _statement(payload_type: str, body: bytes) -> dict[str, Any]:
    """The signed payload as an in-toto statement, or `SignatureError`."""
    bad = SignatureError("payload is not an in-toto statement")
    if payload_type != PAYLOAD_TYPE:
        raise bad
    try:
        st = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise bad from None
    if not isinstance(st, dict) or st.get("_type") != STATEMENT_TYPE:
        raise bad
    subjects = st.get("subject")
    if not isinstance(subjects, list) or not subjects:
        raise bad
    for sub in subjects:
        digest = sub.get("digest") if isinstance(sub, dict) else None
        if not isinstance(digest, dict) or not isinstance(digest.get("sha256"), str):
            raise bad
    if not isinstance(st.get("predicateType"), str) or "predicate" not in st:
        raise bad
    return st
