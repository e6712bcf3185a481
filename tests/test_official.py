"""The official CALM format: import, parity with the official forward passes, export, bad input.

tests/fixtures/official-calm (README there) holds tiny models written by the official code and the
outputs of its forward passes with the noise recorded. Parity is the fidelity test: the project's
modules, fed the imported weights and the replayed noise, must give the official numbers.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "official-calm"
JOB = str(ROOT / "jobs" / "official.py")
BF16_ATOL, BF16_RTOL = 0.1, 0.1  # weights rounded to 8 mantissa bits: logits move by a few 1e-2 here


def official_style_tokenizer(path: Path) -> Path:
    """A byte-level BPE of 448 tokens plus the official tokenizer's specials at the fixture's ids:
    <|begin_of_text|> 448, <|end_of_text|> 449, reserved 450..511, [PAD] 512 (vocabulary 513)."""
    rnd = random.Random(0)
    words = ["the", "king", "queen", "said", "and", "to", "of", "a", "in", "that", "is", "was", "he", "she", "it",
             "with", "for", "as", "his", "her", "on", "be", "at", "by", "this", "had", "not", "but", "from", "or"]
    texts = [" ".join(rnd.choice(words) + rnd.choice(["", "s", "ed", "ing", "ly", "er"]) for _ in range(50))
             for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=448, min_frequency=1, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert tok.get_vocab_size() == 448
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"]
                           + [f"<|reserved_special_token_{i}|>" for i in range(62)] + ["[PAD]"])
    tok.save(str(path))
    return path


def official(*argv: str) -> tuple[int, str, str]:
    """jobs/official.py in this process: (exit code, stdout, stderr)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from pipelines.cli import job_main

    sys.path.insert(0, str(ROOT / "jobs"))
    import official as job  # jobs/official.py

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = job_main(job.main, list(argv))
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def parity_lines(stdout: str) -> dict[str, str]:
    return {line.split()[1]: line.split()[0] for line in stdout.splitlines()
            if line.split() and line.split()[0] in ("ok", "FAIL", "input", "unknown", "skip")}


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    return official_style_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tok) -> Path:
    """The fixture's three models imported as a user does it (the command line, a new process)."""
    run = tmp_path_factory.mktemp("runs") / "imported"
    out = subprocess.run([sys.executable, JOB, "import", "--calm", str(FIX / "calm"), "--ae", str(FIX / "ae"),
                          "--baseline", str(FIX / "baseline"), "--tokenizer", str(tok), "--run", str(run)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return run


def copy_of(src: Path, dest: Path, change=None, fmt: str = "bin", shards: int = 1) -> Path:
    """An official folder re-saved: ``change(state)`` edits the state dict; ``fmt`` bin | safetensors;
    ``shards`` > 1 splits it with an index.json as save_pretrained does."""
    dest.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "pytorch_model.bin":
            shutil.copy(f, dest / f.name)
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    if change:
        state = change(state) or state
    names = list(state)
    ext = "bin" if fmt == "bin" else "safetensors"
    stem = "pytorch_model" if fmt == "bin" else "model"

    def save(part: dict, path: Path) -> None:
        if fmt == "bin":
            torch.save(part, path)
        else:
            save_file({k: v.contiguous().clone() for k, v in part.items()}, str(path))

    if shards == 1:
        save(state, dest / f"{stem}.{ext}")
        return dest
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: state[k] for k in names[i * per:(i + 1) * per]}
        save(part, dest / fname)
        weight_map.update({k: fname for k in part})
    (dest / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dest


def weights_hashes(run: Path) -> dict[str, str]:
    return {k: json.loads((run / k / "manifest.json").read_text())["files"]["model.safetensors"]
            for k in ("ae", "calm", "baseline") if (run / k).is_dir()}


# ----------------------------------------------------------------------------- parity


def test_import_then_parity_passes_for_all_three_models(run):
    out = subprocess.run([sys.executable, JOB, "parity", "--run", str(run), "--reference", str(FIX)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    status = parity_lines(out.stdout)
    ref = json.loads((FIX / "reference.json").read_text())["tensors"]
    assert set(status) == set(ref)  # one line per reference tensor, none skipped silently
    inputs = {"input_ids", "ae.forward_eps", "calm.head_noise", "calm.energy_target_eps"}
    assert {n for n, s in status.items() if s == "input"} == inputs
    assert all(s == "ok" for n, s in status.items() if n not in inputs)
    assert "parity: 20 of 20 tensors" in out.stdout


def test_the_imported_run_has_the_official_settings_and_manifests(run):
    from calm_core.artifacts import load_ae, load_model

    ae = load_ae(run / "ae")
    calm = load_model(run / "calm", "calm", expected_ae_sha256=ae.sha256)
    base = load_model(run / "baseline", "baseline")
    assert (ae.cfg.ae.K, ae.cfg.ae.latent_dim, ae.cfg.ae.clamp_log_sigma) == (4, 16, False)
    m, h = calm.cfg.model, calm.cfg.head
    assert (m.rope_pairing, m.layernorm_eps, h.arch, h.noise, h.blocks, h.noise_dim) == ("halves", 1e-6, "paper", "uniform", 2, 32)
    assert base.cfg.model.tie_embeddings is False and base.model.lm_head is not None
    assert calm.manifest["source"]["architectures"] == ["EnergyTransformer"]
    assert (ae.tok.eot_id, ae.tok.pad_id, ae.tok.bos_id, ae.tok.vocab_size) == (449, 512, 448, 513)


def test_round_trip_official_import_export_is_bit_exact(run, tmp_path):
    code, _, err = official("export", "--run", str(run), "--out", str(tmp_path / "out"))
    assert code == 0, err
    for kind in ("ae", "calm", "baseline"):
        a = torch.load(FIX / kind / "pytorch_model.bin", weights_only=True)
        b = torch.load(tmp_path / "out" / kind / "pytorch_model.bin", weights_only=True)
        assert list(a) == list(b) or set(a) == set(b), kind
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{kind}: {k}"
        # the same storage sharing as the official save (the head under two names, the AE tie)
        storages = lambda s: len({v.untyped_storage().data_ptr() for v in s.values()})  # noqa: E731
        assert storages(a) == storages(b), kind
        conf = json.loads((tmp_path / "out" / kind / "config.json").read_text())
        official_conf = json.loads((FIX / kind / "config.json").read_text())
        for key in ("architectures", "hidden_size", "intermediate_size", "vocab_size", "patch_size", "latent_size",
                    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "rope_theta", "noise_size",
                    "num_mlp_layers", "num_encoder_layers", "rms_norm_eps", "beta", "kl_weight", "kl_clamp"):
            assert conf.get(key) == official_conf.get(key), (kind, key)


def test_safetensors_and_sharded_copies_import_to_the_same_run(run, tok, tmp_path):
    def drop_tie(state):  # transformers' safetensors save drops the AE's tied projection
        state.pop("decoder.lm_head_weight")

    def drop_second_head(state):  # a deduplicating save keeps one name of the shared head
        for k in [k for k in state if k.startswith("generative_head.")]:
            state.pop(k)

    variants = {
        "safetensors": dict(ae=dict(fmt="safetensors", change=drop_tie), calm=dict(fmt="safetensors", change=drop_second_head),
                            baseline=dict(fmt="safetensors")),
        "two_shards": dict(ae=dict(shards=2), calm=dict(shards=2), baseline=dict(shards=2, fmt="safetensors")),
    }
    for name, kinds in variants.items():
        dirs = {k: copy_of(FIX / k, tmp_path / name / k, **kw) for k, kw in kinds.items()}
        code, _, err = official("import", "--calm", str(dirs["calm"]), "--ae", str(dirs["ae"]), "--baseline",
                                str(dirs["baseline"]), "--tokenizer", str(tok), "--run", str(tmp_path / name / "run"))
        assert code == 0, err
        assert weights_hashes(tmp_path / name / "run") == weights_hashes(run), name


def test_the_calm_folder_alone_brings_its_ae(run, tok, tmp_path):
    """(Given as file:// URIs, which the storage layer reads like any other.)"""
    code, _, err = official("import", "--calm", f"file://{FIX / 'calm'}", "--tokenizer", f"file://{tok}",
                            "--run", str(tmp_path / "r"))
    assert code == 0, err
    assert weights_hashes(tmp_path / "r")["ae"] == weights_hashes(run)["ae"]
    code, out, _ = official("parity", "--run", str(tmp_path / "r"), "--reference", str(FIX), "--only", "ae,calm")
    assert code == 0, out
    code, out, _ = official("parity", "--run", str(tmp_path / "r"), "--reference", str(FIX))
    assert code == 1 and parity_lines(out).get("baseline.logits") is None and "baseline.logits" in out


def test_a_bfloat16_copy_imports_and_passes_at_a_bfloat16_tolerance(tok, tmp_path):
    to_bf16 = lambda s: {k: v.to(torch.bfloat16) for k, v in s.items()}  # noqa: E731
    dirs = {k: copy_of(FIX / k, tmp_path / k, change=to_bf16) for k in ("ae", "calm", "baseline")}
    code, _, err = official("import", "--calm", str(dirs["calm"]), "--ae", str(dirs["ae"]), "--baseline",
                            str(dirs["baseline"]), "--tokenizer", str(tok), "--run", str(tmp_path / "r"))
    assert code == 0, err
    from calm_core.checkpoint import load_weights

    assert all(t.dtype == torch.bfloat16 for t in load_weights(tmp_path / "r" / "calm" / "model.safetensors").values())
    code, out, _ = official("parity", "--run", str(tmp_path / "r"), "--reference", str(FIX))
    assert code == 1  # at float32 tolerance the rounding shows
    code, out, _ = official("parity", "--run", str(tmp_path / "r"), "--reference", str(FIX), "--atol", str(BF16_ATOL),
                            "--rtol", str(BF16_RTOL))
    assert code == 0, out
    code, _, err = official("export", "--run", str(tmp_path / "r"), "--out", str(tmp_path / "out"))
    assert code == 0, err
    back = torch.load(tmp_path / "out" / "calm" / "pytorch_model.bin", weights_only=True)
    orig = torch.load(dirs["calm"] / "pytorch_model.bin", weights_only=True)
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], orig[k]) for k in orig)


# ----------------------------------------------------------------------------- the check can fail


def _edit_config(run: Path, kind: str, edit) -> None:
    """Change a setting of an imported artifact and re-seal its manifest (a deliberate wrong model)."""
    import yaml

    from calm_core.checkpoint import sha256_file

    d = run / kind
    conf = yaml.safe_load((d / "config.yaml").read_text())
    edit(conf)
    (d / "config.yaml").write_text(yaml.safe_dump(conf, sort_keys=False))
    man = json.loads((d / "manifest.json").read_text())
    man["files"]["config.yaml"] = sha256_file(d / "config.yaml")
    (d / "manifest.json").write_text(json.dumps(man))


@pytest.mark.parametrize("what", ["transposed", "layernorm_eps", "gaussian_noise", "adjacent_rope"])
def test_parity_fails_when_one_thing_changes(run, tmp_path, what):
    r = tmp_path / "r"
    shutil.copytree(run, r)
    if what == "transposed":
        from calm_core.checkpoint import save_weights, sha256_file, load_weights

        state = load_weights(r / "calm" / "model.safetensors")
        state["backbone.blocks.0.attn.out.weight"] = state["backbone.blocks.0.attn.out.weight"].t().contiguous()
        save_weights(state, r / "calm" / "model.safetensors")
        man = json.loads((r / "calm" / "manifest.json").read_text())
        man["files"]["model.safetensors"] = sha256_file(r / "calm" / "model.safetensors")
        (r / "calm" / "manifest.json").write_text(json.dumps(man))
    elif what == "layernorm_eps":
        _edit_config(r, "calm", lambda c: c["head"].update(layernorm_eps=1e-5))
    elif what == "gaussian_noise":
        _edit_config(r, "calm", lambda c: c["head"].update(noise="gaussian"))
    else:
        _edit_config(r, "calm", lambda c: c["model"].update(rope_pairing="adjacent"))
    code, out, _ = official("parity", "--run", str(r), "--reference", str(FIX), "--only", "calm")
    status = parity_lines(out)
    assert code == 1
    expect_fail = {"transposed": "calm.hidden", "layernorm_eps": "calm.head_samples",
                   "gaussian_noise": "calm.head_samples", "adjacent_rope": "calm.hidden"}[what]
    assert status[expect_fail] == "FAIL", out
    assert status["calm.embed_proj_out"] == "ok"  # before the change, everything still agrees


def test_unknown_reference_tensors_are_reported(run, tmp_path):
    from safetensors.torch import load_file

    ref = load_file(str(FIX / "reference.safetensors"))
    ref["calm.flow_samples"] = torch.zeros(3)
    (tmp_path / "ref").mkdir()
    save_file(ref, str(tmp_path / "ref" / "reference.safetensors"))
    code, out, _ = official("parity", "--run", str(run), "--reference", str(tmp_path / "ref"))
    assert code == 1 and parity_lines(out)["calm.flow_samples"] == "unknown"


# ----------------------------------------------------------------------------- bad input


class Evil:  # not a tensor: torch.load(weights_only=True) must refuse to build it
    pass


def _bad_cases(tmp_path: Path, tok: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (import arguments, a phrase the one-line error must hold)."""
    cases = {}
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(FIX / "ae" / "config.json", empty / "config.json")
    cases["no weights"] = (["--ae", str(empty)], "holds no weights")
    pickled = copy_of(FIX / "ae", tmp_path / "pickled")
    torch.save({"x": argparse.Namespace(evil=Evil())}, pickled / "pytorch_model.bin")
    cases["not a plain state dict"] = (["--ae", str(pickled)], "weights_only=True")
    missing = copy_of(FIX / "ae", tmp_path / "missing", change=lambda s: {k: v for k, v in s.items() if k != "encoder.norm.weight"})
    cases["missing key"] = (["--ae", str(missing)], "missing key 'encoder.norm.weight'")
    extra = copy_of(FIX / "ae", tmp_path / "extra", change=lambda s: s.update(bogus=torch.zeros(2)))
    cases["extra key"] = (["--ae", str(extra)], "unexpected key 'bogus'")
    shape = copy_of(FIX / "ae", tmp_path / "shape",
                    change=lambda s: s.update({"encoder.squeeze_layer.bias": torch.zeros(65)}))
    cases["shape"] = (["--ae", str(shape)], "'encoder.squeeze_layer.bias' has shape (65,), the config needs (64,)")
    arch = copy_of(FIX / "calm", tmp_path / "arch")
    conf = json.loads((arch / "config.json").read_text())
    (arch / "config.json").write_text(json.dumps({**conf, "architectures": ["DiffusionTransformer"]}))
    cases["architecture"] = (["--calm", str(arch)], "['DiffusionTransformer'] is not one this project implements")
    cases["wrong kind"] = (["--ae", str(FIX / "calm")], "holds EnergyTransformer, but was given as the ae")
    small = tmp_path / "small.json"
    t = Tokenizer.from_file(str(tok))
    t.add_special_tokens(["<|extra|>"])
    t.save(str(small))
    cases["tokenizer size"] = (["--calm", str(FIX / "calm"), "--tokenizer", str(small)], "the tokenizer has 514 tokens")
    ids = copy_of(FIX / "calm", tmp_path / "ids")
    (ids / "config.json").write_text(json.dumps({**conf, "eos_token_id": 3}))
    cases["special ids"] = (["--calm", str(ids)], "has eos_token_id=3, the tokenizer's is 449")
    return cases


def test_bad_input_is_one_line_and_writes_nothing(tok, tmp_path):
    for name, (args, phrase) in _bad_cases(tmp_path, tok).items():
        run = tmp_path / f"run-{name.replace(' ', '-')}"
        if "--tokenizer" not in args:
            args = [*args, "--tokenizer", str(tok)]
        code, _, err = official("import", *args, "--run", str(run))
        lines = [x for x in err.splitlines() if x.strip()]
        assert code == 2, (name, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], (name, err)
        assert not run.exists(), name


# reference.json as the official script wrote it: its own hash is pinned here, so that a changed
# fixture file cannot come with a reference.json rewritten to match it
REFERENCE_JSON_SHA256 = "5e5b034fa1827339a4a9679cbb7e823a5e4f3c3a41938efd356632be3ed687ed"
NOT_COPIED = {"ae/keys.json", "calm/keys.json", "baseline/keys.json", "baseline/generation_config.json"}


def test_the_fixture_copy_is_the_official_one():
    """Every file under tests/fixtures/official-calm but our README is one the official script wrote,
    unchanged: reference.json by its pinned sha256, every other file by the size and sha256 that
    reference.json gives it (hashed here with hashlib, not the project's sha256_file); no file is
    missing but the four reference.json lists that were never copied here, and none is extra."""
    import hashlib

    def sha256(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert sha256(FIX / "reference.json") == REFERENCE_JSON_SHA256
    listed = json.loads((FIX / "reference.json").read_text())["files"]
    present = {p.relative_to(FIX).as_posix() for p in FIX.rglob("*") if p.is_file()} - {"README.md", "reference.json"}
    assert present == set(listed) - NOT_COPIED
    for rel in sorted(present):
        assert ((FIX / rel).stat().st_size, sha256(FIX / rel)) == (listed[rel]["bytes"], listed[rel]["sha256"]), rel


def test_the_evaluation_estimator_gives_the_official_brier_terms_on_the_official_samples():
    """calm.forward_brier (the official eval forward) from calm.sample_tokens (its two decoded head
    samples) by the estimator the evaluation uses (R = 2), and the paper protocol's settings."""
    from safetensors.torch import load_file

    from calm_core.brierlm import brier_lm, brier_lm_official, brier_n_estimates
    from calm_core.config import EvalConfig, eval_protocol

    ref = load_file(str(FIX / "reference.safetensors"))
    picks = ref["calm.sample_tokens"].view(2, -1, 4).transpose(0, 1)  # [N, 2, K]
    truth = ref["input_ids"].view(2, 8, 4)[:, 1:].reshape(-1, 4)  # [N, K]: chunks 1..L-1
    brier = brier_n_estimates(picks, truth)
    assert torch.allclose(torch.stack([brier[n].mean() for n in (1, 2, 3, 4)]), ref["calm.forward_brier"], atol=1e-7)
    means = {n: float(ref["calm.forward_brier"][n - 1]) for n in (1, 2, 3, 4)}  # all four negative here
    assert brier_lm(means) == 0.0 and brier_lm_official(means) > 0.0  # the official clamp lets them multiply
    paper = eval_protocol(EvalConfig(protocol="paper"))
    assert (paper.samples, paper.block_chunks) == (2, 0)  # two samples; each model at its own trained context
    assert eval_protocol(EvalConfig(protocol="paper", block_chunks=64)).block_chunks == 64


OFFICIAL_LIKE = ["head.arch=paper", "model.rope_pairing=halves", "head.layernorm_eps=1e-5", "model.layernorm_eps=1e-5"]


@pytest.mark.parametrize("override,named", [("head.width_ratio=0.5", "head.width_ratio=0.5"),
                                            ("head.arch=adanorm", "head energy/adanorm"),
                                            ("head.noise=gaussian", "head.noise=gaussian")])
def test_a_calm_the_official_code_cannot_hold_is_refused_for_export_by_name(override, named):
    from calm_core.config import load_config
    from calm_core.errors import ArtifactError
    from calm_core.official import check_exportable

    check_exportable("calm", load_config("debug", OFFICIAL_LIKE))  # the official layout: fine
    with pytest.raises(ArtifactError, match=named.replace(".", r"\.")):
        check_exportable("calm", load_config("debug", [*OFFICIAL_LIKE, override]))
