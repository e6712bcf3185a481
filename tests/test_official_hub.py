"""hf:// sources of jobs/official.py import, read offline from a Hugging Face Hub cache laid out here,
and the model card that export writes for the Hub.

The cache is the layout huggingface_hub 2.x reads offline (``huggingface_hub._snapshot_download``):
``models--ORG--NAME/refs/<branch or tag>`` holds a commit hash (no newline: the file is read as it is),
``snapshots/<commit>/<file>`` are relative links into ``blobs/``. There is no ``trees/<commit>.json``
listing, so an offline snapshot is taken as complete and the import checks its files itself.

huggingface_hub reads ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` into ``huggingface_hub.constants`` when it is
first imported, so setting the environment alone is not enough once anything (tokenizers, an earlier
test) has imported it: ``hub_cache`` sets both the environment (for a fresh import) and those constants
(for the imported module), and checks that offline mode is on, so no test here reaches the network.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from calm_core.errors import ArtifactError
from test_official import FIX, official_style_tokenizer

JOBS = FIX.parents[2] / "jobs"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "89abcdef0123456789abcdef0123456789abcdef"


def hub_repo(cache: Path, repo: str, files: dict[str, Path], commit: str = COMMIT, refs: tuple[str, ...] = ("main",)):
    """One repo in the cache as huggingface_hub writes it: each file a blob named by its hash, linked
    from the commit's snapshot folder, and each ref naming the commit."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    (folder / "snapshots" / commit).mkdir(parents=True)
    for name, src in files.items():
        data = src.read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (folder / "snapshots" / commit / name).symlink_to(Path("..", "..", "blobs", blob.name))
    (folder / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (folder / "refs" / ref).write_text(commit)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    for name, value in (("HF_HOME", tmp_path / "hf"), ("HF_HUB_CACHE", cache), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert constants.is_offline_mode()
    return cache


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    return official_style_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture
def repos(hub_cache, tok) -> Path:
    """org/calm-fixture (the CALM with its AE copy, and the tokenizer), org/ae-fixture (the AE, also
    under the tag v1), org/baseline-fixture, org/no-config (weights without config.json)."""
    calm = {f.name: f for f in (FIX / "calm").iterdir()}
    hub_repo(hub_cache, "org/calm-fixture", {**calm, "tokenizer.json": tok})
    hub_repo(hub_cache, "org/ae-fixture", {f.name: f for f in (FIX / "ae").iterdir()}, OTHER, refs=("main", "v1"))
    hub_repo(hub_cache, "org/baseline-fixture", {f.name: f for f in (FIX / "baseline").iterdir()})
    hub_repo(hub_cache, "org/no-config", {"pytorch_model.bin": FIX / "ae" / "pytorch_model.bin", "tokenizer.json": tok})
    return hub_cache


def job_main(*argv: str) -> None:
    """jobs/official.py's main in this process (errors raised, not printed)."""
    if str(JOBS) not in sys.path:
        sys.path.insert(0, str(JOBS))
    import official  # jobs/official.py

    official.main(list(argv))


def manifest(run: Path, kind: str) -> dict:
    return json.loads((run / kind / "manifest.json").read_text())


def test_a_hub_import_equals_the_folder_import_and_records_the_commit(repos, tok, tmp_path):
    job_main("import", "--calm", "hf://org/calm-fixture", "--ae", "hf://org/ae-fixture@v1",
             "--tokenizer", "hf://org/calm-fixture", "--run", str(tmp_path / "hub"))
    job_main("import", "--calm", str(FIX / "calm"), "--ae", str(FIX / "ae"), "--tokenizer", str(tok),
             "--run", str(tmp_path / "local"))
    for kind in ("tokenizer", "ae", "calm"):
        hub, local = manifest(tmp_path / "hub", kind), manifest(tmp_path / "local", kind)
        assert hub["files"] == local["files"], kind  # model.safetensors, config.yaml, tokenizer.json: the same bytes
    assert manifest(tmp_path / "hub", "calm")["source"]["hub"] == {"repo": "org/calm-fixture", "revision": "main",
                                                                    "commit": COMMIT}
    assert manifest(tmp_path / "hub", "ae")["source"]["hub"] == {"repo": "org/ae-fixture", "revision": "v1",
                                                                  "commit": OTHER}
    assert manifest(tmp_path / "hub", "tokenizer")["inputs"]["hub"]["commit"] == COMMIT
    assert "hub" not in manifest(tmp_path / "local", "calm")["source"]


def test_a_commit_pins_the_snapshot_without_a_ref(repos, tmp_path):
    job_main("import", "--calm", f"hf://org/calm-fixture@{COMMIT}", "--tokenizer", "hf://org/calm-fixture",
             "--run", str(tmp_path / "r"))
    assert manifest(tmp_path / "r", "calm")["source"]["hub"]["revision"] == COMMIT


@pytest.mark.parametrize("spec,kind,named", [
    ("hf://org/calm-fixture@v2", "calm", "revision 'v2'"),  # a tag the cache does not hold
    (f"hf://org/calm-fixture@{OTHER}", "calm", f"revision '{OTHER}'"),  # a commit the cache does not hold
    ("hf://org/absent", "ae", "revision 'main' of org/absent"),
    ("hf://org/no-config", "ae", "has no config.json"),
    ("hf://org/ae-fixture", "tokenizer", "has no tokenizer.json"),
    ("hf://org", "calm", "is not hf://ORG/NAME"),
])
def test_what_the_cache_lacks_is_one_line_naming_it(repos, tok, tmp_path, spec, kind, named):
    args = {"--calm": "hf://org/calm-fixture", "--tokenizer": "hf://org/calm-fixture", f"--{kind}": spec}
    with pytest.raises(ArtifactError) as e:
        job_main("import", *[x for pair in args.items() for x in pair], "--run", str(tmp_path / "r"))
    message = str(e.value)
    assert named in message and spec.split("@")[0] in message and "\n" not in message, message
    if "revision" in named:
        assert "HF_HUB_OFFLINE=0" in message, message  # what to do
    assert not (tmp_path / "r").exists()


def test_a_hub_that_cannot_be_reached_is_one_line_and_a_cached_revision_still_imports(repos, monkeypatch, tmp_path):
    """Online, with the Hub's address a closed local port: the connection fails at once."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ArtifactError, match=r"the Hub cannot be reached and revision 'v2' of org/calm-fixture") as e:
        job_main("import", "--calm", "hf://org/calm-fixture@v2", "--tokenizer", "hf://org/calm-fixture",
                 "--run", str(tmp_path / "r"))
    assert "\n" not in str(e.value)
    job_main("import", "--calm", "hf://org/calm-fixture", "--tokenizer", "hf://org/calm-fixture",
             "--run", str(tmp_path / "r"))  # the cache answers for what it holds
    assert manifest(tmp_path / "r", "calm")["source"]["hub"]["commit"] == COMMIT


def test_export_writes_a_model_card_with_the_sizes(repos, tmp_path):
    job_main("import", "--calm", "hf://org/calm-fixture", "--baseline", "hf://org/baseline-fixture",
             "--tokenizer", "hf://org/calm-fixture", "--run", str(tmp_path / "r"))
    job_main("export", "--run", str(tmp_path / "r"), "--out", str(tmp_path / "out"))
    for kind, tag, library in (("ae", "autoencoder", "pytorch"), ("calm", "energy-transformer", "pytorch"),
                               ("baseline", "llama", "transformers")):
        card = (tmp_path / "out" / kind / "README.md").read_text()
        front = re.match(r"---\n(.*?)\n---\n", card, re.S)
        assert front, card[:200]
        meta = yaml.safe_load(front.group(1))
        assert meta["library_name"] == library and {"calm", tag} <= set(meta["tags"]), meta
        rows = dict(re.findall(r"^\| ([^|]+?) \| [^|]*\| ([^|]+?) \|$", card, re.M))
        official = json.loads((FIX / kind / "config.json").read_text())  # the sizes the official code wrote
        sizes = {"d_model": "hidden_size", "ffn": "intermediate_size", "vocab": "vocab_size"}
        sizes.update({"K": "patch_size", "latent dim": "latent_size"} if kind != "baseline" else {})
        sizes.update({"encoder layers": "num_encoder_layers"} if kind == "ae" else
                     {"layers": "num_hidden_layers", "heads": "num_attention_heads"})
        assert {row: rows.get(row) for row in sizes} == {row: str(official[key]) for row, key in sizes.items()}
        assert rows["parameters"] == f"{manifest(tmp_path / 'r', kind)['parameters']:,}"
        repo = "baseline-fixture" if kind == "baseline" else "calm-fixture"  # the AE: the copy inside the CALM
        assert f"hf://org/{repo}` at commit `{COMMIT}`" in card and "2510.27688" in card
        assert "Training data: not recorded." in card and "- not recorded" in card


def test_a_trained_runs_card_has_its_corpus_and_figures():
    from pipelines.hub import model_card

    conf = json.loads((FIX / "ae" / "config.json").read_text())
    card = model_card("ae", conf, {"parameters": 167776, "inputs": {"corpus": {
        "spec": "books/", "files": 3, "format": "text", "documents": {"train": 90, "val": 10}}},
        "metrics": {"step": 2000, "val_token_acc": 0.99871, "stopped_early": False}})
    assert "Training data: `books/` (3 text files; 90 training / 10 held-out documents)." in card
    assert "- `step`: 2000\n- `val_token_acc`: 0.99871\n" in card and "stopped_early" not in card
    assert "Imported" not in card and "not recorded" not in card
