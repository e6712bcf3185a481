"""The evaluation job (jobs/evaluate.py, pipelines/eval): a run with a random tiny AE, CALM and
baseline (written by the project's artifact writer) and training latents, evaluated on a corpus by
the real job on the local Ray with 2 scoring actors. What is tested is the evaluation (fields,
estimators, libraries, reruns, bad input), not the models' quality."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line_error, write_random_ae, write_random_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["eval.actors=2", "eval.cpus_per_actor=0.5", "eval.batch_blocks=4", "eval.sweep_every=2",
            "eval.temperatures=[1.0,0.5]", "eval.candidates=8", "eval.samples=4", "eval.bootstrap=200"]


def corpus_text(n: int, start: int = 0) -> str:
    return "\n<|endoftext|>\n".join(f"the cat number {i} sat on the mat and looked at the dog who ran away. " * 3
                                    for i in range(start, start + n))


@pytest.fixture(scope="module")
def evaluated(ray_module, tmp_path_factory):
    """(cfg, run, corpus path, report) after one evaluation of the whole corpus."""
    from calm_core.config import load_config
    from pipelines.data.precompute import precompute_latents
    from pipelines.eval.job import evaluate
    from pipelines.storage import RunDir

    root = tmp_path_factory.mktemp("eval")
    text = corpus_text(40)
    _, tok = write_random_ae(root / "run" / "ae", text, for_text=True)
    write_random_model(root / "run", "calm", tok)
    write_random_model(root / "run", "baseline", tok)
    corpus = root / "corpus.txt"
    corpus.write_text(text)
    cfg = load_config("debug", SETTINGS)
    run = RunDir(str(root / "run"))
    precompute_latents(cfg, str(corpus), run)  # training latents: the frequency bands' counts
    held = root / "held.txt"
    held.write_text(corpus_text(12, start=1000))
    return cfg, run, held, evaluate(cfg, run, str(held), "held")


def test_the_report_holds_every_field_and_the_files(evaluated):
    cfg, run, _, rep = evaluated
    folder = Path(run.path("eval", "held"))
    assert {"report.json", "report.md", "brierlm_vs_flops.png", "temperature.png", "ae_bands.png",
            "manifest.json"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "report.json").read_text())["blocks"] == rep["blocks"] > 4
    for kind in ("calm", "baseline"):
        m = rep[kind]
        for n in (1, 2, 3, 4):
            lo, hi = m[f"brier{n}"]["ci95"]
            assert lo <= m[f"brier{n}"]["mean"] <= hi
        assert "brierlm" in m and len(m["brierlm_ci95"]) == 2
        assert set(m["agreement"]) == {"token_accuracy", "exact_chunk", "bleu", "rouge_l"}
        assert [t["temperature"] for t in m["temperature"]] == [1.0, 0.5]
        assert all(0 <= t["accuracy"] <= 1 and 0 <= t["collision"] <= 1 and t["positions"] > 0 for t in m["temperature"])
    assert {"loss", "fidelity", "diversity", "energy_score", "latent"} <= set(rep["calm"])
    assert set(rep["calm"]["latent"]) == {"mse_one", "mse_mean", "cos_one", "cos_mean"}
    b = rep["baseline"]
    assert b["perplexity"] == pytest.approx(math.exp(b["cross_entropy"]["mean"]))
    assert {"sampled_brierlm", "sampled_brier1", "brier1_every_token"} <= set(b)
    ae = rep["ae"]
    assert "training split" in ae["band_source"] and sum(x["tokens"] for x in ae["bands"]) == ae["tokens"]
    assert ae["acc_mu"] == pytest.approx(sum((x["acc_mu"] or 0) * x["tokens"] for x in ae["bands"]) / ae["tokens"])
    assert rep["context_chunks"] == cfg.model.block_chunks and rep["throughput"]["actors"] == 2
    md = (folder / "report.md").read_text()
    assert "BrierLM" in md and "Temperature trade-off" in md and "rank 0-99" in md


def _blocks(run, name: str, L: int) -> dict[str, torch.Tensor]:
    """The job's blocks (same cut, same keys), read back from its corpus latents."""
    from pipelines.data import latents as LT
    from pipelines.storage import RunDir

    data = RunDir(run.uri("eval", "_corpora", name))
    ds, man = LT.read_latents(data, "val")
    rows = LT.latent_blocks(ds, man, L).take_all()
    return {k: torch.as_tensor(np.stack([r[k] for r in rows])) for k in ("tokens", "mu", "log_sigma", "key")}


