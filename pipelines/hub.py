"""The Hugging Face Hub for jobs/official.py: ``hf://ORG/NAME[@REVISION]`` sources of ``import``
(``fetch_source``).

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

from calm_core.errors import ArtifactError
from pipelines.storage import fetch_dir

HF = "hf://"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
CHECKPOINT_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                    "pytorch_model.bin.index.json", *TOKENIZER_FILES)


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

