"""amk-farm compiler: model graph -> fused instructions -> schedule -> one persistent CUDA kernel."""

import hashlib
from pathlib import Path

__version__ = "0.1.0"


def source_digest() -> str:
    """sha256 over the compiler's own source files: changes whenever the compiler's code does."""
    h = hashlib.sha256()
    root = Path(__file__).parent
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()
