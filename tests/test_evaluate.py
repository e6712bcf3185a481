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
import torch.nn.functional as F
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


def test_the_report_holds_every_field_and_the_files(evaluated, held_blocks):
    cfg, run, _, rep = evaluated
    # the temperature sweep's positions, counted: L - 1 per block whose key is a multiple of sweep_every
    per_block = rep["context_chunks"]["calm"] - 1
    swept = int((held_blocks["key"] % cfg.eval.sweep_every == 0).sum()) * per_block
    folder = Path(run.path("eval", "held"))
    assert {"report.json", "report.md", "brierlm_vs_flops.png", "temperature.png", "ae_bands.png",
            "manifest.json"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "report.json").read_text())["blocks"] == rep["blocks"]
    assert rep["blocks"]["calm"] == rep["blocks"]["baseline"] == rep["calm"]["blocks"] > 4  # one context: one pass
    for kind in ("calm", "baseline"):
        m = rep[kind]
        # the intervals' values: tests/test_eval_report.py (textbook formula, coverage of a known mean)
        assert all(len(m[f"brier{n}"]["ci95"]) == 2 for n in (1, 2, 3, 4)) and len(m["brierlm_ci95"]) == 2
        assert set(m["agreement"]) == {"token_accuracy", "exact_chunk", "bleu", "rouge_l"}
        assert [t["temperature"] for t in m["temperature"]] == [1.0, 0.5]
        assert [t["positions"] for t in m["temperature"]] == [swept, swept] and 0 < swept < rep["blocks"][kind] * per_block
        assert m["positions"] == rep["blocks"][kind] * per_block  # every chunk start of every block
    assert {"loss", "fidelity", "diversity", "energy_score", "latent"} <= set(rep["calm"])
    assert set(rep["calm"]["latent"]) == {"mse_one", "mse_mean", "cos_one", "cos_mean"}
    assert {"sampled_brierlm", "sampled_brier1", "brier1_every_token", "perplexity"} <= set(rep["baseline"])
    assert "training split" in rep["ae"]["band_source"]
    assert rep["context_chunks"] == {"calm": cfg.model.block_chunks, "baseline": cfg.model.block_chunks}
    assert rep["context"] == "each model's trained context" and rep["throughput"]["actors"] == 2
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


@pytest.fixture(scope="module")
def held_blocks(evaluated) -> dict[str, torch.Tensor]:
    _, run, _, rep = evaluated
    return _blocks(run, "held", rep["context_chunks"]["calm"])


def _mc(expected: float, n: int) -> float:
    """Four standard errors of a mean of n values in [0, 1] with mean ``expected`` (variance <= mean),
    the expectation floored at 1e-3 (it is an estimate itself)."""
    return 4 * (max(expected, 1e-3) / n) ** 0.5


def test_the_temperature_sweep_agrees_with_what_each_sampler_implies(evaluated, held_blocks):
    """The sweep's accuracy (a pick equals the true chunk y) and collision (two picks agree) per
    temperature, against references computed another way on the swept blocks. Baseline: accuracy's
    expectation is P_T(y), the product of the tempered softmax over y's K tokens (teacher forcing),
    and collision is at most the first token's sum_v p_T(v)^2. CALM at T = 1: P(y) and sum_x P(x)^2
    from 512 decoded head samples per position; below 1 the batch approximation picks among N
    candidates, so its law is at most N P (union bound): accuracy <= N P(y), collision <= N^2 sum P^2.
    (The models are random: every expectation is near 0 here, and the picks must show it.)"""
    from calm_core.artifacts import load_ae, load_model
    from calm_core.autoencoder import decode_tokens

    cfg, run, _, rep = evaluated
    sel = held_blocks["key"] % cfg.eval.sweep_every == 0
    tok, mu = held_blocks["tokens"][sel].long(), held_blocks["mu"][sel].float()  # [s, L, K], [s, L, l]
    (s, L, K), N = tok.shape, cfg.eval.candidates
    n = s * (L - 1)  # swept positions
    base = load_model(run.local_artifact("baseline"), "baseline").model.eval()
    flat = tok.flatten(1)  # [s, L*K]
    with torch.no_grad():
        logits = base.logits(flat[:, :-1]).float()  # [s, L*K-1, V]: position t predicts token t+1
    for t, got in zip(cfg.eval.temperatures, rep["baseline"]["temperature"]):
        logp = (logits / t).log_softmax(-1)
        p_y = logp.gather(-1, flat[:, 1:, None])[..., 0][:, K - 1:].reshape(s, L - 1, K).sum(-1).exp()  # [s, L-1]
        first = logp[:, K - 1::K].exp().pow(2).sum(-1)  # [s, L-1]: at each chunk start
        p_y, first = p_y.mean().item(), first.mean().item()
        assert got["positions"] == n and abs(got["accuracy"] - p_y) <= _mc(p_y, n), (t, got, p_y)
        assert got["collision"] <= first + _mc(first, n), (t, got, first)
    ae = load_ae(run.local_artifact("ae")).model.eval()
    calm = load_model(run.local_artifact("calm"), "calm").model.eval()
    M = 512
    with torch.no_grad():
        h = calm.hidden(tok[:, :-1], mu[:, :-1])  # [s, L-1, d]
        x = decode_tokens(ae, calm.sample(h, M, generator=torch.Generator().manual_seed(5))).flatten(0, 1)  # [n, M, K]
    p_y = (x == tok[:, 1:].flatten(0, 1)[:, None]).all(-1).double().mean(-1).mean().item()
    counts = [torch.unique(row, dim=0, return_counts=True)[1].double() for row in x]
    q = sum(((c * (c - 1)).sum() / (M * (M - 1))).item() for c in counts) / n
    for t, got in zip(cfg.eval.temperatures, rep["calm"]["temperature"]):
        if t == 1.0:
            assert abs(got["accuracy"] - p_y) <= _mc(p_y, n) and abs(got["collision"] - q) <= _mc(q, n), (t, got)
        else:
            assert got["accuracy"] <= N * p_y + _mc(N * p_y, n), (t, got, p_y)
            assert got["collision"] <= N * N * q + _mc(N * N * q, n), (t, got, q)


