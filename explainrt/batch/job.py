"""Explain a whole data set on Ray: ``explain_dataset(INPUT, OUT, method=...)``.

The input (a folder of images, or a Parquet file or folder with an image-bytes column) is read
with Ray Data; ``map_batches`` runs a fixed pool of actors, each holding one ``Explainer`` built
once from the explainable model, which travels through Ray's object store (workers need no
access to the model file). An actor decodes its images with explainrt's own loader, explains
them in one ``Explainer.explain`` call per batch, and writes per image the map (``.npy``) and
the overlay (``.png``), each atomically, mirroring the input's sub-folders under OUT. The
driver gathers one summary row per image and writes ``summary.parquet`` and ``summary.csv``
only once every batch is done, each atomically: a failed job leaves no summary. An image that
cannot be decoded is not fatal; its row says why in the ``error`` column. On a multi-node cluster,
INPUT and OUT must be paths every node sees (a shared file system).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from explainrt.errors import (
    BackendUnavailableError,
    BatchJobError,
    ImageReadError,
    InvalidInputError,
    InvalidModelError,
)
from explainrt.export.spec import ExplainableSpec, ModelSource
from explainrt.files import name_part
from explainrt.methods import get_method
from explainrt.models import load
from explainrt.preprocessing import Preprocessing
from explainrt.progress import note
from explainrt.progress import progress as progress_of
from explainrt.targets import Target, text_form
from explainrt.validation import check_class_range, checked_int

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("bmp", "gif", "jpeg", "jpg", "png", "tif", "tiff", "webp")
IMAGE_COLUMNS = ("image", "image_bytes", "bytes", "content")
"""Parquet columns tried, in order, for the encoded image bytes (else the only binary column)."""
NAME_COLUMNS = ("name", "path", "filename", "image_id", "id")
"""Parquet columns tried, in order, for the image names (else a hash of the image bytes)."""
LABEL_COLUMN = "label"
SUMMARY_PARQUET = "summary.parquet"
SUMMARY_CSV = "summary.csv"
SUMMARY_COLUMNS = (
    "image", "label", "predicted_class", "predicted_label", "probability", "explained_class", "explained_label",
    "explained_probability", "target", "score", "method", "map", "overlay", "error", "worker", "decode_seconds",
    "explain_seconds", "write_seconds", "batch_images",
)
"""One row per image (and target, with several); the ``*_seconds`` are the image's share of its batch's time.
``target``: the target's text form where targets were given; ``score``: a target object's objective (the
predictions and probabilities then stay empty: the explained output need not be class scores)."""

_IMAGES, _NAMES, _LABELS = "explainrt_image", "explainrt_name", "explainrt_label"
_EXCEPTION_LINE = re.compile(r"^(?P<type>(?:\w+\.)*\w*(?:Error|Exception|Cancelled)): (?P<message>.*)$", re.MULTILINE)


@dataclass(frozen=True)
class DatasetSource:
    """What the job reads: image files under ``root``, or the rows of Parquet files."""

    kind: str  # "images" or "parquet"
    root: Path
    paths: tuple[str, ...]
    count: int
    image_column: str = "bytes"
    name_column: str | None = None  # None: images are named by their path under root, or a hash of their bytes
    label_column: str | None = None


@dataclass(frozen=True)
class BatchJobResult:
    """The summary table (one row per image, sorted by image) and where it was written."""

    summary: Any  # pandas.DataFrame with SUMMARY_COLUMNS
    parquet: Path
    csv: Path
    seconds: float

    @property
    def failed(self) -> int:
        return int(self.summary["error"].notna().sum())


def explain_dataset(
    source: str | os.PathLike,
    out: str | os.PathLike,
    model: ModelSource | None = None,
    method: str = "gradcam",
    *,
    preprocessing: Preprocessing | None = None,
    target: int | Target | Sequence[int | Target] | None = None,
    options: dict[str, Any] | None = None,
    normalize: bool = True,
    batch_size: int = 8,
    workers: int = 2,
    ray_address: str | None = None,
    image_column: str | None = None,
    name_column: str | None = None,
    label_column: str | None = None,
    progress: bool | None = None,
    captions: bool = True,
) -> BatchJobResult:
    """Explain every image of ``source`` with ``workers`` Ray actors; write maps, overlays and the summary to ``out``.

    ``model``: an ONNX path, bytes or ModelProto (made explainable if it is not), or None for the
    default model. ``preprocessing`` replaces the model's stored one (needed when it stores none).
    ``target``: the class to explain for every image (None: the top class; -k: the k-th most
    likely), an ``explainrt.targets`` object, or a list of K of these: each image is explained for all K
    in one call, one map and overlay per target (``<image>.<method>.<target>.npy``, the target's
    ``text_form`` as a file-name part) and one summary row each. ``batch_size``: images per actor call
    and per runtime call. ``ray_address``: an
    existing cluster to join; without it (and without a Ray instance already started in this
    process) a local one with ``workers + 1`` CPUs (one per actor, one for reading) is started and
    shut down at the end. ``captions``: write each overlay's caption line (class label, probability,
    method) along its bottom edge; False writes the plain overlay.
    """
    chosen = get_method(method)
    options = dict(options or {})
    chosen.check_options(options)
    for name, value in (("batch_size", batch_size), ("workers", workers)):
        checked_int(name, value)
    dataset = find_source(source, image_column, name_column, label_column)
    blob, preprocessing, spec = _explainable_model(model, preprocessing)
    _check_targets(target, spec, preprocessing)
    try:
        import ray
    except ImportError as error:
        raise BackendUnavailableError(f"explainrt batch needs the ray extra (pip install 'explainrt[ray]'): {error}") from error
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    started = not ray.is_initialized()
    if started:
        note(f"starting {'Ray at ' + ray_address if ray_address else f'a local Ray instance ({workers + 1} CPUs)'}")
        with _ray_notices_at_verbose():
            ray.init(address=ray_address, num_cpus=None if ray_address else workers + 1, include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=False)
    start = time.perf_counter()
    try:
        _check_cluster_cpus(ray, workers)
        rows = _run(ray, dataset, blob, preprocessing, chosen.name, target, options, normalize, batch_size, workers,
                    out, progress, captions)
    except ray.exceptions.RayError as error:
        raise BatchJobError(f"the Ray batch job failed (no summary written): {_root_cause(error)}") from error
    finally:
        if started:
            ray.shutdown()
    seconds = time.perf_counter() - start
    return _write_summary(out, rows, seconds)


def _check_targets(target: Any, spec: ExplainableSpec, preprocessing: Preprocessing) -> None:
    """Refuse, before Ray starts, a class out of range, a list of no targets, or a target the model's output
    cannot take (``Target.check`` against the stored output shape)."""
    if target is None:
        return
    given = list(target) if isinstance(target, (list, tuple)) else [target]
    if not given:
        raise InvalidInputError("targets must hold at least one target (None explains the top class)")
    for item in given:
        if isinstance(item, Target):
            item.check(spec.output_shape or (spec.num_classes,), tuple(preprocessing.input_size))
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            check_class_range(item, spec.num_classes)
        else:
            raise InvalidInputError(f"a target is a class index or an explainrt.targets object, got {item!r}")


def target_names(targets: Sequence[int | Target]) -> list[str]:
    """File-name parts of K targets (``text_form``); repeated ones numbered by position."""
    names = [name_part(text_form(target)) for target in targets]
    return [f"{name}-{k}" if names.count(name) > 1 else name for k, name in enumerate(names)]


RAY_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"
"""Ray's logger that says, on every start, that token authentication is enabled (and how to opt out)."""
RAY_BACKEND_LOG_LEVEL = "RAY_BACKEND_LOG_LEVEL"
"""The level of the lines Ray's C++ core prints on stderr, read once as ``ray.init`` starts it."""


