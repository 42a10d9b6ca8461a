"""The proof cache: proved results by obligation key, each entry checked before it is believed.

    cache = ProofCache(Path("~/.amk-farm/proofs"), secret=b"...")
    cache.get(ob)          # the cached Result, or None: prove it again
    cache.put(ob, result)  # proved results only; failures are never cached

An entry is `<key>.json`, where `key` is `Obligation.key`: the sha256 of the obligation's class,
check, full query text (assumptions and goal) and rlimit, so any edit of the query is another
key. The entry holds that key, the verifier that proved it (`verifier.source_digest`), the
result, and, when the cache has a secret, `mac` = HMAC-SHA256(secret, key, verifier, result).
`get` believes an entry only if all of these hold:

* the key inside the entry is the obligation's key (a proved entry copied or renamed under the
  key of another query is ignored);
* it was written by this verifier's code (an entry of an older or edited verifier is stale);
* its result is "proved";
* with a secret: the MAC verifies (an entry written or edited by anyone who does not hold the
  secret is ignored).

Anything else is a miss, and the obligation is proved again: a bad entry can cost time, never
make a query pass. The secret is the caller's (the CLI keeps it beside the signing key); a cache
without one (`secret=None`, as in library use and tests) checks everything but the MAC.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from verifier import source_digest
from verifier.obligation import Obligation
from verifier.solve import Result


class ProofCache:
    """A directory of checked proof results (see the module docstring)."""

    def __init__(self, directory: Path, secret: bytes | None = None):
        self.directory = Path(directory)
        self.secret = secret

    def _mac(self, key: str, verifier: str, result: dict[str, Any]) -> str:
        assert self.secret is not None
        body = json.dumps([key, verifier, result], sort_keys=True).encode()
        return hmac.new(self.secret, body, hashlib.sha256).hexdigest()

    def get(self, ob: Obligation) -> Result | None:
        """The cached result of `ob`, if the entry passes every check; else None."""
        key = ob.key
        try:
            entry = json.loads((self.directory / f"{key}.json").read_text())
            if not isinstance(entry, dict) or entry.get("key") != key:
                return None
            if entry.get("verifier") != source_digest():
                return None
            raw = entry.get("result")
            if not isinstance(raw, dict):
                return None
            if self.secret is not None and not hmac.compare_digest(
                str(entry.get("mac", "")), self._mac(key, str(entry["verifier"]), raw)
            ):
                return None
            result = Result.from_json(raw)
        except (OSError, ValueError, TypeError, UnicodeDecodeError):
            return None
        return result if result.proved else None

    def put(self, ob: Obligation, result: Result) -> None:
        """Cache a proved result (written whole through a temporary file); others are dropped."""
        if not result.proved:
            return
        raw = result.to_json()
        entry: dict[str, Any] = {"key": ob.key, "verifier": source_digest(), "result": raw}
        if self.secret is not None:
            entry["mac"] = self._mac(ob.key, entry["verifier"], raw)
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entry, f)
            os.replace(tmp, self.directory / f"{ob.key}.json")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
