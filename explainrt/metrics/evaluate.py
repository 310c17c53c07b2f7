"""Score a set of explanation methods with the faithfulness metrics, as a table and curves.

``evaluate(explainer, images, methods, metrics)`` explains the images once per method (maps
scaled to [0, 1], as shown to users) and scores the maps with each metric; ``Evaluation`` holds
the per-image values, the table of means (method x metric) as markdown or JSON, and the mean
deletion / insertion (and ROAD) curves for ``plot_curves``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from explainrt.errors import InvalidInputError, InvalidTargetError, UnknownMetricError
from explainrt.methods import get_method
from explainrt.metrics.curves import CausalCurves, causal_curves
from explainrt.metrics.pointing import POINTING_TOLERANCE, energy_pointing_game, pointing_game
from explainrt.metrics.road import DEFAULT_NOISE, DEFAULT_PERCENTAGES, road_curves
from explainrt.progress import progress as progress_of
from explainrt.targets import Class, as_targets
from explainrt.validation import checked_int

log = logging.getLogger(__name__)

METRICS = {
    "deletion": "deletion AUC (RISE): class probability as the most salient pixels are removed; lower is better",
    "insertion": "insertion AUC (RISE): class probability as salient pixels are added to a blurred image; higher is better",
    "pointing": f"pointing game: share of maps whose maximum lies within {POINTING_TOLERANCE} px of the object box",
    "energy": "energy-based pointing game: share of the map's energy inside the object box",
    "road": "ROAD MoRF and LeRF: mean class probability after noisy linear imputation of a share of the pixels "
            "(default 10..90 %)",
}
BOX_METRICS = ("pointing", "energy")
PROBABILITY_METRICS = ("deletion", "insertion", "road")
"""Metrics that score a class's softmax probability: they need a classifier output and class targets."""
COLUMNS = {"deletion": ("deletion",), "insertion": ("insertion",), "pointing": ("pointing",), "energy": ("energy",),
           "road": ("road-morf", "road-lerf")}
BETTER = {"deletion": "lower", "insertion": "higher", "pointing": "higher", "energy": "higher",
          "road-morf": "lower", "road-lerf": "higher"}


