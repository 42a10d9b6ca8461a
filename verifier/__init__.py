"""amk-farm verifier: proves an artifact's schedule does what the model graph says.

`amk-farm verify ARTIFACT_DIR` (`verifier.verify.verify`): the artifact's files are read as
given and judged against the verifier's own model of the decode step (`verifier.model`), built
from the manifest's model spec; every claim is an obligation (`verifier.obligation`), one SMT
query proved with Z3 under a deterministic resource limit and a wall clock, in solver
processes that die with their parent (`verifier.solve`, `verifier.solvers`), its
counterexample replayed without the solver (`verifier.replay`). Classes so far: (b) index maps
(`verifier.index_maps`), (c) schedule (`verifier.happens_before`), (d) split reductions
(`verifier.reductions`), (e) attention (`verifier.attention`); kernel.cu's own task table is
read back (`verifier.kernel_table`); planted bugs in `verifier.mutate`; proved queries are
kept in a checked proof cache (`verifier.cache`).
"""

import functools
import hashlib
from pathlib import Path

# recorded in every proof summary and signed attestation; changes with what "proved" means
__version__ = "0.3.0"


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 over the verifier's own source files: changes whenever the verifier's code does,
    so a proof cache entry written by other verifier code is never reused."""
    h = hashlib.sha256()
    root = Path(__file__).parent
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def identity() -> dict[str, str]:
    """What verified an artifact: this verifier's version and source digest, and Z3's version."""
    from verifier.solve import Z3_VERSION

    return {"version": __version__, "source_sha256": source_digest(), "z3": Z3_VERSION}