def test_brierlm_equals_the_in_training_estimator_on_the_same_blocks_and_seed(evaluated):
    from calm_core.artifacts import load_ae, load_model
    from calm_core.evaluate import baseline_heldout, calm_heldout, heldout_record

    cfg, run, _, rep = evaluated
    val = _blocks(run, "held", rep["context_chunks"])
    assert len(val["tokens"]) == rep["blocks"]
    ae = load_ae(run.local_artifact("ae"))
    calm = load_model(run.local_artifact("calm"), "calm").model.eval()
    base = load_model(run.local_artifact("baseline"), "baseline").model.eval()
    c = heldout_record("calm", calm_heldout(calm, ae.model.eval(), val, 3, cfg.eval.samples, cfg.eval.seed))
    b = heldout_record("baseline", baseline_heldout(base, val, 5, ae.cfg.ae.K, cfg.eval.samples, cfg.eval.seed,
                                                    ae.tok.pad_id))
    for n in (1, 2, 3, 4):
        assert rep["calm"][f"brier{n}"]["mean"] == pytest.approx(c[f"val_brier{n}"], rel=1e-9, abs=1e-12)
        assert rep["baseline"][f"brier{n}"]["mean"] == pytest.approx(b[f"val_brier{n}"], rel=1e-9, abs=1e-12)
    assert rep["calm"]["loss"] == pytest.approx(c["val_loss"], rel=1e-6)
    assert rep["baseline"]["cross_entropy"]["mean"] == pytest.approx(b["val_loss"], rel=1e-6)


def test_a_rerun_is_a_no_op_and_a_changed_corpus_is_evaluated_again(evaluated):
    from pipelines.eval.job import evaluate

    cfg, run, held, rep = evaluated
    before = run.read_json("eval", "held", "manifest.json")
    assert evaluate(cfg, run, str(held), "held") == json.loads(json.dumps(rep, default=float))
    assert run.read_json("eval", "held", "manifest.json") == before  # nothing rewritten
    held.write_text(held.read_text() + "\n<|endoftext|>\n" + corpus_text(3, start=5000))
    again = evaluate(cfg, run, str(held), "held")
    assert again["corpus_chunks"] > rep["corpus_chunks"]
    assert run.read_json("eval", "held", "manifest.json")["identity"] != before["identity"]


def _job(args: list[str]):
    """jobs/evaluate.py as a user runs it, joining the test session's Ray."""
    import os

    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "evaluate.py"), "--config", "debug", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_bad_input_is_one_line_and_nothing_is_half_written(evaluated, tmp_path):
    import shutil

    cfg, run, held, _ = evaluated
    empty = tmp_path / "empty_run"
    empty.mkdir()
    one_line_error(_job(["--run", str(empty), "--corpus", str(held)]), "no trained model")
    no_ae = tmp_path / "no_ae"
    shutil.copytree(run.path("calm"), no_ae / "calm")
    one_line_error(_job(["--run", str(no_ae), "--corpus", str(held)]), "ae", "stage1")
    short = tmp_path / "short.txt"
    short.write_text("the cat sat.")
    proc = _job(["--run", run.path(), "--corpus", str(short), "--name", "short"])
    one_line_error(proc, "chunks", "blocks of")
    assert not Path(run.path("eval", "short")).exists()
    one_line_error(_job(["--run", run.path(), "--corpus", str(held), "--name", "_corpora"]), "--name")
    foreign = tmp_path / "foreign.txt"  # a script the tokenizer never saw: every character is 3 unmerged bytes
    foreign.write_text("\n<|endoftext|>\n".join("".join(chr(0x4E00 + (i * 37 + j) % 5000) for j in range(400))
                                                for i in range(6)))
    one_line_error(_job(["--run", run.path(), "--corpus", str(foreign), "--name", "foreign"]), "tokens per character")
    assert not Path(run.path("eval", "foreign")).exists()


def test_scoring_actors_must_leave_a_cpu_for_reading_the_blocks(evaluated):
    """Actors that hold all but less than 1 CPU would wait for ever on Ray Data's listing task: refused."""
    from calm_core.config import load_config
    from calm_core.errors import ConfigError
    from pipelines.eval.job import evaluate

    _, run, held, _ = evaluated
    greedy = load_config("debug", [*SETTINGS, "eval.actors=1", "eval.cpus_per_actor=1.75"])
    with pytest.raises(ConfigError, match=r"leaves 0.25 of the cluster's 2 CPUs.*cpus_per_actor to 1 or less"):
        evaluate(greedy, run, str(held), "greedy")
    assert not Path(run.path("eval", "greedy")).exists()
