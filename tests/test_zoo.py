"""Zoo coverage (opt-in, slow): every torchvision classifier and a set of timm families.

Run with ``pytest -m zoo tests/test_zoo.py`` (the default run deselects the ``zoo`` marker). Each
model is explained with the automatic layer and with pytorch-grad-cam's documented layer, and
both maps are compared with pytorch-grad-cam's (``bench/zoo.py`` does the work and documents
it). The report, ``bench/results/zoo.md``, is rewritten after every model, so a run stopped
early still leaves its rows; models not started within ``EXPLAINRT_ZOO_BUDGET_S`` seconds
(default 4200) of the first are recorded as "not run (time)" and skipped.
``EXPLAINRT_ZOO_MODELS=a,b`` runs only those (keys or bare names) and replaces their rows in the
report, keeping the others; ``EXPLAINRT_ZOO_OUT`` writes the report elsewhere.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import zoo  # noqa: E402

pytestmark = pytest.mark.zoo

BUDGET_S = float(os.environ.get("EXPLAINRT_ZOO_BUDGET_S", "4200"))
SELECTED = [name for name in os.environ.get("EXPLAINRT_ZOO_MODELS", "").split(",") if name]
ENTRIES = [e for e in zoo.zoo() if not SELECTED or e.key in SELECTED or e.key.split("/")[1] in SELECTED]
OUT = Path(os.environ["EXPLAINRT_ZOO_OUT"]) if "EXPLAINRT_ZOO_OUT" in os.environ else zoo.RESULTS
RERUN_LINE = "Rows rerun into this report after its main run, with the fixes described above: "
_ROWS: dict[str, zoo.Row] = {e.key: zoo.Row(e.key, e.params_m, e.size, documented=e.layer_name) for e in ENTRIES}
_RERUN: list[str] = []  # keys rerun into an existing report, named under its table
if SELECTED and OUT.exists():  # rerunning some models: the other rows of the report stay
    _previous = OUT.read_text()
    _ROWS = {**{r.key: r for r in zoo.read_report(_previous)}, **_ROWS}
    _RERUN = [k for line in _previous.splitlines() if line.startswith(RERUN_LINE)
              for k in line[len(RERUN_LINE):].strip(" .").split(", ") if k]
    _RERUN += [e.key for e in ENTRIES if e.key not in _RERUN]
_STARTED: list[float] = []


def _header() -> list[str]:
    from bench.common import cpu_model, load_average, usable_cpus, versions

    found = ", ".join(f"{k} {v}" for k, v in versions("torch", "torchvision", "timm", "onnxruntime", "grad-cam").items())
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"- Written {now} by `pytest -m zoo tests/test_zoo.py` (driving `bench/zoo.py`; its docstring says what "
        "is compared). Load average at the last row: " + load_average() + ".",
        f"- Machine: {cpu_model()}, `nproc` = {usable_cpus()}, Python {platform.python_version()}; {found}.",
        f"- Random weights (`bench.zoo.randomized`, seed 0), two random images, classes {zoo.TARGETS}; pass: every "
        f"max |explainrt - pytorch-grad-cam| of the [0, 1] maps <= {zoo.TOLERANCE:g}. Models over "
        f"{zoo.MAX_PARAMS_M:.0f}M parameters are skipped; models not started within {BUDGET_S:.0f} s of the first "
        "are not run (time).",
        "- `max diff auto` is empty where the automatic layer's tensor is produced by no module that is called "
        "once (pytorch-grad-cam hooks modules, and reads a module's first call).",
    ]


def _write() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    footer = [RERUN_LINE + ", ".join(_RERUN) + "."] if _RERUN else []
    OUT.write_text(zoo.report(list(_ROWS.values()), _header(), footer))


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.key for e in ENTRIES])
def test_zoo_model(entry: zoo.Entry) -> None:
    if not _STARTED:
        _STARTED.append(time.perf_counter())
    if time.perf_counter() - _STARTED[0] > BUDGET_S:
        _write()
        pytest.skip(f"{zoo.NOT_RUN}: the {BUDGET_S:.0f} s budget is spent")
    row = zoo.run_entry(entry)
    _ROWS[entry.key] = row
    _write()
    print(f"{entry.key}: {row.status} auto {row.auto} diff {row.auto_diff} documented {row.documented} "
          f"diff {row.documented_diff} ({row.seconds or 0:.0f} s) {'; '.join(row.notes)}")
    if row.status == zoo.SKIPPED:
        pytest.skip("; ".join(row.notes))
    if row.status == zoo.EXPLAINED:
        pytest.xfail(zoo.KNOWN[entry.key])
    assert row.status in (zoo.PASS, zoo.REFUSED), "; ".join(row.notes)
