"""Every job on a run imported from the official format: generate, evaluate, serve (the official
``openai`` client) and fine-tuning that starts from the imported weights (stage2/baseline.init_from)
on another corpus, resumed after a restart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_official import FIX, official_style_tokenizer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def imported(ray_module, tmp_path_factory):
    from calm_core.config import load_config
    from pipelines.official import import_official
    from pipelines.storage import RunDir

    tmp = tmp_path_factory.mktemp("official")
    tok = official_style_tokenizer(tmp / "tokenizer.json")
    run = RunDir(str(tmp / "run"))
    import_official(load_config("debug"), run, str(tok), calm=str(FIX / "calm"), baseline=str(FIX / "baseline"))
    return tmp, run


def test_generate_prints_the_text_of_the_reference_loop_for_its_seed(imported):
    """jobs/generate.py as a user runs it (seed 0 by default) prints the prompt and the continuation
    that calm_core.generate's plain prefix/extend loop gives for the same seed and settings, the
    prompt laid out as the official code lays it out (packed: BOS, the prompt, PAD to a chunk)."""
    from calm_core import rng
    from calm_core.artifacts import load_ae, load_model
    from calm_core.generate import generate, prompt_chunks

    tmp, run = imported
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "generate.py"), "--run", run.uri(), "--prompt",
                          "the king said", "--chunks", "5", "--temperature", "0.5", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    head, text = out.stdout.split("\n")[0], out.stdout.split("\n")[1]
    ae = load_ae(tmp / "run" / "ae")
    calm = load_model(tmp / "run" / "calm", "calm")
    tok = calm.tok
    context, kept = prompt_chunks(tok.encode("the king said"), calm.model.K, "packed", tok.eot_id, tok.pad_id,
                                  tok.bos_id)
    ids = generate(calm.model.eval(), ae.model.eval(), context, 5, 0.5, 200, rng.generator_for("cpu", 0))[0]
    ids = ids.flatten().tolist()  # [5 * K]
    ids = ids[: ids.index(tok.eot_id)] if tok.eot_id in ids else ids  # the job stops at end-of-text
    assert head.startswith("--- sample 1") and text == tok.decode(kept) + tok.decode(ids)
    assert text.startswith("the king said") and len(text) > len("the king said")


def test_the_paper_protocol_evaluates_each_imported_model_packed_at_its_official_context(imported):
    """eval.protocol=paper on a JSON-lines file (the official evaluation's format), with no context
    given: CALM scored on blocks of 2,048 chunks (8,192 tokens) and the baseline on 2,048-token blocks
    at every token position, both packed as the official code packs them (the report says so)."""
    from calm_core.config import load_config
    from pipelines.eval.job import evaluate

    tmp, run = imported
    rnd = __import__("random").Random(1)
    words = ["the", "king", "queen", "said", "and", "to", "of", "a", "in", "that", "is", "was", "he", "she", "it"]
    articles = [" ".join(rnd.choice(words) for _ in range(1500)) for _ in range(6)]  # ~9k tokens in all
    corpus = tmp / "articles.json"
    corpus.write_text("".join(json.dumps({"text": a}) + "\n" for a in articles))
    rep = evaluate(load_config("debug", ["eval.bootstrap=20", "eval.cpus_per_actor=0.5", "eval.protocol=paper",
                                         "eval.temperatures=[1.0]", "eval.batch_blocks=1", "eval.max_blocks=2"]),
                   run, str(corpus), "held")
    assert rep["models"] == ["calm", "baseline"] and (rep["protocol"], rep["samples"]) == ("paper", 2)
    assert rep["layout"] == "packed" and rep["context_chunks"] == {"calm": 2048, "baseline": 512}
    tokens = rep["corpus_chunks"] * 4  # the packed stream, BOS per article, the tail dropped
    assert rep["blocks"] == {"calm": 1, "baseline": 2} and tokens // 8192 == 1  # eval.max_blocks=2 per model
    assert rep["calm"]["positions"] == rep["blocks"]["calm"] * 2047
    assert rep["baseline"]["positions"] == rep["blocks"]["baseline"] * 2044
    assert "brierlm_official" in rep["calm"]
    assert "official combination" in (tmp / "run" / "eval" / "held" / "report.md").read_text()


def test_serve_answers_the_official_openai_client(imported):
    """The Serve app on the imported run, through the official ``openai`` client: both models are
    listed, and a seeded completion of each is the text the offline engine gives for that seed."""
    from openai import OpenAI
    from ray import serve

    from pipelines.ray_env import free_port
    from pipelines.serve.app import build_app

    _, run = imported
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"run": run.uri(), "config": "debug", "serve.cpus_per_replica": "0.2",
                             "serve.max_tokens": "16"}), name="official", route_prefix="/")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        assert {m.id for m in client.models.list().data} == {"calm", "baseline"}
        for model in ("calm", "baseline"):
            r = client.completions.create(model=model, prompt="the king", max_tokens=8, seed=1, temperature=1.0)
            assert r.choices[0].text and r.usage.completion_tokens > 0, model
            want = offline_text(model, run, "the king", max_tokens=8, seed=1, temperature=1.0)
            assert r.choices[0].text == want, model  # the seed decides, served or offline
    finally:
        serve.shutdown()


def offline_text(kind: str, run, prompt: str, **settings) -> str:
    """The text of one request on the offline engine (no Ray, no HTTP): the run's model in this
    process, the request alone in a batch, as jobs/generate.py runs it."""
    from calm_core.batching import Batch, Member
    from calm_core.engine import BaselineEngine, CalmEngine, GenRequest

    engine = (CalmEngine.load(run.local_artifact("ae"), run.local_artifact("calm")) if kind == "calm"
              else BaselineEngine.load(run.local_artifact("baseline")))
    batch, text = Batch(engine), ""
    batch.join([Member.start(engine, GenRequest.of(engine.tok.encode(prompt), **settings))])
    while batch.members:
        text += "".join(d.text for _, deltas, _ in batch.step() for d in deltas)
        assert not batch.failed, batch.failed
    return text


def test_fine_tuning_starts_from_the_imported_weights_and_resumes(imported, tiny_corpus_text):
    import torch

    from calm_core.artifacts import build_model, load_ae, load_model
    from calm_core.config import load_config
    from calm_core.evaluate import calm_heldout, heldout_record
    from pipelines.data import latents as LT
    from pipelines.data.precompute import precompute_latents
    from pipelines.storage import RunDir
    from pipelines.train.stage2 import held_out_blocks, run_stage2

    tmp, src = imported
    corpus = tmp / "new.txt"
    corpus.write_text(tiny_corpus_text)
    run = RunDir(str(tmp / "ft"))
    ae_dir = str(tmp / "run" / "ae")
    over = ["distributed.num_workers=1", f"stage2.init_from={tmp / 'run' / 'calm'}", "stage2.max_steps=4",
            "stage2.log_every=2", "stage2.checkpoint_every=2"]
    lman = precompute_latents(load_config("debug"), str(corpus), run, ae_path=ae_dir)
    assert lman["identity"]["layout"] == "packed"  # data.layout auto: the imported AE's, the official layout
    cut = run_stage2(load_config("debug", [*over, "stage2.max_minutes=0.0001"]), run, "calm", ae_path=ae_dir)
    assert cut["metrics"]["step"] == 2 and cut["metrics"]["stopped_early"] is True
    done = run_stage2(load_config("debug", over), run, "calm", ae_path=ae_dir)
    recs = [json.loads(x) for x in (tmp / "ft" / "calm" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 2, 4] and done["metrics"]["step"] == 4  # resumed, not restarted
    # the step-0 validation is the imported model's on the same blocks, not a fresh model's
    cfg = load_config("debug", over)
    ae = load_ae(ae_dir)
    val, _ = held_out_blocks(run, LT.latents_manifest(run), ae.identity, cfg.model.block_chunks,
                             cfg.stage2.val_max_chunks, "calm")
    val = {k: torch.from_numpy(v.copy()) for k, v in val.items()}
    imported_model = load_model(tmp / "run" / "calm", "calm").model
    want = heldout_record("calm", calm_heldout(imported_model, ae.model, val, cfg.stage2.batch_size,
                                               cfg.stage2.brier_samples, cfg.stage2.seed))
    assert recs[0]["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    torch.manual_seed(0)
    fresh_cfg = load_model(tmp / "ft" / "calm", "calm").cfg
    fresh = build_model("calm", fresh_cfg, ae.tok.vocab_size).eval()
    other = heldout_record("calm", calm_heldout(fresh, ae.model, val, cfg.stage2.batch_size,
                                                cfg.stage2.brier_samples, cfg.stage2.seed))
    assert abs(other["val_loss"] - recs[0]["val_loss"]) > 1e-3
    # the fine-tuned artifact keeps the imported architecture and names the model it started from
    assert fresh_cfg.model.d_model == 64 and fresh_cfg.head.arch == "paper" and fresh_cfg.model.rope_pairing == "halves"
    ident = json.loads((tmp / "ft" / "_train" / "stage2.identity.json").read_text())
    assert ident["init_from_sha256"] == json.loads((tmp / "run" / "calm" / "manifest.json").read_text())["files"]["model.safetensors"]


def test_the_baseline_starts_from_the_imported_one(imported):
    """baseline.init_from on the worker's side (the same ModelStage.build a Ray Train worker runs; the
    CALM test above runs the whole fit): the imported weights and architecture, the tokenizer checked."""
    import dataclasses

    import torch

    from calm_core.artifacts import load_ae, load_model
    from calm_core.config import load_config
    from calm_core.errors import ArtifactError
    from pipelines.train.loop import TrainPlan
    from pipelines.train.stage2 import ModelStage, _init_from

    tmp, _ = imported
    ae = load_ae(tmp / "run" / "ae")
    cfg = dataclasses.replace(load_config("debug", [f"baseline.init_from={tmp / 'run' / 'baseline'}"]), ae=ae.cfg.ae)
    with pytest.raises(ArtifactError, match="trained on the packed layout and this run trains on the document"):
        _init_from(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, layout="document")), "baseline", ae)
    cfg, weights, ident = _init_from(cfg, "baseline", ae)  # data.layout auto: the imported AE's, packed
    assert cfg.data.layout == "packed"
    assert cfg.model.block_chunks == 8 and cfg.model.d_model == 64 and cfg.model.tie_embeddings is False
    plan = TrainPlan("baseline", "baseline", cfg, ae.tok.to_str(), {}, {}, init_weights=weights)
    built = ModelStage(plan, torch.device("cpu")).build()
    imported_state = load_model(tmp / "run" / "baseline", "baseline").model.state_dict()
    assert all(torch.equal(built.state_dict()[k], v) for k, v in imported_state.items())
    assert ident["init_from_sha256"] == json.loads((tmp / "run" / "baseline" / "manifest.json").read_text())["files"]["model.safetensors"]
    other = load_ae(tmp / "run" / "ae")
    object.__setattr__(other, "tok", type(other.tok).from_str(other.tok.to_str().replace("[PAD]", "[PAD2]")))
    with pytest.raises(ArtifactError, match="another tokenizer"):
        _init_from(cfg, "baseline", other)
