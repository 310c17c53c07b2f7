"""Where explainrt writes: atomic file writes (a reader, or an interrupted run, never sees a half-written
file) and the cache folder of exported models and engines."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], Any]) -> Path:
    """Write ``data`` (bytes, or a function writing to a binary file) beside ``path``, then rename it over ``path``."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as handle:
            if isinstance(data, bytes):
                handle.write(data)
            else:
                data(handle)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def cache_dir() -> Path:
    """Where exported models and built engines are cached: $EXPLAINRT_CACHE, else ~/.cache/explainrt."""
    return Path(os.environ.get("EXPLAINRT_CACHE", Path.home() / ".cache" / "explainrt"))


def name_part(text: str) -> str:
    """``text`` (a target's text form) as part of a file name: runs of other than letters, digits, ``_`` and
    ``.`` become ``-`` (``box:1,2,30,40:0`` -> ``box-1-2-30-40-0``), at most 80 characters."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-.")[:80] or "target"
