"""``jobs/official.py parity``: a run's models recompute a reference folder of official outputs
(calm_core.parity), read through the storage layer (a path or a URI)."""

from __future__ import annotations

import json

import torch

from calm_core.artifacts import load_ae, load_model
from calm_core.errors import ArtifactError
from pipelines.official import KINDS
from pipelines.storage import RunDir, fetch_dir


def read_reference(spec: str) -> dict[str, torch.Tensor]:
    """A reference folder: reference.safetensors, in the order reference.json lists (when present)."""
    from safetensors.torch import load_file

    d = fetch_dir(spec)
    path = d / "reference.safetensors"
    if not path.is_file():
        raise ArtifactError(f"'{spec}' has no reference.safetensors (the fixture's format: reference.safetensors + reference.json)")
    try:
        ref = load_file(str(path))
    except Exception as e:
        raise ArtifactError(f"'{path}' is not a readable safetensors file ({str(e)[:100]})") from None
    if "input_ids" not in ref:
        raise ArtifactError(f"'{path}' holds no 'input_ids': nothing to feed the models")
    order = []
    if (d / "reference.json").is_file():
        listed = json.loads((d / "reference.json").read_text()).get("tensors", {})
        order = [n for n in listed if n in ref]
    return {n: ref[n] for n in order + sorted(set(ref) - set(order))}


def run_parity(run: RunDir, reference: str, atol: float, rtol: float, only: tuple[str, ...] = KINDS):
    """The run's models against ``reference`` -> a list of calm_core.parity.Check, in reference order."""
    from calm_core import parity as P

    if not any(run.has_artifact(k) for k in KINDS):
        raise ArtifactError(f"'{run.uri()}' holds none of {', '.join(KINDS)}; import a model first "
                            "(python jobs/official.py import ...)")
    ref = read_reference(reference)
    K = None
    ours: dict[str, torch.Tensor] = {}
    absent: dict[str, str] = {}
    groups = {n.split(".")[0] for n in ref if n not in P.INPUTS}
    ae = None
    if {"ae", "calm"} & groups & set(only):
        if run.has_artifact("ae"):
            ae = load_ae(run.local_artifact("ae"))
            K = ae.cfg.ae.K
            if ref["input_ids"].shape[1] % K:
                raise ArtifactError(f"the reference's sequences of {ref['input_ids'].shape[1]} tokens are not whole chunks of K={K}")
            if "ae" in only:
                ours.update(P.recompute_ae(ae.model, ref))
        else:
            absent.update({"ae": f"{run.uri('ae')} is absent", "calm": f"{run.uri('ae')} is absent"})
    if "calm" in groups and "calm" in only and ae is not None:
        if run.has_artifact("calm"):
            calm = load_model(run.local_artifact("calm"), "calm", expected_ae_sha256=ae.sha256)
            ours.update(P.recompute_calm(calm.model, ae.model, ref))
        else:
            absent["calm"] = f"{run.uri('calm')} is absent"
    if "baseline" in groups and "baseline" in only:
        if run.has_artifact("baseline"):
            ours.update(P.recompute_baseline(load_model(run.local_artifact("baseline"), "baseline").model, ref))
        else:
            absent["baseline"] = f"{run.uri('baseline')} is absent"
    return P.check_all(ref, ours, atol, rtol, absent, tuple(k for k in KINDS if k not in only))