@dataclass
class Evaluation:
    """Per-image scores ``scores[method][column]`` [N], and the causal curves ``curves[method][mode]``."""

    methods: tuple[str, ...]
    columns: tuple[str, ...]
    targets: np.ndarray  # [N] the class every method explained
    scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    curves: dict[str, dict[str, CausalCurves]] = field(default_factory=dict)

    def table(self) -> dict[str, dict[str, float]]:
        """Mean over images, method -> column -> value."""
        return {method: {column: float(np.mean(self.scores[method][column])) for column in self.columns}
                for method in self.methods}

    def markdown(self) -> str:
        """The table of means as markdown, each column saying whether lower or higher is better."""
        header = [f"{column} ({'↓' if BETTER[column] == 'lower' else '↑'})" for column in self.columns]
        lines = ["| method | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
        for method, row in self.table().items():
            lines.append(f"| {method} | " + " | ".join(f"{row[c]:.3f}" for c in self.columns) + " |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        """Means, per-image scores, targets and mean curves, as plain JSON types."""
        return {
            "columns": {column: BETTER[column] + " is better" for column in self.columns},
            "table": self.table(),
            "targets": self.targets.tolist(),
            "per_image": {m: {c: v.tolist() for c, v in cols.items()} for m, cols in self.scores.items()},
            "curves": {m: {mode: {"fractions": c.fractions.tolist(), "mean": c.scores.mean(axis=0).tolist()}
                           for mode, c in modes.items()} for m, modes in self.curves.items()},
        }


def check_metrics(names: Sequence[str]) -> tuple[str, ...]:
    """The metric names, validated (lower-cased, repeats dropped)."""
    chosen = tuple(dict.fromkeys(name.strip().lower() for name in names))
    unknown = [name for name in chosen if name not in METRICS]
    if unknown or not chosen:
        raise UnknownMetricError(f"unknown metric(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                                 f"known: {', '.join(METRICS)}")
    return chosen


def check_methods(names: Sequence[str]) -> tuple[str, ...]:
    """The registered method names (UnknownMethodError for any other), repeats dropped."""
    chosen = tuple(dict.fromkeys(get_method(name.strip()).name for name in names))
    if not chosen:
        raise InvalidInputError("no methods given to evaluate")
    return chosen


def object_targets(logits: np.ndarray, classes: Sequence[Sequence[int]]) -> np.ndarray:
    """Per image, the most likely of its object's classes (what the pointing games should explain)."""
    return np.array([int(max(options, key=lambda c: row[c])) for row, options in zip(logits, classes, strict=True)])


def _check_class_probabilities(explainer: Any, metrics: list[str], targets: Any, count: int) -> None:
    """Refuse ``metrics`` that score a class's probability where there is none to score: an explained output
    other than [N, classes] (a segmentation map, a detector head), or targets that are not classes (a Region's,
    a Similarity's objective is no class probability, and its ``Explanation.targets`` is -1 or its class)."""
    if not metrics:
        return
    shape = tuple(explainer.spec.output_shape)
    if len(shape) > 1:
        raise InvalidInputError(f"metric(s) {', '.join(metrics)} score a class's softmax probability over an output "
                                f"[N, classes]; the explained output is [N, {', '.join(map(str, shape))}] (the "
                                "pointing games take any output)")
    given = as_targets(targets, count)
    others = sorted({repr(target) for row in given[0] for target in row if type(target) is not Class}) if given else []
    if others:
        raise InvalidTargetError(f"metric(s) {', '.join(metrics)} score the explained class's probability; they take "
                                 f"class indices as targets, not {', '.join(others)}")


def evaluate(explainer: Any, images: Any, methods: Sequence[str], metrics: Sequence[str] = ("deletion", "insertion"),
             boxes: np.ndarray | None = None, targets: Any = None, steps: int = 50, batch_size: int = 32,
             road_percentages: Sequence[float] = DEFAULT_PERCENTAGES, road_noise: float = DEFAULT_NOISE,
             seed: int = 0, options: dict[str, dict[str, Any]] | None = None, progress: bool = True) -> Evaluation:
    """Explain ``images`` with each of ``methods`` and score the maps with ``metrics``.

    ``boxes`` [N, 4] (x0, y0, x1, y1 in model-input pixels) are needed by the pointing games.
    ``targets`` as in ``Explainer.explain`` (default: each image's most likely class).
    ``options`` maps a method name to its options. ``progress``: one bar over every method and
    metric, with the explanations' and metrics' own bars below it (``explainrt.progress``).
    """
    methods = check_methods(methods)
    metrics = check_metrics(metrics)
    needs_boxes = [m for m in metrics if m in BOX_METRICS]
    if needs_boxes and boxes is None:
        raise InvalidInputError(f"metric(s) {', '.join(needs_boxes)} need object boxes (use the pasted data set)")
    checked_int("steps", steps)
    unknown = set(options or {}) - set(methods)
    if unknown:
        raise InvalidInputError(f"options given for method(s) {', '.join(sorted(unknown))} that are not evaluated")
    batch, _ = explainer.prepare(images)
    _check_class_probabilities(explainer, [m for m in metrics if m in PROBABILITY_METRICS], targets, batch.shape[0])
    columns = tuple(column for metric in metrics for column in COLUMNS[metric])
    all_scores: dict[str, dict[str, np.ndarray]] = {}
    all_curves: dict[str, dict[str, CausalCurves]] = {}
    model = explainer.session
    with progress_of(len(methods) * (1 + len(metrics)), "evaluate", unit="steps", enabled=progress) as overall:
        for method in methods:
            explanation = explainer.explain(batch, method, targets, batch_size=batch_size, progress=progress,
                                            **(options or {}).get(method, {}))
            overall.update()
            maps, explained = explanation.maps, explanation.targets
            scores: dict[str, np.ndarray] = {}
            curves: dict[str, CausalCurves] = {}
            for metric in metrics:
                log.info("scoring %s with %s", method, metric)
                if metric in ("deletion", "insertion"):
                    curves[metric] = causal_curves(model, batch, maps, explained, metric, steps, batch_size=batch_size,
                                                   progress=progress)
                    scores[metric] = curves[metric].auc
                elif metric == "pointing":
                    scores[metric] = pointing_game(maps, boxes).astype(np.float64)
                elif metric == "energy":
                    scores[metric] = energy_pointing_game(maps, boxes)
                else:
                    for order in ("morf", "lerf"):
                        road = road_curves(model, batch, maps, explained, order, road_percentages, road_noise, seed,
                                           batch_size, progress)
                        scores[f"road-{order}"] = road.mean
                        curves[f"road-{order}"] = CausalCurves(  # from the unchanged image (0 %) on, for the plot
                            f"road-{order}", np.concatenate([[0.0], road.percentages / 100]),
                            np.concatenate([road.original[:, None], road.scores], axis=1), road.mean)
                overall.update()
            all_scores[method], all_curves[method] = scores, curves
    return Evaluation(methods, columns, explained, all_scores, all_curves)
