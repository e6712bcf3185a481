"""The official forward passes recomputed with this project's modules, for a numerical-equality check.

A reference folder (the official fixture's format: ``reference.safetensors`` + ``reference.json``)
holds token ids, the noise the official code drew, and its outputs. ``recompute`` replays that
noise through the project's own models and returns a tensor for every output name it knows;
``compare`` puts each next to the reference. Names (B sequences of T = L*K tokens, N = B*(L-1)
predicted chunks, batch-major, S head samples):

    ae.encoder_out [B, L, 2l] = [mu | log sigma] of every chunk   ae.mean, ae.log_std [B, L, l]
    ae.decoder_logits_from_mean [B, T, V]                       decode(mu)
    ae.forward_logits [B*T, V], ae.forward_loss                 decode(mu + eps * sigma), eps = ae.forward_eps;
                                                                mean token cross-entropy
    calm.embed_proj_out [B, L, d]                               the token input path
    calm.hidden_all [B, L, d], calm.hidden [B, L-1, d]          the backbone on all chunks / on 0..L-2
    calm.target_mean, calm.target_log_std [N, l]                the AE posterior of chunks 1..L-1
    calm.head_samples [S, N, l]                                 the head, u = calm.head_noise + 0.5
    calm.energy_score [N], calm.energy_loss, calm.forward_loss  S(P, y) = diversity - fidelity with the
                                                                targets mu + eps * sigma, eps = calm.energy_target_eps;
                                                                loss = mean(-S)
    calm.sample_decoder_logits [2, B, (L-1)K, V], calm.sample_tokens   head samples 0 and 1 decoded
    calm.forward_brier [4]                                      Brier-1..4 of those two samples against the
                                                                true chunks (calm_core.brierlm, R = 2)
    baseline.logits [B, T, V], baseline.loss                    next-token logits and cross-entropy
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from calm_core.brierlm import brier_n_estimates
from calm_core.energy import posterior_energy_terms

INPUTS = ("input_ids", "ae.forward_eps", "calm.head_noise", "calm.energy_target_eps")
TIE_MARGIN = 1e-5  # an argmax whose two best logits are closer than this may flip with rounding


@torch.no_grad()
def recompute_ae(ae, ref: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ids = ref["input_ids"].long()
    B, T = ids.shape
    K = ae.cfg.K
    L = T // K
    mu, ls = ae.encode(ids.view(B * L, K))  # [B*L, l] x2
    out = {"ae.encoder_out": torch.cat([mu, ls], -1).view(B, L, -1), "ae.mean": mu.view(B, L, -1),
           "ae.log_std": ls.view(B, L, -1), "ae.decoder_logits_from_mean": ae.decode(mu).reshape(B, T, -1)}
    if "ae.forward_eps" in ref:
        z = mu + ref["ae.forward_eps"].reshape(B * L, -1).float() * ls.exp()  # [B*L, l]
        logits = ae.decode(z).reshape(B * T, -1)  # [B*T, V]
        out.update({"ae.forward_logits": logits, "ae.forward_loss": F.cross_entropy(logits.float(), ids.reshape(-1))})
    return out


@torch.no_grad()
def recompute_calm(calm, ae, ref: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ids = ref["input_ids"].long()
    B, T = ids.shape
    K = ae.cfg.K
    L = T // K
    chunks = ids.view(B, L, K)
    x = calm.inputs(chunks, None)  # [B, L, d]
    hidden = calm.backbone(x[:, :-1])  # [B, L-1, d]
    out = {"calm.embed_proj_out": x, "calm.hidden_all": calm.backbone(x), "calm.hidden": hidden}
    mu, ls = ae.encode(chunks[:, 1:].reshape(-1, K))  # [N, l] x2, batch-major
    out.update({"calm.target_mean": mu, "calm.target_log_std": ls})
    if "calm.head_noise" not in ref:
        return out
    h = hidden.reshape(-1, hidden.shape[-1])  # [N, d]
    u = ref["calm.head_noise"].float().transpose(0, 1) + 0.5  # [N, S, noise]: the uniform draws
    samples = calm.head(h, u.shape[1], u=u)  # [N, S, l]
    out["calm.head_samples"] = samples.transpose(0, 1)  # [S, N, l]
    if "calm.energy_target_eps" in ref:
        eps = ref["calm.energy_target_eps"].float().transpose(0, 1)  # [N, M, l]
        fid, div = posterior_energy_terms(samples[None], mu[None], ls[None], eps.shape[1], calm.hcfg.alpha,
                                          eps=eps[None])  # [1, N] x2
        score = (div - fid)[0]  # [N]
        out.update({"calm.energy_score": score, "calm.energy_loss": (-score).mean(), "calm.forward_loss": (-score).mean()})
    two = samples[:, :2].transpose(0, 1)  # [2, N, l]
    logits = ae.decode(two.reshape(-1, two.shape[-1])).view(2, B, (L - 1) * K, -1)  # [2, B, (L-1)K, V]
    tokens = logits.argmax(-1)  # [2, B, (L-1)K]
    out.update({"calm.sample_decoder_logits": logits, "calm.sample_tokens": tokens})
    picks = tokens.view(2, -1, K).transpose(0, 1)  # [N, 2, K]
    brier = brier_n_estimates(picks, chunks[:, 1:].reshape(-1, K), tuple(range(1, min(K, 4) + 1)))
    out["calm.forward_brier"] = torch.stack([brier[n].mean() for n in sorted(brier)])
    return out


@torch.no_grad()
def recompute_baseline(model, ref: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ids = ref["input_ids"].long()
    logits = model.logits(ids)  # [B, T, V]
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].reshape(-1))
    return {"baseline.logits": logits, "baseline.loss": loss}


@dataclass
class Check:
    name: str
    status: str  # ok | FAIL | unknown | input | not checked | skip
    max_abs: float = 0.0
    max_rel: float = 0.0
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.status in ("ok", "input", "skip")

    def line(self) -> str:
        if self.status in ("ok", "FAIL"):
            return (f"{self.status:<11} {self.name:<28} max abs {self.max_abs:.2e}  max rel {self.max_rel:.2e}"
                    f"{'  ' + self.note if self.note else ''}")
        return f"{self.status:<11} {self.name:<28} {self.note}"


def _ties(logits: torch.Tensor, margin: float) -> torch.Tensor:
    """Positions whose two largest logits are within ``margin``: [.., V] -> [..] bool."""
    top = logits.float().topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]) < margin


def compare(name: str, ours: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float,
            logits: torch.Tensor | None = None) -> Check:
    """|ours - ref| <= atol + rtol |ref| everywhere; integer tensors exactly, except at argmax ties
    of ``logits`` (their two best within max(TIE_MARGIN, atol): logits that may be off by atol can
    flip there; reported)."""
    if tuple(ours.shape) != tuple(ref.shape):
        return Check(name, "FAIL", note=f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}")
    if not ref.is_floating_point():
        differ = ours.long() != ref.long()
        note = ""
        if logits is not None:
            ties = _ties(logits, max(TIE_MARGIN, atol))
            note = f"{int((differ & ties).sum())} differ at ties" if bool((differ & ties).any()) else ""
            differ = differ & ~ties
        n = int(differ.sum())
        return Check(name, "ok" if n == 0 else "FAIL", float(n), 0.0, f"{n} of {ref.numel()} differ" + (f"; {note}" if note else ""))
    a, b = ours.double(), ref.double()
    err = (a - b).abs()
    rel = err / b.abs().clamp_min(1e-12)
    ok = bool((err <= atol + rtol * b.abs()).all()) and bool(torch.isfinite(a).all())
    return Check(name, "ok" if ok else "FAIL", float(err.max()) if err.numel() else 0.0,
                 float(rel.max()) if rel.numel() else 0.0)


def check_all(ref: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], atol: float, rtol: float,
              absent: dict[str, str], skipped: tuple[str, ...] = ()) -> list[Check]:
    """One Check per reference tensor, in the reference's order. ``absent``: prefix -> why its
    tensors could not be computed (a model the run lacks); ``skipped``: prefixes left out on purpose."""
    checks = []
    for name, t in ref.items():
        if name in INPUTS:
            checks.append(Check(name, "input", note=f"replayed {tuple(t.shape)}"))
        elif name in ours:
            logits = ours.get(name.replace("_tokens", "_decoder_logits")) if not t.is_floating_point() else None
            checks.append(compare(name, ours[name], t, atol, rtol, logits))
        elif name.split(".")[0] in skipped:
            checks.append(Check(name, "skip", note="skipped (--only)"))
        elif name.split(".")[0] in absent:
            checks.append(Check(name, "not checked", note=absent[name.split(".")[0]]))
        else:
            checks.append(Check(name, "unknown", note="no computation of this name here (not checked)"))
    return checks
