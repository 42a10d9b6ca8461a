"""amk-farm configuration: every environment variable, declared once, read at call time.

`VARIABLES` is the single table of what amk-farm reads from the environment, with defaults and
one-line descriptions (for help texts and `Config.as_env`). `load()` turns the environment of the
moment into a frozen, typed `Config`; nothing is read at import time, so tests can monkeypatch
`os.environ` or pass a dict. Loading has no side effects: it creates no directories or files.
An empty variable counts as unset.

Example:
    >>> cfg = load({"AMK_HOME": "/data/amk"})
    >>> cfg.db_url
    'sqlite:////data/amk/registry.db'
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple


class Variable(NamedTuple):
    """One environment variable: its default (None: unset) and what it sets."""

    default: str | None  # "{home}" stands for the resolved AMK_HOME
    help: str


VARIABLES: dict[str, Variable] = {
    "AMK_HOME": Variable("~/.amk-farm", "data directory: default database, store and keys"),
    "AMK_DB_URL": Variable("sqlite:///{home}/registry.db", "SQLAlchemy URL of the registry"),
    "AMK_STORE_URL": Variable("{home}/store", "blob store: a directory or s3://bucket/prefix"),
    "AMK_S3_ENDPOINT_URL": Variable(None, "S3-compatible endpoint (MinIO...); unset: AWS"),
    "AMK_SIGNING_KEY": Variable("{home}/keys/signing.key", "Ed25519 private key (PEM) for signing"),
    "RAY_ADDRESS": Variable(None, "Ray cluster to join; unset: start a local one"),
}


@dataclass(frozen=True)
class Config:
    """The configuration in force, as typed values. Build it with `load()`."""

    home: Path  # AMK_HOME, absolute
    db_url: str  # AMK_DB_URL
    store_url: str  # AMK_STORE_URL
    s3_endpoint_url: str | None  # AMK_S3_ENDPOINT_URL
    signing_key: Path  # AMK_SIGNING_KEY, absolute
    ray_address: str | None  # RAY_ADDRESS

    def as_env(self) -> dict[str, str | None]:
        """The configuration keyed by variable name (for `amk-farm config --json` and logs)."""
        return {
            "AMK_HOME": str(self.home),
            "AMK_DB_URL": self.db_url,
            "AMK_STORE_URL": self.store_url,
            "AMK_S3_ENDPOINT_URL": self.s3_endpoint_url,
            "AMK_SIGNING_KEY": str(self.signing_key),
            "RAY_ADDRESS": self.ray_address,
        }


def _abs(path: str) -> Path:
    return Path(path).expanduser().absolute()


def _value(env: Mapping[str, str], name: str, home: Path | None = None) -> str | None:
    """The variable's value; if unset or empty, its default with `{home}` filled in."""
    if env.get(name):
        return env[name]
    default = VARIABLES[name].default
    if default is None or home is None:
        return default
    return default.replace("{home}", str(home))


def _required(env: Mapping[str, str], name: str, home: Path | None = None) -> str:
    value = _value(env, name, home)
    assert value is not None, f"{name} is declared without a default"
    return value


def load(environ: Mapping[str, str] | None = None) -> Config:
    """Read the configuration from `environ` (default: `os.environ` as it is now).

    Args:
        environ: variables to read instead of the process environment.

    Returns:
        The typed configuration; unset or empty variables take their defaults from `VARIABLES`.
    """
    env = os.environ if environ is None else environ
    home = _abs(_required(env, "AMK_HOME"))
    return Config(
        home=home,
        db_url=_required(env, "AMK_DB_URL", home),
        store_url=_required(env, "AMK_STORE_URL", home),
        s3_endpoint_url=_value(env, "AMK_S3_ENDPOINT_URL", home),
        signing_key=_abs(_required(env, "AMK_SIGNING_KEY", home)),
        ray_address=_value(env, "RAY_ADDRESS", home),
    )
