"""Stage 2 and the baseline through a real 2-CPU Ray cluster: Ray Train + DeepSpeed ZeRO on the
latents Parquet, a run killed after a checkpoint that resumes on rerun exactly where it stopped
(weights, optimizer, data position, RNG), artifacts that load with plain PyTorch, and latents of
another AE refused."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from calm_core.artifacts import load_model
from calm_core.config import load_config
from calm_core.errors import ArtifactError
from pipelines.serve.generation import Generator
from pipelines.data.precompute import precompute_latents
from pipelines.train.stage2 import run_stage2
from pipelines.train.trace import KILL_ENV, TRACE_ENV, weights_digest
from pipelines.storage import RunDir

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(ray_module, tmp_path_factory, tiny_corpus_text, make_ae):
    """The one run the tests below inspect (trained once: they only read it): a random AE, its
    latents, CALM on 2 workers killed (SIGKILL, every rank) after step 5, its last checkpoint at
    step 3, then resumed by the same command to step 6, every step traced (``pipelines.train.trace``);
    and the baseline trained 12 steps on the same blocks (one worker); ``val``: the validation blocks
    each kind got."""
    import pipelines.train.stage2 as S2

    tmp = tmp_path_factory.mktemp("stage2")
    corpus = tmp / "corpus.txt"
    corpus.write_text(tiny_corpus_text)
    run = RunDir(str(tmp / "run"))
    make_ae(tmp / "run" / "ae", tiny_corpus_text)
    precompute_latents(load_config("debug"), str(corpus), run)
    full = load_config("debug", ["distributed.zero_stage=2"])
    val, held_out_blocks = {}, S2.held_out_blocks

    def keep(*args, **kwargs):  # (run, lman, ae identity, L, max_chunks, kind, workers=)
        got = held_out_blocks(*args, **kwargs)
        val[args[-1]] = got[0]
        return got

    with pytest.MonkeyPatch.context() as env:
        env.setattr(S2, "held_out_blocks", keep)
        env.setenv(TRACE_ENV, str(tmp / "trace" / "killed"))
        env.setenv(KILL_ENV, "5")
        with pytest.raises(Exception) as killed:
            run_stage2(full, run, "calm")
        env.delenv(KILL_ENV)
        env.setenv(TRACE_ENV, str(tmp / "trace" / "resumed"))
        calm = run_stage2(full, run, "calm")
        env.delenv(TRACE_ENV)  # the baseline is not traced
        baseline = run_stage2(load_config("debug", ["baseline.max_steps=12", "baseline.log_every=6",
                                                    "distributed.num_workers=1"]), run, "baseline")  # 2: CALM's
    return SimpleNamespace(root=tmp / "run", run=run, corpus=corpus, full=full, killed=killed.value, calm=calm,
                           baseline=baseline, trace=tmp / "trace", val=val)


def _trace(folder: Path) -> dict[int, dict[int, dict]]:
    """{rank: {step: record}} of a traced run."""
    return {r: {rec["step"]: rec for rec in map(json.loads, (folder / f"rank{r}.jsonl").read_text().splitlines())}
            for r in (0, 1)}


def _checkpoints(root: Path) -> dict[int, Path]:
    """{step: folder} of the CALM run's kept Ray Train checkpoints."""
    folders = [c for c in (root / "_train" / "stage2").glob("checkpoint_*") if c.is_dir()]
    return {json.loads((c / "meta.json").read_text())["step"]: c for c in folders}


