"""The layers of docs/PIPELINE.md "Layout": calm_core is plain PyTorch (importing all of it imports
neither ray nor deepspeed), and each layer of pipelines imports only the layers its rule allows."""

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


# the layout's rule (docs/PIPELINE.md "Layout"): what each layer may not import, directly or through
# the project's modules it imports, at the top of a file or inside a function
FORBIDDEN = {
    "calm_core": ("pipelines", "jobs", "bench", "tests", "ray", "deepspeed", "fastapi", "starlette"),  # plain PyTorch
    "pipelines.storage": ("pipelines.data", "pipelines.train", "pipelines.eval", "pipelines.serve", "pipelines.sweep"),
    "pipelines.claim": ("pipelines.data", "pipelines.train", "pipelines.eval", "pipelines.serve", "pipelines.sweep"),
    "pipelines.progress": ("pipelines.data", "pipelines.train", "pipelines.eval", "pipelines.serve", "pipelines.sweep"),
    "pipelines.ray_env": ("pipelines.data", "pipelines.train", "pipelines.eval", "pipelines.serve", "pipelines.sweep"),
    "pipelines.data": ("pipelines.train", "pipelines.eval", "pipelines.serve", "pipelines.sweep"),
    "pipelines.train": ("pipelines.eval", "pipelines.serve", "pipelines.sweep"),
    "pipelines.eval": ("pipelines.train", "pipelines.serve", "pipelines.sweep", "deepspeed"),
    "pipelines.serve": ("pipelines.train", "pipelines.eval", "pipelines.sweep", "deepspeed"),
    "pipelines": ("jobs", "bench", "tests"),  # the product imports no job script or harness
}


def _import_graph() -> dict[str, set[str]]:
    """{module: the modules its source imports (project modules by full name, others by top-level
    name)} for every module of calm_core and pipelines, read with ast (no import runs)."""
    import ast

    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for pkg in ("calm_core", "pipelines") for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                assert not node.level, f"{where}: a relative import (the graph reads absolute ones)"
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for name in names:
                if name in files:
                    deps.add(name)
                elif name.split(".")[0] not in ("calm_core", "pipelines"):
                    deps.add(name.split(".")[0])
        graph[mod] = deps
    return graph


def _chain(graph: dict[str, set[str]], start: str, banned: tuple[str, ...]) -> list[str] | None:
    """The import chain from ``start`` to a module in (or under) ``banned``, or None."""
    seen, todo = {start: [start]}, [start]
    while todo:
        mod = todo.pop(0)
        for dep in sorted(graph.get(mod, ())):
            if dep in seen:
                continue
            seen[dep] = seen[mod] + [dep]
            if any(dep == b or dep.startswith(b + ".") for b in banned):
                return seen[dep]
            todo.append(dep)
    return None


def test_each_layer_imports_only_the_layers_the_layout_allows():
    """The layout's rule on the import graph (function-level imports too, which importing a module
    does not run): calm_core is plain PyTorch; the shared modules import no stage; data imports no
    training, evaluation or serving; training no evaluation or serving; evaluation and serving no
    training nor each other; nothing in the product imports a job script or a harness."""
    graph = _import_graph()
    assert {"calm_core.engine", "pipelines.train.stage2", "pipelines.serve.app", "pipelines.eval.job"} <= set(graph)
    broken = []
    for mod in sorted(graph):
        for layer, banned in FORBIDDEN.items():
            if mod == layer or mod.startswith(layer + "."):
                chain = _chain(graph, mod, banned)
                if chain:
                    broken.append(" -> ".join(chain))
    assert not broken, "\n".join(broken)


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
