"""The Hugging Face Hub, both ways, for jobs/official.py: ``hf://ORG/NAME[@REVISION]`` sources of
``import`` (``fetch_source``), and the model card ``export`` puts beside the weights (``model_card``).

Fetching is ``huggingface_hub.snapshot_download`` into the Hub cache and nothing else, so the
library's own settings hold: ``HF_HOME`` / ``HF_HUB_CACHE`` say where the cache is, ``HF_HUB_OFFLINE=1``
reads only that cache, ``HF_TOKEN`` opens gated and private repos, and a second import of the same
revision downloads nothing. Only the files an import reads are fetched (a repo may hold optimizer
states or other formats). The commit a revision resolved to is the snapshot folder's name; it goes
into every imported artifact's manifest (``source.hub``), so a run names the exact weights even
when the branch has moved since.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from calm_core.errors import ArtifactError
from pipelines.storage import fetch_dir

HF = "hf://"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
CHECKPOINT_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                    "pytorch_model.bin.index.json", *TOKENIZER_FILES)
PAPER = "https://arxiv.org/abs/2510.27688"
OFFICIAL_CODE = "https://github.com/shaochenze/calm"


def fetch_source(spec: str, kind: str) -> tuple[Path, dict | None]:
    """What import reads for ``--kind spec`` (kind "tokenizer": the tokenizer.json file; otherwise the
    checkpoint folder) as a local path, and for an hf:// spec its Hub record {repo, revision, commit}
    (None for a path or another URI, which ``pipelines.storage.fetch_dir`` fetches)."""
    if not spec.startswith(HF):
        return fetch_dir(spec, file_ok=kind == "tokenizer"), None
    if kind == "tokenizer":
        folder, record = fetch_hub(spec, TOKENIZER_FILES, ("tokenizer.json",), "pass --tokenizer the tokenizer.json "
                                   "the models were trained with (a file, a folder or a repo holding one)")
        return folder / "tokenizer.json", record
    return fetch_hub(spec, CHECKPOINT_FILES, ("config.json", WEIGHTS),
                     f"point --{kind} at a repo holding an official checkpoint (config.json and its weights)")


def parse_hub(spec: str) -> tuple[str, str | None]:
    """``hf://ORG/NAME[@REVISION]`` -> (repo id, revision or None: the default branch)."""
    repo, at, revision = spec[len(HF):].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")) or (at and not revision):
        raise ArtifactError(f"'{spec}' is not hf://ORG/NAME or hf://ORG/NAME@REVISION (a branch, tag or commit)")
    return repo, revision or None


def fetch_hub(spec: str, patterns: tuple[str, ...], need: tuple[str | tuple[str, ...], ...],
              hint: str) -> tuple[Path, dict]:
    """The Hub cache's snapshot folder of ``spec`` holding the files that match ``patterns``
    (downloaded unless offline), and its record. Each entry of ``need`` (a name, or a tuple of
    alternatives) must be in it; ``hint`` says what to do otherwise. Every failure is one line."""
    import httpx2  # huggingface_hub's HTTP client: a transfer that breaks mid-file raises its errors
    from huggingface_hub import constants, errors, snapshot_download

    repo, asked = parse_hub(spec)
    revision = asked or constants.DEFAULT_REVISION
    offline = constants.is_offline_mode()
    try:
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=list(patterns)))
    except errors.RevisionNotFoundError:
        raise ArtifactError(f"'{spec}': {repo} has no revision '{revision}'; give an existing branch, tag or commit "
                            "after '@'") from None
    except errors.GatedRepoError:
        raise ArtifactError(f"'{spec}': {repo} is gated; accept its terms on the Hub and set HF_TOKEN to a token "
                            "of that account") from None
    except errors.RepositoryNotFoundError:
        raise ArtifactError(f"'{spec}': no repository {repo} on the Hub, or it is private; check the name, or set "
                            "HF_TOKEN to a token that can read it") from None
    except errors.LocalEntryNotFoundError as e:
        if offline:
            raise ArtifactError(f"'{spec}': revision '{revision}' of {repo} is not in the Hub cache "
                                f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set; run once online or set "
                                "HF_HUB_OFFLINE=0") from None
        raise ArtifactError(f"'{spec}': the Hub cannot be reached and revision '{revision}' of {repo} is not in the "
                            f"cache ({_first_line(e)}); check the network (HF_ENDPOINT, a proxy) and retry") from None
    except (errors.HfHubHTTPError, httpx2.HTTPError) as e:
        raise ArtifactError(f"'{spec}': fetching {repo}@{revision} failed ({type(e).__name__}: {_first_line(e)}); "
                            "check the network and retry") from None
    except errors.HFValidationError as e:
        raise ArtifactError(f"'{spec}' does not name a Hub repository ({_first_line(e)})") from None
    record = {"repo": repo, "revision": revision, "commit": folder.name}
    for names in need:
        names = (names,) if isinstance(names, str) else names
        if not any((folder / n).is_file() for n in names):
            what = names[0] if len(names) == 1 else f"any of {', '.join(names)}"
            cached = (" in the Hub cache (HF_HUB_OFFLINE is set: run once online or set HF_HUB_OFFLINE=0 if the repo "
                      "has it)") if offline else ""
            raise ArtifactError(f"'{spec}' (commit {folder.name[:12]}) has no {what}{cached}; {hint}")
    return folder, record


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:160]