def test_brierlm_equals_the_in_training_estimator_on_the_same_blocks_and_seed(evaluated, held_blocks):
    from calm_core.artifacts import load_ae, load_model
    from calm_core.evaluate import baseline_heldout, calm_heldout, heldout_record

    cfg, run, _, rep = evaluated
    val = held_blocks
    assert len(val["tokens"]) == rep["blocks"]["calm"]
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
    # the loss's scale: the references (perfect, unconditional, first k tokens known) and the context ablation
    for name in ("loss_perfect", "loss_uncond", "gap_closed", "loss_shuffled"):
        assert rep["calm"][name] == pytest.approx(c[f"val_{name}"], rel=1e-6), name
    for k in (1, 2, 3):
        assert rep["calm"]["prefix"][str(k)]["loss"] == pytest.approx(c[f"val_loss_prefix{k}"], rel=1e-6)
        assert rep["calm"]["prefix"][str(k)]["gap_closed"] == pytest.approx(c[f"val_gap_prefix{k}"], rel=1e-6)
    md = Path(run.path("eval", "held", "report.md")).read_text()
    assert "first 3 tokens of the chunk known" in md and "context shuffled across positions" in md
    assert rep["baseline"]["cross_entropy"]["mean"] == pytest.approx(b["val_loss"], rel=1e-6)
    # perplexity by another route: the plain forward's logits and F.cross_entropy over the non-pad targets
    flat = val["tokens"].flatten(1).long()  # [blocks, L*K]
    with torch.no_grad():
        ce = F.cross_entropy(base.logits(flat[:, :-1]).flatten(0, 1), flat[:, 1:].flatten(), ignore_index=ae.tok.pad_id)
    assert rep["baseline"]["perplexity"] == pytest.approx(math.exp(ce.item()), rel=1e-5)


def test_the_ae_bands_match_a_count_over_the_training_tokens_and_the_blocks(evaluated, held_blocks):
    """The AE part against a brute force: token counts of the training split read from the latents'
    Parquet, frequency ranks by a stable sort in Python, each non-pad token of the scored blocks
    counted in its band, and mu decoded for every chunk at once."""
    import pyarrow.parquet as pq

    from calm_core.artifacts import load_ae

    cfg, run, _, rep = evaluated
    ae = load_ae(run.local_artifact("ae"))
    V, pad, edges = ae.tok.vocab_size, ae.tok.pad_id, cfg.eval.band_edges
    counts = [0] * V
    for part in sorted(Path(run.path("latents", "train")).rglob("*.parquet")):
        for t in pq.read_table(part, columns=["tokens"]).column("tokens").to_pylist():
            for i in t:
                counts[i] += 1
    assert sum(counts) > 0
    rank = {t: r for r, t in enumerate(sorted(range(V), key=lambda t: -counts[t]))}
    band = [sum(rank[t] >= e for e in edges) if counts[t] else len(edges) + 1 for t in range(V)]
    val = held_blocks
    chunks = val["tokens"].flatten(0, 1).long()  # [chunks, K]
    with torch.no_grad():
        right = ae.model.eval().decode(val["mu"].flatten(0, 1).float()).argmax(-1) == chunks
    seen, hit = [0] * (len(edges) + 2), [0] * (len(edges) + 2)
    for t, ok in zip(chunks.flatten().tolist(), right.flatten().tolist()):
        if t != pad:
            seen[band[t]] += 1
            hit[band[t]] += ok
    got = rep["ae"]
    assert got["tokens"] == sum(seen) == int((chunks != pad).sum())
    assert [x["tokens"] for x in got["bands"]] == seen
    assert [x["acc_mu"] for x in got["bands"]] == pytest.approx([h / s if s else None for h, s in zip(hit, seen)])
    assert got["acc_mu"] == pytest.approx(sum(hit) / sum(seen))


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


