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
