"""bench/bench_released.py's inputs and its memory measurement, without Ray: the official folders and
the tokenizer its builder writes are what the importer reads (layout, index, configs, names and
shapes), the released configs have the published parameter counts, and a step's peak memory holds
the processes the job does not wait for."""

import json
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import official_folders as F  # noqa: E402
from session_memory import run  # noqa: E402

from calm_core import official as O  # noqa: E402
from calm_core.tokenizer import CalmTokenizer  # noqa: E402

TINY = F.SCALES["tiny"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    out = tmp_path_factory.mktemp("released")
    tok = F.llama_style_tokenizer(out / "tokenizer.json", TINY.vocab, merges=TINY.merges)
    return tok, F.write_models(TINY, out / "official")


def test_the_tokenizer_has_the_official_layout_scaled_down_and_real_ids_for_text(tiny):
    tok = CalmTokenizer.from_file(tiny[0])
    assert tok.vocab_size == 1025 and tok.tok.token_to_id("<|end_of_text|>") == tok.eot_id  # the official names
    # 128000 / 128001 / 128256 of 128,257, scaled: 257 specials at the end, [PAD] last; mask id 0 as official
    assert (tok.bos_id, tok.eot_id, tok.pad_id, tok.mask_id) == (768, 769, 1024, 0)
    assert tok.tok.id_to_token(770) == "<|reserved_special_token_0|>"
    ids = tok.encode("the queen said that the king was singing")
    assert max(ids) < 512 and len(ids) < 20  # merges learnt from text, not the filler, not byte by byte
    assert tok.decode(ids) == "the queen said that the king was singing"


def test_every_tensor_of_the_index_is_in_a_shard_that_exists(tiny):
    for kind, folder in tiny[1].items():
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = set(index["weight_map"].values())
        assert len(shards) > 1 and all((folder / s).is_file() for s in shards), kind
        held = {}
        for s in shards:
            with safe_open(str(folder / s), "pt") as f:
                held.update({k: s for k in f.keys()})
        assert held == index["weight_map"], kind  # each name in the shard the index names, and no other
        assert index["metadata"]["total_size"] == sum(
            t.numel() * t.element_size() for _, t in O.iter_official(folder)), kind


def test_the_importer_reads_the_folders_as_the_scale_describes_them(tiny):
    """Its config readers and tokenizer check accept them, and the names and shapes in the shards are
    those the importer expects of a model of that config (the AE copy inside CALM included)."""
    from pipelines.official import _meta, check_tokenizer, open_source

    tok = CalmTokenizer.from_file(tiny[0])
    cfgs = F.scale_configs(TINY)
    ae_conf = O.read_config(tiny[1]["ae"])
    assert O.architecture(ae_conf, "ae") == "ae"
    assert {k: O.ae_settings(ae_conf, "ae")[k] for k in TINY.ae} == TINY.ae
    for kind in ("calm", "baseline"):
        conf = O.read_config(tiny[1][kind])
        assert O.architecture(conf, kind) == kind
        model = O.model_settings(conf, kind, kind, TINY.ae["K"])["model"]
        want = TINY.calm if kind == "calm" else TINY.baseline
        assert {k: model[k] for k in ("d_model", "n_layers", "n_heads", "ffn_dim")} == \
            {k: want[k] for k in ("d_model", "n_layers", "n_heads", "ffn_dim")}
    for kind, folder in tiny[1].items():
        check_tokenizer(tok, open_source(str(folder), kind))
        shapes = {k: tuple(v.shape) for k, v in _meta(kind, cfgs[kind], tok).state_dict().items()}
        want = O.expected_official(O.rules_for(kind, cfgs[kind]), shapes)
        if kind == "calm":
            ae = {k: tuple(v.shape) for k, v in _meta("ae", cfgs["ae"], tok).state_dict().items()}
            want.update(O.expected_official(O.ae_rules(cfgs["ae"], O.AE_PREFIX), ae))
        optional = {n for r in O.rules_for(kind, cfgs[kind]) + O.ae_rules(cfgs["ae"], O.AE_PREFIX) for n in r.optional}
        held = O.tensor_shapes(folder)
        assert set(held) <= set(want) and set(want) - set(held) <= optional, kind
        assert all(want[k] == v for k, v in held.items()), kind


def test_the_released_configs_have_the_published_parameter_counts():
    released = F.SCALES["released"]
    counts = F.parameter_counts(released)  # on the meta device
    assert round(counts["calm"] / 1e6, 1) == 371.7 and round(counts["ae"] / 1e6, 1) == 75.8
    assert round(counts["baseline"] / 1e6) == 282
    assert F.check_published(released, counts) == []
    assert F.SCALES["released"].vocab == 128257 and F.special_ids(128257) == {"bos": 128000, "eos": 128001, "pad": 128256}
    wrong = replace(released, calm={**released.calm, "ffn_dim": 2816})  # a planted shape error is caught
    assert [x.split(":")[0] for x in F.check_published(wrong, F.parameter_counts(wrong))] == ["calm"]


def test_a_step_s_peak_memory_holds_what_the_job_does_not_wait_for(tmp_path):
    """A job that starts a process it does not wait for (as Ray's workers are): the child's 300 MB
    count in the step's peak, and the child, still running when the job ends, is reported and stopped."""
    child = "import time; x = bytearray(300_000_000); time.sleep(60)"
    job = textwrap.dedent(f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", {child!r}])
        time.sleep(2)
    """)
    u = run([sys.executable, "-c", job], tmp_path / "job.log", interval_s=0.1, linger_s=1)
    assert u.rc == 0 and not u.stopped
    assert u.peak_gb > 0.3
    assert len(u.leftovers) == 1 and "python" in u.leftovers[0]