def test_calm_killed_after_a_checkpoint_resumes_its_weights_optimizer_and_data(trained):
    from safetensors.torch import load_file

    assert "CalmError" not in type(trained.killed).__name__  # the kill, not a refusal
    killed, resumed = _trace(trained.trace / "killed"), _trace(trained.trace / "resumed")
    for r in (0, 1):
        assert sorted(killed[r]) == [1, 2, 3, 4, 5] and sorted(resumed[r]) == [4, 5, 6]
        # after the restart every rank reads the batches the killed run read after its checkpoint,
        # at the same data position, and its weights after each step are bit for bit the killed
        # run's (so the optimizer state and the random draws were restored too)
        for step in (4, 5):
            assert resumed[r][step] == killed[r][step], (r, step)
    assert [killed[0][s]["batch"] for s in (1, 2, 3, 4, 5)] != [killed[1][s]["batch"] for s in (1, 2, 3, 4, 5)]

    # the weights loaded at the resume are the checkpoint's: DeepSpeed's saved module (read here
    # with plain torch.load) and the killed run's after step 3
    loaded = load_file(trained.trace / "resumed" / "resumed_step3.safetensors")
    ck = _checkpoints(trained.root)[3]
    module = torch.load(ck / "ds" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    assert loaded.keys() == module.keys()
    for k, v in module.items():
        assert torch.equal(loaded[k], v.float()), k
    assert weights_digest(loaded) == killed[0][3]["weights"]

    assert trained.calm["metrics"]["step"] == 6 and trained.calm["metrics"]["stopped_early"] is False
    assert _steps(trained.root / "calm" / "metrics.jsonl") == [3, 6]  # 3 from the killed run, 6 from the resumed one


def test_calm_manifest_counts_tokens_and_training_flops(trained, monkeypatch):
    """Tokens by the batch arithmetic; the FLOPs per token of each part counted by torch's flop
    counter on the trained model (``counted_calm_flops``) and on its AE's encoder."""
    from test_calm_model import counted_calm_flops
    from torch.utils.flop_counter import FlopCounterMode

    from calm_core.artifacts import load_ae

    m = trained.calm["metrics"]
    for key in ("val_loss", "val_fidelity", "val_diversity", "val_brierlm", "val_brier1", "train_flops",
                "tokens_per_s", "tokens_seen"):
        assert key in m, key
    tokens = 6 * 2 * 4 * 8 * 4  # steps x workers x batch x L x K
    assert m["tokens_seen"] == tokens
    art = load_model(trained.root / "calm", "calm")
    counted = counted_calm_flops(art.model, art.tok.vocab_size, 2, monkeypatch)
    parts = trained.calm["flops_per_token_by_part"]
    for part, flops in counted.items():
        assert parts[part] == pytest.approx(flops, rel=1e-9), part
    assert trained.calm["flops_per_token"] == pytest.approx(sum(counted.values()), rel=1e-9)
    assert m["train_flops"] == pytest.approx(sum(counted.values()) * tokens, rel=1e-9)
    ae = load_ae(trained.root / "ae").model
    with FlopCounterMode(display=False) as fc:
        ae.encode(torch.randint(0, art.tok.vocab_size, (10, 4)))
    assert parts["encoder_forward_once"] == pytest.approx(fc.get_total_flops() / 40, rel=1e-6)


def test_calm_artifact_loads_with_plain_pytorch_only_with_its_ae(trained):
    ae_sha = trained.calm["inputs"]["ae_sha256"]
    art = load_model(trained.root / "calm", "calm", expected_ae_sha256=ae_sha)
    model, tok = art.model, art.tok
    h = model.hidden(torch.randint(0, tok.vocab_size, (1, 5, 4)))
    assert model.sample(h, 3).shape == (1, 5, 3, 16)
    with pytest.raises(ArtifactError, match="another autoencoder"):
        load_model(trained.root / "calm", "calm", expected_ae_sha256="0" * 64)


def test_baseline_loss_falls_and_its_brier_scores_match_its_probabilities(trained):
    """The recorded validation of the final baseline against a direct computation from the published
    weights on the same held-out blocks: softmax of the plain forward's logits, cross-entropy over
    the non-pad targets, Brier-1 = 2 P(y) - sum_x P(x)^2 at every token and at the chunk starts."""
    mb = trained.baseline["metrics"]
    losses = [json.loads(line)["val_loss"] for line in (trained.root / "baseline" / "metrics.jsonl").read_text().splitlines()]
    assert mb["step"] == 12 and losses[-1] < losses[0]
    assert mb["val_positions"] == trained.calm["metrics"]["val_positions"]  # the same chunk starts
    L, K = trained.full.model.block_chunks, trained.full.ae.K
    art = load_model(trained.root / "baseline", "baseline")
    tokens = torch.as_tensor(trained.val["baseline"]["tokens"]).flatten(1)  # [blocks, L*K]: what it validated on
    with torch.no_grad():
        probs = art.model.eval().logits(tokens[:, :-1]).double().softmax(-1)  # [blocks, L*K-1, V]
    target = tokens[:, 1:]
    p_true = probs.gather(-1, target[..., None]).squeeze(-1)
    brier1 = 2 * p_true - probs.pow(2).sum(-1)  # [blocks, L*K-1]
    keep = target != art.tok.pad_id
    assert mb["val_loss"] == pytest.approx(float(-p_true.log()[keep].mean()), rel=1e-4)
    assert mb["val_brier1_exact"] == pytest.approx(float(brier1.mean()), rel=1e-4, abs=1e-7)
    starts = torch.arange(K, L * K - 4 + 1, K)  # chunk starts with 4 true tokens after them
    assert mb["val_positions"] == len(tokens) * len(starts)
    assert mb["val_brier1"] == pytest.approx(float(brier1[:, starts - 1].mean()), rel=1e-4, abs=1e-7)


def test_generate_job_prints_the_samples(trained):
    """Generation from the run, the way a user runs it."""
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "generate.py"), "--run", str(trained.root),
                          "--prompt", "the cat", "--chunks", "3", "--candidates", "8", "--samples", "2", "--no-stop"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("--- sample") == 2 and "in 3 steps" in out.stdout


def test_generator_warns_when_prompt_or_continuation_exceed_the_context(trained):
    gen = Generator.from_run(trained.run)
    long = gen.complete("the cat sat " * 50, chunks=3, temperature=1.0)
    assert "cut to its last 16 tokens" in long["warning"] and long["steps"] == 3  # (L=8 - 3 - 1) chunks of 4
    assert "exceed the 8-chunk context" in gen.complete("", chunks=9, temperature=1.0, stop_at_end=False)["warning"]


TOY_P = torch.tensor([0.30, 0.20, 0.15, 0.15, 0.10, 0.10])  # the toy head's law over six latents