def test_the_paper_protocol_scores_the_official_packed_blocks_each_model_at_its_own_context(ray_module, tmp_path):
    """eval.protocol=paper on a JSON-lines corpus read as it is: the blocks scored are, id for id, the
    official code's packed blocks (BOS per article, cut across articles, the tail dropped) at each
    model's own trained context (CALM 8 chunks = 32 tokens, the baseline 16 tokens here); CALM's
    Brier-n are its two-sample estimator on those blocks and seeds, the baseline's the official
    estimator at every token position; every BrierLM carries its intervals and positions."""
    from calm_core.artifacts import load_ae, load_model
    from calm_core.config import load_config
    from calm_core.evaluate import baseline_every_token_scores, block_generators, calm_heldout
    from pipelines.eval.job import evaluate
    from pipelines.storage import RunDir
    from test_tokenizer_chunking import official_group_texts

    docs = [d.strip() for d in corpus_text(30, start=500).split("<|endoftext|>")]
    _, tok = write_random_ae(tmp_path / "run" / "ae", corpus_text(40), for_text=True)
    write_random_model(tmp_path / "run", "calm", tok, overrides=("model.block_chunks=8",))
    write_random_model(tmp_path / "run", "baseline", tok, overrides=("model.block_chunks=4",))
    corpus = tmp_path / "articles.json"  # the official file's format: one {"text": ...} per line
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    run = RunDir(str(tmp_path / "run"))
    rep = evaluate(load_config("debug", [*SETTINGS, "eval.protocol=paper", "eval.temperatures=[1.0]", "eval.actors=1"]),
                   run, str(corpus), "paper")
    assert (rep["layout"], rep["protocol"], rep["samples"]) == ("packed", "paper", 2)
    assert rep["context_chunks"] == {"calm": 8, "baseline": 4} and rep["context"] == "each model's trained context"
    val = {}
    for kind, L in rep["context_chunks"].items():
        val[kind] = _blocks(run, "paper", L)
        want = official_group_texts(docs, tok, L * 4)  # the official blocks of L*K tokens
        assert val[kind]["tokens"].flatten(1).tolist() == want and rep["blocks"][kind] == len(want) > 4
        assert rep[kind]["context_tokens"] == L * 4 and len(rep[kind]["brierlm_official_ci95"]) == 2
    assert rep["calm"]["positions"] == rep["blocks"]["calm"] * 7  # every chunk start after the first
    assert rep["baseline"]["positions"] == rep["blocks"]["baseline"] * (16 - 4)  # every token position
    assert "official estimator at every token position" in rep["baseline"]["estimator"]
    ae = load_ae(run.local_artifact("ae"))
    calm = load_model(run.local_artifact("calm"), "calm").model.eval()
    c = calm_heldout(calm, ae.model.eval(), val["calm"], 4, 2, 0)
    base = load_model(run.local_artifact("baseline"), "baseline").model.eval()
    b = baseline_every_token_scores(base, val["baseline"]["tokens"].flatten(1), block_generators(0, val["baseline"]["key"]),
                                    tok.pad_id)
    for n in (1, 2, 3, 4):
        assert rep["calm"][f"brier{n}"]["mean"] == pytest.approx(float(c[f"brier{n}"]) / rep["calm"]["positions"])
        assert rep["baseline"][f"brier{n}"]["mean"] == pytest.approx(float(b[f"brier{n}"].sum()) /
                                                                     rep["baseline"]["positions"])
    md = (tmp_path / "run" / "eval" / "paper" / "report.md").read_text()
    assert "packed layout" in md and "official combination" in md and "scored positions" in md
