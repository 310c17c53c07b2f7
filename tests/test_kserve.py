"""The kserve extra: ``kserve_cases.py`` run in a Python process of its own (see its docstring)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(importlib.util.find_spec("kserve") is None,
                    reason="the kserve extra is not installed (pip install 'explainrt[kserve]')")
def test_kserve_adapter() -> None:
    cases = Path(__file__).with_name("kserve_cases.py")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)],
                            cwd=cases.parent, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "5 passed" in result.stdout
