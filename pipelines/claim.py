"""The one rule by which a stage claims its artifact: identity, complete, stale, resume.

Every stage that writes ``RUN/<artifact>`` first computes its *identity*: the settings and input
hashes its output depends on (config keys, the AE's sha256, the corpus's document counts, ...).
``claim`` then decides, the same way for the tokenizer, stage 1, the latents, stage 2 and the
baseline:

    overwrite   the artifact, its work folders and its identity record are discarded: a fresh start
    stale       the identity on record (the record file, else the artifact's manifest) differs:
                an ArtifactError naming each changed key; with ``replace_stale`` (the chained
                run_all job, whose earlier outputs are stale by design) a message and a discard
    complete    the artifact exists and ``done(manifest)``: "nothing to do", its manifest returned
    foreign     a work folder exists without an identity record: an ArtifactError (not ours)
    fresh       otherwise the identity is recorded and None returned; the stage runs, and Ray Train
                resumes from the last checkpoint in its work folder when there is one (a checkpoint
                carries the identity too: ``pipelines.train.checkpoints``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from calm_core.errors import ArtifactError
from pipelines.progress import progress
from pipelines.storage import RunDir


@dataclass(frozen=True)
class Spot:
    """Where a stage writes: its artifact, its identity record and its work folders."""

    run: RunDir
    artifact: str  # RUN/<artifact>
    record: tuple[str, ...] | None  # the identity record, relative to RUN (None: the manifest's only)
    work: tuple[tuple[str, ...], ...] = ()  # folders the stage fills before publishing (checkpoints)
    label: str = ""  # progress prefix
    what: str = "a run"  # "holds <what> of another setup"
    remedy: str = "use a new --run directory, or --overwrite to discard it"

    def discard(self) -> None:
        for parts in ((self.artifact,), *self.work, *([self.record] if self.record else [])):
            self.run.delete(*parts)


def diff_identity(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``key: old -> new`` for every key that differs (long values cut)."""

    def short(v: Any) -> str:
        r = repr(v)
        return r if len(r) <= 40 else r[:37] + "..."

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:  # nested sections as dotted keys
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
        return out

    old, new = flat(old), flat(new)
    keys = sorted(set(old) | set(new))
    parts = [f"{k}: {short(old.get(k))} -> {short(new.get(k))}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(parts) if parts else "none"


def recorded_identity(spot: Spot) -> dict[str, Any] | None:
    run = spot.run
    if spot.record and run.exists(*spot.record):
        return run.read_json(*spot.record)
    if run.has_artifact(spot.artifact):
        return run.read_json(spot.artifact, "manifest.json").get("identity")
    return None


def claim(spot: Spot, identity: dict[str, Any], done: Callable[[dict[str, Any]], str | None],
          overwrite: bool = False, replace_stale: bool = False, hint: str = "--overwrite redoes it") -> dict | None:
    """The rule in the module docstring: the complete artifact's manifest, or None (run the stage).
    ``done(manifest)`` says what a complete artifact holds ("300 steps"), or None if it is not
    complete."""
    run = spot.run
    if overwrite:
        spot.discard()
    old = recorded_identity(spot)
    if old is not None and old != identity:
        msg = f"'{run.uri(spot.artifact)}' holds {spot.what} of another setup ({diff_identity(old, identity)})"
        if not replace_stale:
            raise ArtifactError(f"{msg}; {spot.remedy}")
        progress(f"[{spot.label}] {msg}; replacing it")
        spot.discard()
    if run.has_artifact(spot.artifact):
        manifest = run.read_json(spot.artifact, "manifest.json")
        holds = done(manifest)
        if holds is not None:
            progress(f"[{spot.label}] {run.uri(spot.artifact)} is complete ({holds}); nothing to do ({hint})")
            return manifest
    if spot.record and not run.exists(*spot.record):
        foreign = [p for p in spot.work if run.exists(*p)]
        if foreign:
            raise ArtifactError(f"'{run.uri(*foreign[0])}' exists but has no identity record (not made by this "
                                f"pipeline, or by an older version); {spot.remedy}")
        run.write_text(json.dumps(identity, indent=1, sort_keys=True), *spot.record)
    return None