@contextlib.contextmanager
def _ray_notices_at_verbose() -> Iterator[None]:
    """Ray's notices outside explainrt's logging, kept for ``-v`` and silenced otherwise: the token
    authentication warning of each start, and the driver's core worker lines (such as "Actor ... has
    constructor arguments in the object store and max_restarts > 0", about Ray Data's own actor
    arguments). The C++ level applies to the processes ``ray.init`` starts (their log files keep fatal
    errors only; a level the user set in the environment is kept), and setting it makes Ray print one line
    of its own ("Set ray log level from environment variable ..."), so stderr is held while ``ray.init`` runs
    and shown only if it fails."""
    if log.isEnabledFor(logging.INFO):
        yield
        return
    logging.getLogger(RAY_TOKEN_LOGGER).setLevel(logging.ERROR)
    given = os.environ.get(RAY_BACKEND_LOG_LEVEL)
    if given is None:
        os.environ[RAY_BACKEND_LOG_LEVEL] = "fatal"
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            try:
                yield
            except BaseException:
                os.dup2(saved, 2)
                held.seek(0)
                sys.stderr.write(held.read().decode(errors="replace"))
                raise
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        if given is None:
            del os.environ[RAY_BACKEND_LOG_LEVEL]


def _check_cluster_cpus(ray: Any, workers: int) -> None:
    """Each actor holds a CPU and reading needs one more; with fewer the pipeline would wait forever."""
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus < workers + 1:
        raise InvalidInputError(f"the Ray cluster has {cpus:g} CPUs but {workers} workers need {workers + 1} "
                                "(one per actor and one for reading): lower --workers or add CPUs")


