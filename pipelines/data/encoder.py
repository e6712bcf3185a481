"""The encoder actor of the latent precompute: the frozen AE over batches of chunks, one pool per job.

``EncodeChunks`` is a Ray Data actor class (``map_batches(EncodeChunks, compute=ActorPoolStrategy)``);
it finds the AE through a small ``AESource`` and declares the memory ``actor_memory_bytes`` says.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from calm_core.config import Config
from pipelines.data import latents as LT

# columns that route a chunk to its shard (made by the read and the tokeniser, carried through the
# encoder, dropped by the writer): not part of the format; the encoder adds "encoder"
ROUTING = ("split", "shard", "doc_index", "last")


@dataclasses.dataclass(frozen=True)
class AESource:
    """Where an encoder actor finds the AE: its folder (``path``, checked against ``sha256``), or, on a
    node that cannot see that folder, the bytes the driver put in the object store once. ``ref`` is a
    one-element list so that Ray hands the actor the reference itself, not the bytes as a constructor
    argument (an actor whose arguments live in the object store cannot be restarted once they go)."""

    path: str
    sha256: str
    vocab_size: int
    mask_id: int
    pad_id: int
    ref: list

    def load(self) -> tuple[str, bytes]:
        """(config.yaml text, model.safetensors bytes)."""
        import hashlib

        folder = Path(self.path)
        weights = folder / "model.safetensors"
        if weights.is_file():
            data = weights.read_bytes()
            if hashlib.sha256(data).hexdigest() == self.sha256:
                return (folder / "config.yaml").read_text(), data
        import ray

        blob = ray.get(self.ref[0])
        return blob["config_yaml"], blob["weights"]


class EncodeChunks:
    """Ray Data actor: chunk rows {"doc_id", "position", "tokens"[K], *routing} -> a table of the latents
    schema plus the routing columns and ``encoder`` (this actor's id: the driver counts the actors
    that encoded, so a test sees the pool made once per job). Built once per job: the AE is loaded
    from its folder (``AESource``)."""

    def __init__(self, source: AESource, dtype: str, use_gpu: bool, threads: int):
        import uuid

        from safetensors.torch import load as load_safetensors

        from calm_core.autoencoder import ChunkAutoencoder
        from calm_core.config import config_from_yaml

        torch.set_num_threads(max(1, threads))
        config_yaml, weights = source.load()
        cfg = config_from_yaml(config_yaml)
        self.model = ChunkAutoencoder(cfg.ae, source.vocab_size, source.mask_id, source.pad_id)
        self.model.load_state_dict(load_safetensors(weights))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.dtype = dtype
        self.schema = LT.latents_schema(cfg.ae.K, cfg.ae.latent_dim, dtype)
        self.name = uuid.uuid4().hex[:12]

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        tokens = np.asarray(batch["tokens"])  # [B, K]
        with torch.inference_mode():
            mu, log_sigma = self.model.encode(torch.from_numpy(tokens.astype(np.int64)).to(self.device))  # [B, l]
        t = LT.to_table(batch["doc_id"], batch["position"], tokens, mu, log_sigma, self.schema, self.dtype)
        for c in ROUTING:
            t = t.append_column(c, pa.array(batch[c]))
        return t.append_column("encoder", pa.array([self.name] * len(t), pa.string()))


def actor_memory_bytes(cfg: Config, params: int) -> int:
    """What one encoder actor declares to Ray (``latents.actor_memory_mb``; 0 = this estimate), for an
    AE of ``params`` parameters and ``cfg.ae``'s sizes at ``latents.batch_size`` chunks per call.

    Measured by Ray Data itself (the peak USS of the encoder actor it reports; demo AE: K=4, d=256,
    FFN 640, 3.6 M parameters, the 3 plays a*_gut.txt): 642 MiB at batch 256, 617 MiB at 1024,
    548 MiB at 4096; in a bare actor doing the same calls 268-369 MiB (Ray Data's worker adds the
    blocks it holds and the object-store pages it writes). Ray Data warns unless the declared
    memory is at least 1.25x the peak. So: 600 MiB for the process, 3 x 4 bytes per parameter (the
    float32 weights, the safetensors bytes and the state dict while loading), 10 x K x (d + FFN)
    bytes per chunk of a batch (the encoder's activations: 33 KB per chunk measured in the bare
    actor between batch 1024 and 4096), 1 GiB more on a GPU (the CUDA context's host memory; not
    measured here), all x 1.3."""
    if cfg.latents.actor_memory_mb:
        return int(cfg.latents.actor_memory_mb) * 2**20
    a = cfg.ae
    need = 600 * 2**20 + 12 * params + cfg.latents.batch_size * 10 * a.K * (a.d_model + a.ffn_dim)
    return int(1.3 * (need + (2**30 if cfg.latents.use_gpu else 0)))
