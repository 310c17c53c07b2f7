"""Served models: an Explainer, its micro-batcher, and the batch functions the batcher runs.

A request becomes a job (images plus what to compute); jobs with the same ``JobKey`` (kind of
work, input form, method, options) are merged into one call of the Explainer on the model's
worker thread and the results are split back per job.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from explainrt.errors import InvalidInputError
from explainrt.explainer import Explainer
from explainrt.overlay import caption
from explainrt.serve.batcher import MicroBatcher
from explainrt.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "default"

# What a batch computes; the key fields after the kind: input form ("raw": uint8 images of any
# size, preprocessed by the model's stored preprocessing; "tensor": float32 [N, C, H, W]), and
# for explanations the method, its options as canonical JSON, and whether maps are normalised.
JobKey = tuple[Any, ...]


@dataclass(frozen=True)
class Job:
    """One request's images, per-image targets, and whether it wants overlays (raw input only, alpha 0.5)
    and captions on them (class label, probability, method)."""

    images: list[np.ndarray] | np.ndarray
    targets: np.ndarray | None = None  # int64 [n] or [n, K] (-k: the k-th most likely), or objects: explainrt.targets
    overlays: bool = False
    captions: bool = False

    @property
    def size(self) -> int:
        return len(self.images)


def predict_key(raw: bool) -> JobKey:
    return ("predict", "raw" if raw else "tensor")


def explain_key(raw: bool, method: str, options: dict[str, Any], normalize: bool, objects: bool = False,
                per_image: int = 0) -> JobKey:
    """``objects``: the jobs' targets are explainrt.targets objects (batched apart: their logits are objectives);
    ``per_image``: K for K targets per image ([n, K] targets), 0 for one."""
    return ("explain", "raw" if raw else "tensor", method, json.dumps(options, sort_keys=True), normalize, objects,
            per_image)


def layers_key(raw: bool) -> JobKey:
    return ("layers", "raw" if raw else "tensor")


class ServedModel:
    """One model the server answers for, loaded once; its batcher starts with the first request."""

    def __init__(self, name: str, explainer: Explainer, max_batch: int, max_wait: float, max_queue: int,
                 metrics: ServerMetrics | None = None) -> None:
        self.name = name
        self.explainer = explainer
        self.batcher = MicroBatcher(name, self.run_batch, max_batch, max_wait, max_queue,
                                    metrics.batch_stats(name) if metrics else None)

    @property
    def num_classes(self) -> int:
        return self.explainer.spec.num_classes

    @property
    def labels(self) -> tuple[str, ...] | None:
        return self.explainer.preprocessing.labels if self.explainer.preprocessing else None

    async def submit(self, key: JobKey, job: Job, gone: Callable[[], Awaitable[Any]] | None = None) -> dict[str, Any]:
        """The job's result; ``gone`` returns when its client disconnects (the work is then dropped)."""
        return await self.batcher.submit(key, job, job.size, gone)

    def run_batch(self, key: JobKey, jobs: Sequence[Job], cancel: threading.Event | None = None) -> list[dict[str, Any]]:
        """Run merged jobs in one Explainer call (on the worker thread); one result dict per job.
        Setting ``cancel`` stops an explanation between its runtime calls (ExplanationCancelled)."""
        kind = key[0]
        if key[1] == "raw":
            images: Any = [image for job in jobs for image in job.images]
        else:
            images = np.concatenate([job.images for job in jobs])
        counts = [job.size for job in jobs]
        if kind == "predict":
            return [{"logits": logits} for logits in _split(self.explainer.predict(images), counts)]
        targets = np.concatenate([_targets(job) for job in jobs])
        if kind == "layers":
            return self._layers(images, targets, counts)
        method, options, normalize = key[2], json.loads(key[3]), key[4]
        given = targets.tolist() if targets.dtype == object else targets
        explanation = self.explainer.explain(images, method=method, targets=given, normalize=normalize,
                                             batch_size=self.batcher.max_batch, progress=False, cancel=cancel,
                                             **options)
        timings = {**explanation.timings, "batch_images": len(targets)}
        wanted = any(job.overlays for job in jobs) and explanation.images is not None
        overlays = explanation.overlays() if wanted else None
        extras = {key: _split(values, counts) for key, values in explanation.extras.items()}
        notes = _split(np.array(explanation.notes, dtype=object), counts)
        texts = _split(np.array(explanation.captions(), dtype=object).reshape(explanation.targets.shape), counts)
        return [{"maps": maps, "logits": logits, "targets": resolved,
                 "overlays": _captioned(blended, lines) if job.overlays and job.captions else
                 blended if job.overlays else None, "notes": list(note),
                 "extras": {key: parts[index] for key, parts in extras.items()}, "timings": timings}
                for index, (job, maps, logits, resolved, blended, note, lines) in enumerate(zip(
                    jobs, _split(explanation.maps, counts), _split(explanation.logits, counts),
                    _split(explanation.targets, counts), _split(overlays, counts), notes, texts, strict=True))]

    def _layers(self, images: Any, targets: np.ndarray, counts: list[int]) -> list[dict[str, Any]]:
        """The explainable model's own outputs: logits, resolved targets, activations and gradients per layer."""
        batch, _ = self.explainer.prepare(images)
        run = self.explainer.session.run(batch, targets if targets.ndim == 2 else targets[:, None])
        per_job = [{"logits": logits, "resolved_targets": resolved} for logits, resolved in
                   zip(_split(run.logits, counts), _split(run.targets, counts), strict=True)]
        for layer, (activations, gradients) in enumerate(zip(run.activations, run.gradients, strict=True)):
            for result, acts, grads in zip(per_job, _split(activations, counts), _split(gradients, counts), strict=True):
                result[f"activations.{layer}"] = acts
                result[f"gradients.{layer}"] = grads
        return per_job


