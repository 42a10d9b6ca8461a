"""What a signature on a published artifact says ("proved here"), and how both ends check it.

The signed in-toto statement (`signing`) has the manifest's sha256 as its subject, and its
predicate's `verification` records, for that same digest, the verdict of the verifier that
judged the artifact: `manifest_sha256`, `verifier` (version, source sha256, Z3 version),
`obligations` and `proved` (equal, or nothing is signed), `distinct` queries, per-class counts,
the number of integrity checks and those skipped. `pull` refuses any attestation not of that
form (`check`).

Where the verdict comes from. `publish` never believes the artifact directory's own account of
itself: proof/summary.json and the certificates beside it are files, written by whoever can
write the directory, and a summary left over from before an edit (the manifest's sha256 updated
by hand) would otherwise be signed as a proof of the edited kernel. There are two ways to
re-derive the verdict instead: check certificates bound to the manifest and re-check what they
claim, or run the verifier. The first reduces to the second: to know which queries a proof must
cover, the obligations have to be made again from the files on disk (that is the verifier), and
re-checking a claimed "unsat" is proving it again, unless the publisher has a record of having
proved that exact query itself. That record is the proof cache. So `derive` runs the verifier on
the directory as it is, with the publisher's own proof cache (`verifier.cache`: entries keyed by
the query's full digest, bound to the verifier's code, and MACed with a secret kept beside the
signing key), without writing proof/. An unchanged artifact costs making its obligations and
the integrity checks (well under a second for tiny-llama); an edited one re-proves exactly the
queries the edit changed, and fails where they fail. proof/ is still published, for readers:
it must be the proof of this manifest (its summary names the manifest's sha256 and its
certificates are those of the obligations just made, each proved), so what is published beside
the signature describes what was signed.

The farm proves on many nodes and does not run the whole verifier again on its driver: its
verdict is made from the obligation index it built from the manifest (which names that
manifest), and the certificates of those obligations, each re-checked here to be a certificate
of the query its key names, with a proved result (`certificates`).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUMMARY = "proof/summary.json"


@dataclass(frozen=True)
class Verdict:
    """What was established about one manifest: `ok` only if every check and obligation held."""

    manifest_sha256: str
    verifier: dict[str, str]  # version, source_sha256, z3 (`verifier.identity`)
    obligations: int
    proved: int
    keys: frozenset[str]  # the distinct queries' keys
    proved_by_class: dict[str, int] = field(default_factory=dict)
    checks: int = 0
    failures: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return (
            not self.failures
            and self.obligations > 0
            and self.proved == self.obligations
            and bool(self.manifest_sha256)
        )

    def predicate(self) -> dict[str, Any]:
        """The `verification` part of the signed predicate."""
        return {
            "verified": self.ok,
            "manifest_sha256": self.manifest_sha256,
            "verifier": dict(self.verifier),
            "obligations": self.obligations,
            "proved": self.proved,
            "distinct": len(self.keys),
            "proved_by_class": dict(sorted(self.proved_by_class.items())),
            "checks": self.checks,
            "skipped": list(self.skipped),
        }


def derive(directory: Path, cache: Any = None, jobs: int = 1) -> Verdict:
    """Run the verifier on `directory` as it is on disk (see the module docstring).

    Args:
        directory: the artifact directory.
        cache: a `verifier.cache.ProofCache` (or None: prove every obligation).
        jobs: solver processes for the obligations the cache does not hold.
    """
    from verifier import identity
    from verifier.verify import verify

    report = verify(directory, jobs=jobs, cache=cache, write_proof=False)
    by_class: Counter[str] = Counter(ob.cls for ob, r, _ in report.results if r.proved)
    return Verdict(
        manifest_sha256=report.manifest_sha256,
        verifier=identity(),
        obligations=len(report.results),
        proved=sum(r.proved for _, r, _ in report.results),
        keys=frozenset(ob.key for ob, _, _ in report.results),
        proved_by_class=dict(by_class),
        checks=len(report.checks),
        failures=tuple(report.failures()),
        skipped=tuple(name for name, _ in report.skipped),
    )


def certificates(directory: Path, keys: frozenset[str]) -> str:
    """Why proof/ in `directory` is not exactly one proved certificate per key of `keys`, each
    of the query its key names ("" if it is)."""
    from verifier.obligation import Obligation

    found: set[str] = set()
    for path in sorted((directory / "proof").glob("*.json")):
        if path.name == Path(SUMMARY).name:
            continue
        try:
            cert = json.loads(path.read_text())
            key = Obligation.from_json(cert["obligation"]).key
            status = cert["result"]["status"]
        except (OSError, ValueError, TypeError, KeyError, UnicodeDecodeError):
            return f"proof/{path.name} is not a certificate"
        if cert.get("key") != key:
            return f"proof/{path.name} is a certificate of another query than its key says"
        if status != "proved":
            return f"proof/{path.name}: {status}, not proved"
        found.add(key)
    if found != keys:
        missing, extra = len(keys - found), len(found - keys)
        return f"proof/ holds {extra} certificates of other queries and lacks {missing}"
    return ""


def check(statement: dict[str, Any], manifest_sha256: str) -> str:
    """Why the signed `statement` is not a "proved here" attestation of the manifest with
    sha256 `manifest_sha256` ("" if it is). Names the field at fault."""
    if manifest_sha256 not in [s["digest"]["sha256"] for s in statement["subject"]]:
        return "the signature is about another manifest, not this one"
    pred = statement.get("predicate")
    v = pred.get("verification") if isinstance(pred, dict) else None
    if not isinstance(v, dict):
        return "the attestation has no verification record"
    if v.get("verified") is not True:
        return "the attestation's verification.verified is not true"
    if v.get("manifest_sha256") != manifest_sha256:
        return "the attestation's verification.manifest_sha256 is not this manifest's"
    total, proved = v.get("obligations"), v.get("proved")
    if type(total) is not int or total < 1:
        return "the attestation's verification.obligations is not a positive count"
    if type(proved) is not int or proved != total:
        return f"the attestation's verification.proved ({proved}) is not {total} of {total}"
    who = v.get("verifier")
    if not isinstance(who, dict) or not isinstance(who.get("version"), str) or not who["version"]:
        return "the attestation's verification.verifier records no verifier version"
    return ""
