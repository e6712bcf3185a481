"""Lets ``python jobs/<job>.py`` import the project without installing it (Ray job working dirs)."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