def preprocessed_shape(explainer: Explainer) -> str:
    """The shape preprocessed float tensors take, in the model's own layout: ``[N, 3, 224, 224]``, or
    ``[N, 224, 224, 3] (channels-last)`` for a channels-last model (dynamic axes by their letter)."""
    form = explainer.input_form
    return f"{form.shape()}{' (channels-last)' if form.layout == 'nhwc' else ''}"


def _targets(job: Job) -> np.ndarray:
    return job.targets if job.targets is not None else np.full(job.size, -1, dtype=np.int64)


def _split(array: np.ndarray | None, counts: list[int]) -> list[Any]:
    if array is None:
        return [None] * len(counts)
    return np.split(array, np.cumsum(counts)[:-1])


def load_models(models: Sequence[str] | None, providers: Sequence[str] | None = None,
                input_layout: str | None = None) -> dict[str, Explainer]:
    """Explainers by served name: each ONNX path under its file stem, or the shipped default model as "default".
    ``input_layout`` ("nchw", "nhwc"): the image input's layout of models whose graph does not tell it."""
    if not models:
        return {DEFAULT_MODEL_NAME: Explainer(providers=providers, input_layout=input_layout)}
    loaded: dict[str, Explainer] = {}
    for source in models:
        name = Path(source).stem
        if name in loaded:
            raise InvalidInputError(f"two --model files are named {name!r}: served model names (file stems) must differ")
        log.info("loading model %s from %s", name, source)
        loaded[name] = Explainer(source, providers=providers, input_layout=input_layout)
    return loaded


def _captioned(overlays: np.ndarray | None, texts: np.ndarray) -> np.ndarray | None:
    """Overlays [n, (K,) H, W, 3] with their caption lines [n, (K)] written on them (None stays None: the images
    were preprocessed)."""
    if overlays is None:
        return None
    flat = overlays.reshape(-1, *overlays.shape[-3:])
    return np.stack([caption(image, text) for image, text in zip(flat, texts.ravel(), strict=True)]).reshape(
        overlays.shape)
