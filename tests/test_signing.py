"""Signing: key files, DSSE envelopes over in-toto statements, and every way verification fails."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from amk_farm import signing
from amk_farm.signing import SignatureError

DIGEST = hashlib.sha256(b"manifest").hexdigest()
PREDICATE = {"obligations": 12, "proved": 12, "solver": "z3 4.15"}


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AMK_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("AMK_SIGNING_KEY", raising=False)
    return tmp_path / "home"


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _trusted(*keys: Ed25519PrivateKey) -> dict[str, Any]:
    return {signing.key_id(k): k.public_key() for k in keys}


def _payload(env: dict[str, Any]) -> dict[str, Any]:
    return json.loads(base64.b64decode(env["payload"]))


def test_round_trip_returns_the_statement(key: Ed25519PrivateKey) -> None:
    env = signing.sign(key, "manifest.json", DIGEST, PREDICATE)
    assert env["payloadType"] == "application/vnd.in-toto+json"
    assert env["signatures"][0]["keyid"] == signing.key_id(key)
    st = signing.verify(env, _trusted(key))
    assert st == {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": "manifest.json", "digest": {"sha256": DIGEST}}],
        "predicateType": "https://amk-farm.dev/verified-kernel/v1",
        "predicate": PREDICATE,
    }
    assert _payload(env) == st
    json.loads(json.dumps(env))  # the envelope is plain JSON


def test_signature_is_over_dsse_pae_as_the_spec_defines(key: Ed25519PrivateKey) -> None:
    # The DSSE spec's own example: PAE("http://example.com/HelloWorld", "hello world").
    assert (
        signing.pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )
    env = signing.sign(key, "m", DIGEST, {})
    body = base64.b64decode(env["payload"])
    sig = base64.b64decode(env["signatures"][0]["sig"])
    message = b"DSSEv1 %d application/vnd.in-toto+json %d %b" % (28, len(body), body)
    key.public_key().verify(sig, message)  # raises if the signed bytes differ


def test_key_id_is_sha256_of_the_raw_public_key(key: Ed25519PrivateKey) -> None:
    from cryptography.hazmat.primitives import serialization

    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert len(raw) == 32
    assert signing.key_id(key.public_key()) == hashlib.sha256(raw).hexdigest()


def test_unknown_key_is_refused(key: Ed25519PrivateKey) -> None:
    env = signing.sign(key, "manifest.json", DIGEST, PREDICATE)
    other = Ed25519PrivateKey.generate()
    with pytest.raises(SignatureError) as e:
        signing.verify(env, _trusted(other))
    assert str(e.value) == f"signed by unknown key {signing.key_id(key)}"
    with pytest.raises(SignatureError, match="signed by unknown key"):
        signing.verify(env, {})


def test_key_id_of_a_trusted_key_on_another_keys_signature_does_not_verify(
    key: Ed25519PrivateKey,
) -> None:
    other = Ed25519PrivateKey.generate()
    env = signing.sign(other, "manifest.json", DIGEST, PREDICATE)
    env["signatures"][0]["keyid"] = signing.key_id(key)  # claims to be the trusted key
    with pytest.raises(SignatureError, match=r"^signature does not verify$"):
        signing.verify(env, _trusted(key))


@pytest.mark.parametrize(
    "edit",
    [
        lambda st: st["predicate"].update(proved=11),
        lambda st: st["subject"][0]["digest"].update(sha256="0" * 64),
        lambda st: st["subject"][0].update(name="other.json"),
        lambda st: st.update(predicateType="https://example.com/other"),
    ],
    ids=["predicate", "digest", "name", "predicate-type"],
)
def test_altered_payload_does_not_verify(key: Ed25519PrivateKey, edit: Any) -> None:
    env = signing.sign(key, "manifest.json", DIGEST, PREDICATE)
    st = _payload(env)
    edit(st)
    env["payload"] = base64.b64encode(json.dumps(st).encode()).decode()
    with pytest.raises(SignatureError, match=r"^signature does not verify$"):
        signing.verify(env, _trusted(key))


def test_altered_payload_type_does_not_verify(key: Ed25519PrivateKey) -> None:
    env = signing.sign(key, "manifest.json", DIGEST, PREDICATE)
    env["payloadType"] = "application/json"
    with pytest.raises(SignatureError, match=r"^signature does not verify$"):
        signing.verify(env, _trusted(key))


def test_altered_signature_does_not_verify(key: Ed25519PrivateKey) -> None:
    env = signing.sign(key, "manifest.json", DIGEST, PREDICATE)
    sig = bytearray(base64.b64decode(env["signatures"][0]["sig"]))
    sig[0] ^= 0x01
    bad = copy.deepcopy(env)
    bad["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    with pytest.raises(SignatureError, match=r"^signature does not verify$"):
        signing.verify(bad, _trusted(key))
    bad["signatures"][0]["sig"] = "not base64!"
    with pytest.raises(SignatureError, match=r"^signature does not verify$"):
        signing.verify(bad, _trusted(key))


@pytest.mark.parametrize("signatures", [None, [], "x"])
def test_missing_signatures_are_refused(key: Ed25519PrivateKey, signatures: Any) -> None:
    env = signing.sign(key, "manifest.json", DIGEST, PREDICATE)
    if signatures is None:
        del env["signatures"]
    else:
        env["signatures"] = signatures
    with pytest.raises(SignatureError, match=r"^no signature$"):
        signing.verify(env, _trusted(key))


def test_an_untrusted_extra_signature_is_ignored_a_bad_trusted_one_is_not(
    key: Ed25519PrivateKey,
) -> None:
    env = signing.sign(key, "manifest.json", DIGEST, PREDICATE)
    other = Ed25519PrivateKey.generate()
    env["signatures"].insert(0, {"keyid": signing.key_id(other), "sig": "AAAA"})
    assert signing.verify(env, _trusted(key))["predicate"] == PREDICATE
    with pytest.raises(SignatureError, match=r"^signature does not verify$"):
        signing.verify(env, _trusted(key, other))


def test_a_signed_payload_that_is_not_a_statement_is_refused(key: Ed25519PrivateKey) -> None:
    for body in [b"not json", b"[]", json.dumps({"_type": "x"}).encode()]:
        message = signing.pae(signing.PAYLOAD_TYPE, body)
        env = {
            "payloadType": signing.PAYLOAD_TYPE,
            "payload": base64.b64encode(body).decode(),
            "signatures": [
                {
                    "keyid": signing.key_id(key),
                    "sig": base64.b64encode(key.sign(message)).decode(),
                }
            ],
        }
        with pytest.raises(SignatureError, match=r"^payload is not an in-toto statement$"):
            signing.verify(env, _trusted(key))


def test_sign_refuses_a_subject_digest_that_is_not_sha256(key: Ed25519PrivateKey) -> None:
    with pytest.raises(ValueError, match="not a sha256 digest"):
        signing.sign(key, "manifest.json", "abc", PREDICATE)


def test_init_keys_writes_a_0600_private_key_and_its_public_key(home: Path) -> None:
    private_path, public_path = signing.init_keys()
    assert private_path == home / "keys" / "signing.key"
    assert public_path == home / "keys" / "signing.key.pub"
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(private_path.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in private_path.parent.iterdir()) == [
        "signing.key",
        "signing.key.pub",
    ]
    private = signing.load_private_key()
    public = signing.load_public_key(public_path)
    assert signing.key_id(private.public_key()) == signing.key_id(public)
    assert b"PRIVATE" not in public_path.read_bytes()
    pem = public_path.read_text()
    assert signing.key_id(signing.load_public_key(pem)) == signing.key_id(public)
    assert signing.key_id(signing.load_public_key(pem.encode())) == signing.key_id(public)
    env = signing.sign(private, "m", DIGEST, {})
    assert signing.verify(env, {signing.key_id(public): public})["subject"][0]["name"] == "m"


def test_init_keys_refuses_to_overwrite_without_force(home: Path) -> None:
    private_path, _ = signing.init_keys()
    before = private_path.read_bytes()
    with pytest.raises(FileExistsError, match="pass --force"):
        signing.init_keys()
    assert private_path.read_bytes() == before
    signing.init_keys(force=True)
    assert private_path.read_bytes() != before
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600


def test_signing_key_path_comes_from_amk_signing_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMK_SIGNING_KEY", str(tmp_path / "elsewhere" / "farm.pem"))
    private_path, public_path = signing.init_keys()
    assert private_path == tmp_path / "elsewhere" / "farm.pem"
    assert public_path == tmp_path / "elsewhere" / "farm.pem.pub"
    assert signing.load_private_key(private_path) is not None


def test_loading_a_missing_or_wrong_key_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="keys init"):
        signing.load_private_key()
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(SignatureError, match="not an unencrypted PEM private key"):
        signing.load_private_key(junk)
    with pytest.raises(SignatureError, match="not a PEM public key"):
        signing.load_public_key(junk)
    with pytest.raises(FileNotFoundError, match="no public key"):
        signing.load_public_key(tmp_path / "none.pub")