def _root_cause(error: BaseException) -> str:
    """The worker's own exception, which Ray passes back only as traceback text inside its wrappers."""
    text = str(error)
    for match in _EXCEPTION_LINE.finditer(text):
        if not match.group("type").startswith("ray."):
            return f"{match.group('type').rsplit('.', 1)[-1]}: {match.group('message')}"
    lines = text.strip().splitlines()
    return lines[-1] if lines else type(error).__name__


def find_source(source: str | os.PathLike, image_column: str | None = None, name_column: str | None = None,
                label_column: str | None = None) -> DatasetSource:
    """Image files under a folder, or a Parquet file (or a folder of them) with an image-bytes column."""
    root = Path(source).resolve()  # Ray reports absolute paths; names are taken relative to this
    if not root.exists():
        raise InvalidInputError(f"input {str(root)!r} does not exist")
    parquet = [root] if root.is_file() else sorted(root.rglob("*.parquet"))
    if root.is_file() and root.suffix.lower() != ".parquet":
        raise InvalidInputError(f"input {str(root)!r} is a file but not Parquet: give a folder of images or a .parquet")
    images = [] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()
                                               and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if images and parquet:
        raise InvalidInputError(f"folder {str(root)!r} holds both images and Parquet files: give one kind")
    if images:
        if image_column or name_column or label_column:
            raise InvalidInputError("--image-column, --name-column and --label-column apply to Parquet input only")
        _check_unique_outputs([p.relative_to(root).as_posix() for p in images], str(root))
        return DatasetSource("images", root, tuple(str(p) for p in images), len(images))
    if not parquet:
        raise InvalidInputError(f"folder {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}) "
                                "and no Parquet files")
    return _parquet_source(root, parquet, image_column, name_column, label_column)


def _parquet_source(root: Path, files: list[Path], image_column: str | None, name_column: str | None,
                    label_column: str | None) -> DatasetSource:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(files[0])
        count = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    except (OSError, pa.ArrowException) as error:
        raise InvalidInputError(f"cannot read Parquet input {str(root)!r}: {error}") from error
    names = schema.names
    binary = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
    for column, what in ((image_column, "--image-column"), (name_column, "--name-column"),
                         (label_column, "--label-column")):
        if column is not None and column not in names:
            raise InvalidInputError(f"{what} {column!r} is not a column of {str(files[0])!r} (columns: {names})")
    if image_column is None:
        image_column = next((c for c in IMAGE_COLUMNS if c in binary), binary[0] if len(binary) == 1 else None)
        if image_column is None:
            raise InvalidInputError(f"cannot tell which column of {str(files[0])!r} holds the image bytes "
                                    f"(binary columns: {binary}): pass --image-column")
    elif image_column not in binary:
        raise InvalidInputError(f"--image-column {image_column!r} is not a binary column (binary columns: {binary})")
    name_column = name_column or next((c for c in NAME_COLUMNS if c in names and c != image_column), None)
    label_column = label_column or (LABEL_COLUMN if LABEL_COLUMN in names else None)
    if name_column is not None:
        listed = [str(v) for f in files for v in pq.read_table(f, columns=[name_column]).column(0).to_pylist()]
        _check_unique_outputs(listed, str(root))
    if count == 0:
        raise InvalidInputError(f"Parquet input {str(root)!r} has no rows")
    return DatasetSource("parquet", root, tuple(map(str, files)), count, image_column, name_column, label_column)


def _output_stem(name: str) -> str:
    """Where an image's outputs go under OUT: its relative path without suffix, never outside OUT."""
    path = PurePosixPath(name.replace("\\", "/"))
    parts = [part for part in path.with_suffix("").parts if part not in ("", ".", "..", "/")]
    return "/".join(parts) or "image"


def _check_unique_outputs(names: Sequence[str], where: str) -> None:
    counts = Counter(_output_stem(name) for name in names)
    repeated = sorted(stem for stem, count in counts.items() if count > 1)
    if repeated:
        raise InvalidInputError(f"several images in {where!r} would write the same outputs "
                                f"{', '.join(map(repr, repeated[:5]))} (names differing only in extension?)")