# ----------------------------------------------------------------------------- model cards

ABOUT = {  # kind: (title, tag, library_name, what the model is)
    "ae": ("CALM autoencoder", "autoencoder", "pytorch",
           "The chunk autoencoder of a CALM (Continuous Autoregressive Language Model, "
           f"[arXiv 2510.27688]({PAPER})): it compresses each chunk of K tokens into one continuous vector and "
           "reconstructs the tokens from it. A CALM predicts these vectors, one per step, instead of tokens."),
    "calm": ("CALM energy transformer", "energy-transformer", "pytorch",
             "A CALM (Continuous Autoregressive Language Model, "
             f"[arXiv 2510.27688]({PAPER})) with the energy head: a Llama-style transformer that predicts, at each "
             "step, the continuous vector of the next chunk of K tokens, sampled by a small generative head trained "
             "with the energy score; the frozen autoencoder (stored inside under `ae_model.`) turns vectors back "
             "into tokens. It is evaluated by BrierLM, without likelihoods."),
    "baseline": ("Llama baseline of a CALM study", "llama", "transformers", "The token-level baseline of a CALM study "
                 f"([arXiv 2510.27688]({PAPER})): a Llama transformer (`LlamaForCausalLM`) that predicts one token "
                 "per step, scored by the same BrierLM as CALM."),
}
# (row, config.json key): the sizes a card shows, those the folder's config.json has
SIZES = (("d_model", "hidden_size"), ("layers", "num_hidden_layers"), ("encoder layers", "num_encoder_layers"),
         ("decoder layers", "num_decoder_layers"), ("heads", "num_attention_heads"),
         ("kv heads", "num_key_value_heads"), ("ffn", "intermediate_size"), ("vocab", "vocab_size"),
         ("K", "patch_size"), ("latent dim", "latent_size"), ("head blocks", "num_mlp_layers"),
         ("head noise dim", "noise_size"))


def model_card(kind: str, conf: dict, manifest: dict) -> str:
    """README.md of an exported folder: Hub front matter, what the model is, its sizes (from the
    folder's official ``conf``), its training data and figures (from the artifact's ``manifest``),
    and how to load it."""
    title, tag, library, about = ABOUT[kind]
    front = yaml.safe_dump({"library_name": library, "tags": ["calm", tag, "arxiv:2510.27688"],
                            **({"pipeline_tag": "text-generation"} if kind != "ae" else {})}, sort_keys=False)
    rows = [f"| {row} | `{key}` | {conf[key]} |" for row, key in SIZES if conf.get(key) is not None]
    if "parameters" in manifest:
        rows.append(f"| parameters | | {manifest['parameters']:,} |")
    lines = [f"---\n{front}---", f"# {title} (`{conf['architectures'][0]}`)", "", about, "",
             "## Configuration", "", "| size | config.json | value |", "| --- | --- | --- |", *rows, "",
             "## Training data and measured figures", "", *_provenance(manifest), "", "## How to load", "",
             *_how_to_load(kind), ""]
    return "\n".join(lines)


def _provenance(manifest: dict) -> list[str]:
    source = manifest.get("source") or {}
    if source:
        hub = source.get("hub")
        where = f"`hf://{hub['repo']}` at commit `{hub['commit']}`" if hub else f"`{source.get('dir')}`"
        imported = [f"Imported from the official checkpoint {where}; see its own card and the paper.", ""]
    else:
        imported = []
    corpus = (manifest.get("inputs") or {}).get("corpus") or {}
    docs = corpus.get("documents") or {}
    data = "not recorded"
    if corpus:
        data = (f"`{corpus.get('spec')}` ({corpus.get('files', '?')} {corpus.get('format', '')} files; "
                f"{docs.get('train', 0):,} training / {docs.get('val', 0):,} held-out documents)")
    figures = {k: v for k, v in (manifest.get("metrics") or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and not (k == "step" and v == 0)}
    shown = [f"- `{k}`: {v:.6g}" for k, v in figures.items()] or ["- not recorded"]
    return [*imported, f"Training data: {data}.", "", "Measured at the end of training (this project's run):", *shown]


def _how_to_load(kind: str) -> list[str]:
    official = {"ae": "`--ae_name_or_path` of its CALM training and evaluation scripts",
                "calm": "`--model_name_or_path` of `train.train_calm` (with the autoencoder as `--ae_name_or_path`)",
                "baseline": "`--model_name_or_path` of `train.train_ar`, or `transformers.LlamaForCausalLM`"}[kind]
    extra = " --ae hf://ORG/AE-NAME" if kind == "baseline" else ""
    return [f"With the official code ([shaochenze/calm]({OFFICIAL_CODE})): this folder is in the format its "
            f"training scripts save (`config.json` + `pytorch_model.bin`); give it as {official}.", "",
            "With CALM on Ray (the tokenizer is `tokenizer.json` here):", "", "```bash",
            f"python jobs/official.py import --{kind} hf://ORG/NAME{extra} --tokenizer hf://ORG/NAME --run runs/NAME",
            "```"]
