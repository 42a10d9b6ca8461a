"""amk-farm compiler: model graph -> fused instructions -> schedule -> one persistent CUDA kernel."""

import hashlib
from pathlib import Path

# major.minor changes with the kernel's launch interface, which the runtime checks before a launch
# (0.2: a producer warp beside the consumers, and all shared memory dynamic)
__version__ = "0.2.1"


def source_digest() -> str:
    """sha256 over the compiler's own source files: changes whenever the compiler's code does."""
    h = hashlib.sha256()
    root = Path(__file__).parent
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()