def _explainable_model(model: ModelSource | None,
                       preprocessing: Preprocessing | None) -> tuple[bytes, Preprocessing, ExplainableSpec]:
    """The serialized explainable model, the preprocessing the actors use and the model's spec."""
    loaded = load(model, preprocessing=preprocessing)
    if loaded.preprocessing is None:
        raise InvalidModelError("the model stores no preprocessing (input size, mean, std): pass preprocessing= "
                                "(CLI: --input-size, --mean, --std), or export it with `explainrt export`")
    proto = loaded.explainable
    return proto.SerializeToString(), loaded.preprocessing, ExplainableSpec.from_model(proto)


def _run(ray: Any, dataset: DatasetSource, blob: bytes, preprocessing: Preprocessing, method: str,
         target: Any, options: dict[str, Any], normalize: bool, batch_size: int, workers: int, out: Path,
         progress: bool | None, captions: bool) -> list[Any]:
    """Build the Ray Data pipeline, run it and gather the summary batches (pandas) on the driver."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # one bar, ours, counting images
    if not log.isEnabledFor(logging.INFO):  # Ray Data's own lines ("Starting execution...", "Progress bars
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # disabled") only at -v: our bar says where it is
    if dataset.kind == "images":
        data = ray.data.read_binary_files(list(dataset.paths), include_paths=True)
        data = data.rename_columns({"bytes": _IMAGES, "path": _NAMES})
    else:
        columns = {dataset.image_column: _IMAGES}
        if dataset.name_column:
            columns[dataset.name_column] = _NAMES
        if dataset.label_column:
            columns[dataset.label_column] = _LABELS
        data = ray.data.read_parquet(list(dataset.paths), columns=list(columns))
        data = data.rename_columns(columns)
    explained = data.map_batches(
        ExplainWorker,
        fn_constructor_kwargs={
            "model": ray.put(blob), "preprocessing": preprocessing.to_json(), "method": method, "target": target,
            "options": options, "normalize": normalize, "batch_size": batch_size, "captions": captions, "out": str(out),
            "root": str(dataset.root) if dataset.kind == "images" else None,
        },
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)
    rows = []
    with warnings.catch_warnings(), progress_of(dataset.count, f"{method} on Ray", unit="images",
                                                enabled=progress is not False) as bar:
        if not log.isEnabledFor(logging.INFO):  # Ray Data's advice on its own pool ("The minimum number of
            warnings.filterwarnings("ignore", module=r"ray\.data\.")  # concurrent actors ...") only at -v
        for batch in explained.iter_batches(batch_size=None, batch_format="pandas"):
            rows.append(batch)
            bar.update(len(batch))
    return rows


def _write_summary(out: Path, rows: list[Any], seconds: float) -> BatchJobResult:
    import pandas as pd

    from explainrt.files import write_atomic

    summary = pd.concat(rows, ignore_index=True)[list(SUMMARY_COLUMNS)].sort_values("image", ignore_index=True)
    texts = [column for column in SUMMARY_COLUMNS if _column_dtype(column) is object]
    # one missing-value marker, as read back from Parquet (pandas 2's astype("str") would write "None")
    summary[texts] = summary[texts].astype(pd.StringDtype())
    parquet, csv = out / SUMMARY_PARQUET, out / SUMMARY_CSV
    write_atomic(parquet, lambda handle: summary.to_parquet(handle, index=False))
    write_atomic(csv, summary.to_csv(index=False).encode())
    return BatchJobResult(summary, parquet, csv, seconds)


class ExplainWorker:
    """One Ray actor: an Explainer loaded once, explaining one batch of encoded images per call."""

    def __init__(self, model: Any, preprocessing: str, method: str, target: Any, options: dict[str, Any],
                 normalize: bool, batch_size: int, captions: bool, out: str, root: str | None) -> None:
        from explainrt.explainer import Explainer

        if not isinstance(model, bytes):  # a reference into Ray's object store
            import ray

            model = ray.get(model)
        self.explainer = Explainer(model, preprocessing=Preprocessing.from_json(preprocessing))
        self.method, self.target, self.options = method, target, options
        self.many = isinstance(target, (list, tuple))  # K targets per image: one row and file set per target
        given = list(target) if self.many else [] if target is None else [target]
        self.texts = [text_form(item) for item in given] or [None]
        self.names = target_names(given) if self.many else [""]
        self.normalize, self.batch_size, self.captions = normalize, batch_size, captions
        self.out = Path(out)
        self.root = Path(root) if root is not None else None
        self.worker = _worker_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from explainrt.preprocessing import load_image

        encoded = [bytes(item) for item in batch[_IMAGES]]
        names, labels = self._names_and_labels(batch, encoded)
        tick = time.perf_counter()
        pixels: list[np.ndarray | None] = []
        errors: list[str | None] = []
        for data in encoded:
            try:
                pixels.append(load_image(data))
                errors.append(None)
            except ImageReadError as error:
                pixels.append(None)
                errors.append(str(error))
        decode = time.perf_counter() - tick
        good = [index for index, image in enumerate(pixels) if image is not None]
        rows = [[self._row(name, label, error, text) for text in self.texts]
                for name, label, error in zip(names, labels, errors)]
        explain_seconds = write_seconds = 0.0
        if good:
            targets = [list(self.target)] * len(good) if self.many else self.target
            explanation = self.explainer.explain([pixels[i] for i in good], method=self.method, targets=targets,
                                                 batch_size=self.batch_size, normalize=self.normalize,
                                                 progress=False, **self.options)
            explain_seconds = explanation.timings["total"]
            tick = time.perf_counter()
            self._write(explanation, good, names, rows)
            write_seconds = time.perf_counter() - tick
        count = len(rows)
        flat = [row for per_image in rows for row in per_image]
        for row in flat:
            row.update(decode_seconds=decode / len(flat), explain_seconds=explain_seconds / len(flat),
                       write_seconds=write_seconds / len(flat), batch_images=count)
        return {column: np.array([row[column] for row in flat], dtype=_column_dtype(column))
                for column in SUMMARY_COLUMNS}

    def _names_and_labels(self, batch: dict[str, np.ndarray], encoded: list[bytes]) -> tuple[list[str], list[Any]]:
        if self.root is not None:  # image files: the path under the root; the label is the sub-folder
            relative = [Path(str(path)).relative_to(self.root).as_posix() for path in batch[_NAMES]]
            return relative, [str(PurePosixPath(name).parent) if "/" in name else None for name in relative]
        names = ([str(name) for name in batch[_NAMES]] if _NAMES in batch
                 else [hashlib.sha1(data).hexdigest()[:16] for data in encoded])
        labels = [None if label is None else str(label) for label in batch[_LABELS]] if _LABELS in batch \
            else [None] * len(names)
        return names, labels

    def _row(self, name: str, label: Any, error: str | None, target: str | None) -> dict[str, Any]:
        return {"image": name, "label": label, "predicted_class": -1, "predicted_label": None, "probability": np.nan,
                "explained_class": -1, "explained_label": None, "explained_probability": np.nan, "target": target,
                "score": np.nan, "method": self.method, "map": None, "overlay": None, "error": error,
                "worker": self.worker}

    def _write(self, explanation: Any, good: list[int], names: list[str], rows: list[list[dict[str, Any]]]) -> None:
        from explainrt.files import write_atomic
        from explainrt.numerics import softmax
        from explainrt.overlay import save_png

        overlays = explanation.overlays(captions=self.captions)
        probabilities = None if explanation.objective else softmax(explanation.class_scores)
        labels = explanation.labels
        for position, index in enumerate(good):
            for k, (name, row) in enumerate(zip(self.names, rows[index], strict=True)):
                at = (position, k) if self.many else (position,)
                stem = f"{_output_stem(names[index])}.{self.method}{'.' + name if name else ''}"
                npy, png = self.out / f"{stem}.npy", self.out / f"{stem}.png"
                npy.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(npy, lambda handle, saliency=explanation.maps[at]: np.save(handle, saliency))
                save_png(png, overlays[at])
                explained = int(explanation.targets[at])
                named = labels[explained] if labels and 0 <= explained < len(labels) else None
                row.update(explained_class=explained, explained_label=named, map=npy.relative_to(self.out).as_posix(),
                           overlay=png.relative_to(self.out).as_posix())
                if explanation.objective:  # target objects: the logits are each target's objective
                    row.update(score=float(explanation.logits[at[0], k]))
                    continue
                predicted = int(np.argmax(explanation.class_scores[position]))
                row.update(predicted_class=predicted, predicted_label=labels[predicted] if labels else None,
                           probability=float(probabilities[position, predicted]),  # type: ignore[index]
                           explained_probability=float(probabilities[position, explained]))  # type: ignore[index]


def _worker_id() -> str:
    """``node:pid`` on a Ray actor (the pid alone outside Ray: asking Ray for its runtime context there
    would start a local Ray instance that nothing shuts down)."""
    try:
        import ray
    except ImportError:
        return str(os.getpid())
    if not ray.is_initialized():
        return str(os.getpid())
    return f"{ray.get_runtime_context().get_node_id()[:8]}:{os.getpid()}"


def _column_dtype(column: str) -> Any:
    if column in ("predicted_class", "explained_class", "batch_images"):
        return np.int64
    if column.endswith(("probability", "_seconds")) or column == "score":
        return np.float64
    return object
