"""The JSON forms of the stage files: canonical bytes for digests, readable text for files.

Canonical: sorted keys, no whitespace, strict JSON (no NaN/Infinity). Readable: the same content
with the long lists (nodes, instructions, tasks, queues) one item per line, so a file can be
read, diffed and hand-edited.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from compiler.ir.graph import IRError


def canonical(d: Any) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def digest(d: Any) -> str:
    """sha256 of the canonical form."""
    return hashlib.sha256(canonical(d)).hexdigest()


def readable(d: dict[str, Any], long_lists: tuple[str, ...]) -> str:
    """`d` as JSON text with each list named in `long_lists` written one item per line."""
    head = {k: v for k, v in d.items() if k not in long_lists}
    parts = [
        json.dumps(k) + ": " + json.dumps(v, sort_keys=True, allow_nan=False)
        for k, v in sorted(head.items())
    ]
    for key in long_lists:
        items = ",\n  ".join(json.dumps(x, sort_keys=True, allow_nan=False) for x in d[key])
        parts.append(json.dumps(key) + ": [\n  " + items + "\n]")
    return "{" + ", ".join(parts) + "}\n"


def parse(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise IRError(f"{what} file is not JSON: {e}") from None
