"""The code base passes its own lint and format rules (pyproject.toml's ruff settings): `make lint` in the suite."""

import subprocess
import sys
from pathlib import Path

from pretrain_support import REPO

RUFF = Path(sys.executable).parent / "ruff"


def test_ruff_check_and_format():
    for args in (["check", "."], ["format", "--check", "."]):
        out = subprocess.run([str(RUFF), *args], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"ruff {' '.join(args)}:\n{out.stdout[-3000:]}{out.stderr[-2000:]}"