def _toy_head(gen: Generator):
    """The run's head replaced by a toy of known law (the backbone, the AE decoder, the engine and the
    exact sampler stay the run's): each sample is one of six fixed latents, latent i with probability
    TOY_P[i], drawn from the generator the engine hands the head -> (sample function, the six chunks
    the run's AE decodes them to, the draws it made {"draws": n})."""
    from calm_core import rng
    from calm_core.autoencoder import decode_tokens

    latents = torch.randn(6, gen.ae.cfg.latent_dim, generator=torch.Generator().manual_seed(1)) * 3.0  # [6, l]
    with torch.no_grad():
        chunks = decode_tokens(gen.ae, latents)  # [6, K]
    assert len({tuple(c) for c in chunks.tolist()}) == 6 and not (chunks == gen.tok.eot_id).any()
    cdf, made = TOY_P.cumsum(0), {"draws": 0}

    def sample(h, n, generator=None):  # h [b, d] -> [b, n, l]
        made["draws"] += h.shape[0] * n
        u = rng.uniform((h.shape[0], n), h.device, generator)
        return latents[torch.searchsorted(cdf, u).clamp(max=5)]

    return sample, chunks, made


def test_exact_sampler_at_half_temperature_picks_with_law_p_squared_from_pairs_of_agreeing_draws(trained, monkeypatch):
    """Through the generation path (Generator, CalmEngine, next_chunks, the AE decode), with the head
    replaced by a toy of known law P (the sampler alone on a toy: tests/test_temperature.py): at T =
    1/2 the picked chunks follow P^2 normalised (chi-square), the exact sampler's draws number what its
    attempts of two draws, 16 per call, predict (8 attempts per call, each agreeing with probability
    q = sum P^2), and the draws it reports are the draws the head made."""
    from calm_core.engine import CalmEngine, GenRequest
    from calm_core.temperature import ExactStats

    gen = Generator.from_run(trained.run)
    sample, chunks, made = _toy_head(gen)
    monkeypatch.setattr(gen.model, "sample", sample)
    out = gen.complete("the cat", chunks=3, temperature=0.5, sampler="exact", max_draws=64, candidates=8)
    assert out["steps"] == 3 and out["exact"]["rows"] == 3 and out["exact"]["fallbacks"] == 0
    assert out["exact"]["draws"] == made["draws"] > 0  # what the head was asked for, fallback included

    B = 4000  # rows of one request (n = B), as the server batches them
    engine = CalmEngine(gen.model, gen.ae, gen.tok, gen.layout)
    engine.stats = stats = ExactStats()
    r = GenRequest.of(gen.tok.encode("the cat"), n=B, temperature=0.5, sampler="exact", max_draws=2000)
    h, _ = engine.prefill([r])
    made["draws"] = 0
    picks = engine.pick(h, r, torch.Generator().manual_seed(0))  # [B, K]
    which = (picks[:, None, :] == chunks[None]).all(-1)  # [B, 6]
    assert bool(which.sum(-1).eq(1).all())  # every pick is one of the six chunks, whole
    counts = which.sum(0).double()
    target = TOY_P.double() ** 2 / (TOY_P.double() ** 2).sum()
    chi2 = ((counts - B * target) ** 2 / (B * target)).sum().item()
    assert chi2 < 20.52, (counts.tolist(), (B * target).tolist())  # chi-square, 5 df, p = 0.001
    # draws: calls of 16 draws (8 attempts of 2) until one attempt agrees: 16 x Geometric(1 - (1 - q)^8)
    q = float((TOY_P.double() ** 2).sum())
    p_call = 1 - (1 - q) ** 8
    mean, se = 16 / p_call, 16 * ((1 - p_call) / p_call**2 / B) ** 0.5
    assert stats.rows == B and stats.fallbacks == 0 and stats.draws == made["draws"]
    assert abs(stats.draws / B - mean) < 5 * se, (stats.draws / B, mean, se)


def test_generator_refuses_another_ae(trained, tmp_path, make_ae):
    other = tmp_path / "other_ae"
    make_ae(other, trained.corpus.read_text(), seed=5)
    with pytest.raises(ArtifactError, match="another autoencoder"):
        Generator.from_run(trained.run, str(other))


def test_a_complete_run_is_left_alone_and_another_model_is_refused(ray_session, trained):
    assert run_stage2(trained.full, trained.run, "calm")["files"] == trained.calm["files"]
    with pytest.raises(ArtifactError, match="model.n_layers"):
        run_stage2(load_config("debug", ["model.n_layers=3", "stage2.max_steps=9"]), trained.run, "calm")


def test_latents_of_another_ae_are_refused(ray_session, tiny_corpus, tmp_path, make_ae):
    run = RunDir(str(tmp_path / "run"))
    make_ae(tmp_path / "run" / "ae", tiny_corpus.read_text())
    precompute_latents(load_config("debug"), str(tiny_corpus), run)
    other = tmp_path / "other_ae"
    make_ae(other, tiny_corpus.read_text(), seed=5)
    with pytest.raises(ArtifactError, match="ae_sha256"):
        run_stage2(load_config("debug"), run, "calm", ae_path=str(other))

