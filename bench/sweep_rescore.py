#!/usr/bin/env python
"""Every trial of a sweep rescored on the same held-out blocks: the first N blocks of L chunks of the
shared latents' val split in file order (what stage 2 validates on since the preserve_order fix),
with the in-training validation's estimator and seeds (calm_core.evaluate).

    python bench/sweep_rescore.py --sweep runs/recipe --shared runs/recipe/shared/ae-caaad0d05f \
        --blocks 64 --samples 2 --out rescored.json
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from calm_core.artifacts import load_model  # noqa: E402
from calm_core.autoencoder import load_autoencoder_dir  # noqa: E402
from calm_core.evaluate import baseline_heldout, calm_heldout, heldout_record  # noqa: E402
from pipelines.data import latents as LT  # noqa: E402
from pipelines.storage import RunDir  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--sweep", required=True, help="the sweep's --run directory (DIR/trials/*)")
ap.add_argument("--shared", required=True, help="DIR/shared/<ae_key>: the AE and latents the trials used")
ap.add_argument("--blocks", type=int, default=64, help="held-out blocks (the first ones in file order)")
ap.add_argument("--samples", type=int, default=2, help="samples per position (the in-training default: 2)")
ap.add_argument("--out", default="", help="JSON of every trial's record")
args = ap.parse_args()
root, shared, n_blocks, samples = Path(args.sweep), args.shared, args.blocks, args.samples
torch.set_num_threads(2)
run = RunDir(shared)
m = LT.latents_manifest(run)
dtype = m["identity"]["dtype"]
tables = [pq.read_table(f) for f in LT.part_files(run, m, "val")]
tok = np.concatenate([LT.column_matrix(t, "tokens") for t in tables]).astype(np.int64)
mu = torch.cat([LT.decode_floats(LT.column_matrix(t, "mu"), dtype) for t in tables])
ls = torch.cat([LT.decode_floats(LT.column_matrix(t, "log_sigma"), dtype) for t in tables])
ae = load_autoencoder_dir(Path(shared) / "ae")[0]
out = {}
for d in sorted((root / "trials").iterdir()):
    kind = "calm" if (d / "calm" / "manifest.json").is_file() else "baseline"
    if not (d / kind / "manifest.json").is_file():
        continue
    art = load_model(d / kind, kind)
    L = art.cfg.model.block_chunks
    n = min(n_blocks, len(tok) // L)
    val = {"tokens": torch.as_tensor(tok[: n * L].reshape(n, L, -1)), "mu": mu[: n * L].reshape(n, L, -1).float(),
           "log_sigma": ls[: n * L].reshape(n, L, -1).float(), "key": torch.arange(n)}
    with torch.no_grad():
        sums = calm_heldout(art.model, ae, val, 8, samples, 0) if kind == "calm" else \
            baseline_heldout(art.model, val, 8, art.cfg.ae.K, samples, 0, art.tok.pad_id)
    rec = heldout_record(kind, sums)
    out[d.name] = rec
    print(d.name, kind, {k: round(v, 4) for k, v in rec.items() if k in ("val_loss", "val_loss_uncond", "val_loss_perfect",
          "val_gap_closed", "val_gap_prefix1", "val_gap_prefix2", "val_gap_prefix3", "val_loss_shuffled", "val_brier1",
          "val_brierlm", "val_positions")}, flush=True)
if args.out:
    Path(args.out).write_text(json.dumps(out, indent=1))
