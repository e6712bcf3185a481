"""The commands the docs show, checked without running anything (issue 35): every command line of
README.md and docs/*.md (fenced blocks, and inline code that runs a job) that runs a job goes through
that job's own ``parser()`` and, when the job takes a config, ``calm_core.config.load_config``.
Every file such a command reads must be in a fresh clone (tracked by git), ship with a dependency
(the default corpus, when --corpus is left out), be a URI, be downloaded by an earlier line of the
same doc (``curl -LO``, ``curl -o``/``>``, ``wget``) or be one of the PLACEHOLDERS below. A
``python bench/NAME.py`` command: the script exists and its ``parser()`` takes the arguments, none
of them (defaults included) outside the clone.

The review that asked for this found, of 137 command lines, 1 broken anywhere (two commands on one
line) and 29 broken in a fresh clone (corpora read from ../shared/data, the project machine's copies).
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import importlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

from calm_core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# What a reader supplies. A real file belongs in the clone; a public one gets its download line
# before the command; only what neither can be stays here, each with what it stands for.
PLACEHOLDERS = {
    "my_corpus/": "your own corpus: a file, folder or glob of text / JSONL / Parquet",
    "my_texts/": "README: scripts/demo.sh on your own texts",
    "my_books/": "BENCHMARKS: the Gutenberg books its figures used (built on the project machine, no one download)",
    "my-sweep.yaml": "a sweep spec you write (docs/ABLATIONS.md: the format)",
    "CALM-M/": "OFFICIAL: a released model's folder (or hf://cccczshao/CALM-M itself)",
    "CALM-Autoencoder/": "OFFICIAL: the released AE's folder",
    "DIR": "official.py parity --reference DIR: outputs the official code wrote",
    "/tmp/s8/": "BENCHMARKS: the specs one measurement wrote, described beside it",
}
READS = ("corpus", "tokenizer", "reference", "from_json", "spec")  # options naming a file or corpus to read
OFFICIAL_READS = ("calm", "ae", "baseline")  # official.py import: checkpoint folders (elsewhere --ae is an artifact)
PROGRAMS = {"python", "python3", "pip", "bash", "source", "export", "cd", "curl", "wget", "git", "ray", "serve",
            "kubectl", "hf", "huggingface-cli", "tensorboard", "sha256sum", "mkdir"}
SCRIPTS = dict(re.findall(r'^(calm-[\w-]+) = "calm_jobs\.(\w+):cli"', (ROOT / "pyproject.toml").read_text(), re.M))
SEPARATORS = {"&&", "||", ";", "|"}


@dataclass
class Command:
    where: str  # doc:line
    words: list[str]  # the shell words of the whole line
    downloaded: frozenset[str]  # what earlier lines of the same doc downloaded

    def segments(self) -> list[list[str]]:
        """The simple commands of the line (split at && || ; |)."""
        out: list[list[str]] = [[]]
        for w in self.words:
            if w in SEPARATORS:
                out.append([])
            else:
                out[-1].append(w)
        return [s for s in out if s]


def shell_words(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    return list(lex)


def strip_prefix(words: list[str]) -> list[str]:
    """The command itself: no prompt, timer, VAR=value or `ray job submit ... --` before it."""
    while words and (words[0] in ("$", "/usr/bin/time") or re.fullmatch(r"[A-Za-z_]\w*=.*", words[0])):
        words = words[1:]
    if words[:3] == ["ray", "job", "submit"] and "--" in words:
        words = words[words.index("--") + 1:]
    return words


def runner(words: list[str]) -> tuple[str, str, list[str]] | None:
    """("jobs" | "bench", name, arguments) when the words run a job or a benchmark script."""
    w = strip_prefix(words)
    prog = os.path.basename(w[0]) if w else ""
    if prog in ("python", "python3") and len(w) > 1 and (m := re.fullmatch(r"(jobs|bench)/(\w+)\.py", w[1])):
        return m[1], m[2], w[2:]
    if prog in SCRIPTS:
        return "jobs", SCRIPTS[prog], w[1:]
    if prog == "bash" and w[1:2] == ["scripts/demo.sh"]:
        return "jobs", "run_all", w[2:]  # scripts/demo.sh passes its arguments to jobs/run_all.py
    return None


def is_command(words: list[str]) -> bool:
    w = strip_prefix(words)
    prog = os.path.basename(w[0]) if w else ""
    return prog in PROGRAMS or prog in SCRIPTS


def downloads(words: list[str]) -> set[str]:
    """Files a `curl` / `wget` line writes: -O / -LO (the URL's name), -o / wget -O FILE, > FILE."""
    prog, out = strip_prefix(words)[0], set()
    for i, w in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if w in ("-o", "--output") or (prog == "wget" and w == "-O"):
            out.add(nxt)
        elif w.startswith(">"):
            out.add(w[1:] or nxt)
    remote_name = any(re.fullmatch(r"-\w*O\w*", w) for w in words) if prog == "curl" else not out
    urls = [w for w in words if re.match(r"https?://", w)]
    if urls and remote_name:
        out.add(urls[0].rstrip("/").rsplit("/", 1)[-1])
    return out


def doc_commands() -> tuple[list[Command], list[str]]:
    """Every command line of the docs: fenced lines (`\\` continuations joined) and inline code that
    runs a job; and the fenced lines that name a job but are no command the extractor knows."""
    found, missed = [], []
    for doc in DOCS:
        name, text, downloaded = doc.relative_to(ROOT).as_posix(), doc.read_text(), set()
        lines, fence, outside, pending = text.splitlines(), False, [], None
        for n, line in enumerate(lines, 1):
            if line.lstrip().startswith("```"):
                fence = not fence
                outside.append("")
                continue
            outside.append("" if fence else line)
            if not fence:
                continue
            start, joined = pending or (n, "")
            joined += line.rstrip("\\") + " "
            if line.rstrip().endswith("\\"):
                pending = (start, joined)
                continue
            pending = None
            try:
                words = shell_words(joined)
            except ValueError:  # unbalanced quotes: output or prose, unless it starts like a command
                words = joined.split()
                if is_command(words):
                    missed.append(f"{name}:{start}: unbalanced quotes: {joined.strip()}")
                continue
            if words and is_command(words):
                found.append(Command(f"{name}:{start}", words, frozenset(downloaded)))
                if strip_prefix(words)[0] in ("curl", "wget"):
                    downloaded |= downloads(words)
            elif re.search(r"(^|[\s/])(jobs|bench)/\w+\.py|scripts/demo\.sh|(^|\s)calm-[a-z]", " ".join(words)):
                missed.append(f"{name}:{start}: {joined.strip()}")
        prose = "\n".join(outside)
        for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", prose):
            words = shell_words(" ".join(m[1].split()))
            if len(words) > 1 and runner(words):  # a bare `calm-serve` names the command, it runs nothing
                found.append(Command(f"{name}:{prose.count(chr(10), 0, m.start()) + 1}", words, frozenset(downloaded)))
    return found, missed


COMMANDS, MISSED = doc_commands()
RUNS = [c for c in COMMANDS if any(runner(s) for s in c.segments())]


@pytest.fixture(scope="module")
def tracked() -> list[str] | None:
    """The files a fresh clone has (None outside a git checkout: the working tree answers)."""
    p = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    return p.stdout.split() if p.returncode == 0 else None


def unreadable(value: str, downloaded: frozenset[str], tracked: list[str] | None) -> str | None:
    """Why a fresh clone cannot read ``value``, or None."""
    v = re.sub(r"\$\(realpath ([^)]*)\)", r"\1", value).removeprefix("./")
    if re.match(r"[a-z][a-z0-9+.-]*://", v) or v in downloaded:
        return None
    if any(v in (k, k.rstrip("/")) or (k.endswith("/") and v.startswith(k)) for k in PLACEHOLDERS):
        return None
    if v.startswith(("/", "~")) or ".." in Path(v).parts:
        return f"{value!r} is outside the clone (download it first, or use a placeholder)"
    if tracked is None:
        ok = bool(glob.glob(str(ROOT / v)))
    else:
        ok = any(fnmatch.fnmatchcase(t, v) or t.startswith(v.rstrip("/") + "/") for t in tracked)
    return None if ok else f"{value!r} is not in a fresh clone and no earlier line of the doc downloads it"


def parse(parser, argv: list[str], where: str):
    """The parsed arguments, None for --help; argparse's refusal fails the test with its message."""
    parser.prog, err = where, io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(argv)
    except SystemExit as e:
        if e.code == 0 and ("--help" in argv or "-h" in argv):
            return None
        pytest.fail(f"{where}: {' '.join(argv)}\n{err.getvalue().strip()}")


_BENCH: dict[str, object] = {}


def bench_module(name: str):
    if name not in _BENCH:
        spec = importlib.util.spec_from_file_location(f"_docs_bench_{name}", ROOT / "bench" / f"{name}.py")
        _BENCH[name] = importlib.util.module_from_spec(spec)
        with mock.patch.dict(os.environ):  # some set Ray's environment when imported
            spec.loader.exec_module(_BENCH[name])
    return _BENCH[name]


def reads_of(kind: str, name: str, args) -> list[tuple[str, str]]:
    """(option, value) of everything the command reads; configs and sweep specs are loaded here."""
    opts = dict(vars(args))
    if kind == "bench" and opts.get("from_json"):
        return [("--from-json", opts["from_json"])]  # the script only prints a saved result
    if name == "official" and opts.get("command") == "import":
        opts.update({f"official {k}": opts.pop(k) for k in OFFICIAL_READS})
    if "config" in opts or "overrides" in opts:  # bench_serve's serve.* overrides apply to the demo config
        load_config(opts.get("config") or "demo", list(opts.get("overrides") or []))
    out = [(k, v) for k in (*READS, *(f"official {k}" for k in OFFICIAL_READS)) for v in _values(opts.get(k))]
    if name == "sweep" and opts.get("spec"):
        from pipelines.sweep.spec import load_spec

        spec_is_path = "/" in opts["spec"] or opts["spec"].endswith((".yaml", ".yml"))
        if not spec_is_path or (ROOT / opts["spec"]).is_file():
            spec = load_spec(opts["spec"] if not spec_is_path else str(ROOT / opts["spec"]), quick=opts["quick"])
            load_config(spec.config, spec.overrides)
            if not opts.get("corpus") and spec.corpus:
                out.append(("the spec's corpus", spec.corpus))
        if not spec_is_path:
            out = [(k, v) for k, v in out if k != "spec"]  # a shipped spec's name
    return out


def _values(v) -> list[str]:
    return [] if v is None else [str(x) for x in v] if isinstance(v, list) else [str(v)]


def test_the_docs_hold_their_commands():
    """The extractor finds the commands, and every fenced line that names a job is checked."""
    assert len(COMMANDS) > 100, f"only {len(COMMANDS)} command lines found in {len(DOCS)} docs"
    assert len(RUNS) > 60, f"only {len(RUNS)} command lines run a job or a benchmark"
    print(f"{len(COMMANDS)} command lines in {len(DOCS)} docs, {len(RUNS)} of them run a job or a benchmark")
    assert not MISSED, "lines that name a job but are no command the extractor knows:\n" + "\n".join(MISSED)


@pytest.mark.parametrize("cmd", RUNS, ids=[c.where for c in RUNS])
def test_documented_command_parses_and_reads_what_a_clone_has(cmd: Command, tracked):
    for kind, name, argv in filter(None, map(runner, cmd.segments())):
        path = ROOT / kind / f"{name}.py"
        assert path.is_file(), f"{cmd.where}: {kind}/{name}.py does not exist"
        if "..." in argv:
            continue  # arguments elided in the doc ("the same as above")
        if kind == "bench" and "def parser()" not in path.read_text():
            continue  # a script that parses when imported: test_bench_defaults_stay_in_the_clone reads its source
        module = importlib.import_module(f"jobs.{name}") if kind == "jobs" else bench_module(name)
        args = parse(module.parser(), argv, cmd.where)
        if args is None:
            continue
        if kind == "bench":
            outside = [f"{k}={v}" for k, v in vars(args).items() for x in _values(v) if x.startswith("../")]
            assert not outside, f"{cmd.where}: {' '.join(outside)} points outside the clone"
        for option, value in reads_of(kind, name, args):
            why = unreadable(value, cmd.downloaded, tracked)
            assert why is None, f"{cmd.where}: {option} {why}"


def test_the_default_corpus_ships_with_a_dependency():
    """What a job reads when a documented command leaves out --corpus."""
    from pipelines.data.files import default_corpus, resolve_corpus_files

    _, files, fmt = resolve_corpus_files(default_corpus())
    assert len(files) >= 40 and fmt == "text"


def test_bench_defaults_stay_in_the_clone():
    """No benchmark reads a default path a clone lacks (../shared/data is the project machine's)."""
    for path in sorted((ROOT / "bench").glob("*.py")):
        assert not re.search(r"""default=["']\.\./""", path.read_text()), f"{path.name}: a default outside the clone"
        module = bench_module(path.stem) if "def parser()" in path.read_text() else None
        if module is not None:
            for action in module.parser()._actions:
                assert not str(action.default).startswith("../"), f"{path.name} {action.dest}: {action.default}"
