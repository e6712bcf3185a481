"""calm_core is plain PyTorch: importing all of it must not import ray or deepspeed."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import calm_core

ROOT = Path(__file__).resolve().parents[1]


def test_calm_core_imports_no_ray_or_deepspeed():
    modules = [f"calm_core.{m.name}" for m in pkgutil.iter_modules(calm_core.__path__)]
    assert len(modules) >= 5
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'deepspeed'))\n"
        + "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"calm_core pulled in: {out.stdout.strip()}"


def test_no_source_mentions_ray_or_deepspeed_imports():
    for p in (ROOT / "calm_core").glob("*.py"):
        text = p.read_text()
        for bad in ("import ray", "from ray", "import deepspeed", "from deepspeed"):
            assert bad not in text, f"{p.name} contains '{bad}'"


def _imported_by(modules: list[str]) -> set[str]:
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(','.join(sorted(m for m in sys.modules if m.startswith(('pipelines', 'deepspeed')))))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(filter(None, out.stdout.strip().split(",")))


def _package_modules(package: str) -> list[str]:
    folder = ROOT / package.replace(".", "/")
    return [f"{package}.{p.stem}" for p in sorted(folder.glob("*.py")) if p.stem != "__init__"]


def test_serving_evaluation_and_data_never_import_training_code():
    """pipelines/serve and pipelines/eval load artifacts with calm_core alone; pipelines/data feeds
    training but does not depend on it."""
    for package in ("pipelines.serve", "pipelines.eval", "pipelines.data"):
        modules = _package_modules(package)
        assert modules, package
        loaded = _imported_by(modules)
        bad = sorted(m for m in loaded if m.startswith(("pipelines.train", "deepspeed")))
        assert not bad, f"{package} pulled in {bad}"


def test_training_modules_import_and_the_layers_exist():
    loaded = _imported_by(_package_modules("pipelines.train"))
    assert {"pipelines.train.loop", "pipelines.train.stage1", "pipelines.train.stage2", "pipelines.claim"} <= loaded


def test_pipelines_files_and_functions_stay_small():
    """No file in pipelines/ over 300 lines, no function over 60 (the layout's promise to readers)."""
    import ast

    for p in sorted((ROOT / "pipelines").rglob("*.py")):
        text = p.read_text()
        assert text.count("\n") <= 300, f"{p.relative_to(ROOT)} has {text.count(chr(10))} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                assert n <= 60, f"{p.relative_to(ROOT)}:{node.lineno} {node.name} has {n} lines"
