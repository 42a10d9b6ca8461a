"""kernel.cu's device code, judged: the step `verifier.verify` takes for issue 16.

The text is parsed for the artifact's arch (`parse`: the `#if __CUDA_ARCH__` branches the cubin
was built from), then (c) its counter protocol is interpreted on the code (`sync`: acquire
waits, release signals after a consumer barrier, every task signalled on every path, nothing
else touching the counters) and (f) its task bodies are executed symbolically into obligations
that each store holds the fused instruction's element (`symexec`). A kernel.cu outside the
subset the parser reads fails the artifact with the line; nothing is skipped.
"""

from __future__ import annotations

import hashlib

from compiler.ir.fused import FusedGraph
from verifier.device import symexec, sync
from verifier.device.nodes import ParseError
from verifier.device.parse import parse
from verifier.device.source import arch_of_cubin
from verifier.model import Geometry
from verifier.obligation import Obligation

Check = tuple[str, bool, str]
PARSED = "(i) kernel.cu's device code is in the subset the verifier reads"


# judged texts of this process, by the digest of everything the judgement reads: the mutants of
# schedule.json and fused.json (and a farm worker's parts) leave kernel.cu as it was
_JUDGED: dict[str, tuple[list[Check], list[Obligation]]] = {}


def judge(
    text: str, arch: str, fused: FusedGraph, g: Geometry
) -> tuple[list[Check], list[Obligation]]:
    """(checks, obligations) of kernel.cu's device code for a cubin of `arch` (e.g. sm_90a)."""
    key = hashlib.sha256("\0".join((text, arch, fused.digest(), repr(g))).encode()).hexdigest()
    if key not in _JUDGED:
        if len(_JUDGED) >= 64:
            _JUDGED.clear()
        _JUDGED[key] = _judge(text, arch, fused, g)
    checks, obs = _JUDGED[key]
    return list(checks), list(obs)


def _judge(
    text: str, arch: str, fused: FusedGraph, g: Geometry
) -> tuple[list[Check], list[Obligation]]:
    try:
        unit = parse(text, arch_of_cubin(arch))
    except (ParseError, RecursionError) as e:
        return [(PARSED, False, str(e).splitlines()[0] if str(e) else type(e).__name__)], []
    checks: list[Check] = [(PARSED, True, "")]
    checks += [(f"(c) kernel.cu's code: {name}", ok, why) for name, ok, why in sync.check(unit)]
    return checks, symexec.obligations(unit, fused, g)
