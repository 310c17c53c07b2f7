"""The deletion, insertion and ROAD curves of an evaluation as one PNG: matplotlib when installed, else PIL."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from explainrt.errors import InvalidInputError
from explainrt.metrics.evaluate import Evaluation

MODES = ("deletion", "insertion", "road-morf", "road-lerf")
XLABELS = {"deletion": "fraction of pixels removed", "insertion": "fraction of pixels inserted",
           "road-morf": "fraction imputed, most relevant first", "road-lerf": "fraction imputed, least relevant first"}
SUMMARY = {"deletion": "AUC", "insertion": "AUC", "road-morf": "mean", "road-lerf": "mean"}
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def curves_png(evaluation: Evaluation) -> bytes:
    """PNG bytes: one panel per mode (deletion, insertion, ROAD MoRF / LeRF), the mean curve of each method
    with its score (AUC, or ROAD's mean over the percentages)."""
    modes = [mode for mode in MODES if any(mode in curves for curves in evaluation.curves.values())]
    if not modes:
        raise InvalidInputError("the evaluation has no deletion, insertion or ROAD curves to plot")
    try:
        import matplotlib
    except ImportError:
        return _pil_png(evaluation, modes)
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.2), squeeze=False)
    for axis, mode in zip(axes[0], modes):
        for index, (method, curves) in enumerate(evaluation.curves.items()):
            curve = curves[mode]
            axis.plot(curve.fractions, curve.scores.mean(axis=0), color=np.array(PALETTE[index % len(PALETTE)]) / 255,
                      label=f"{method} ({SUMMARY[mode]} {curve.auc.mean():.3f})")
        axis.set(title=f"{mode} ({len(evaluation.targets)} images)", xlabel=XLABELS[mode], ylabel="class probability",
                 xlim=(0, 1), ylim=(0, 1))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def _pil_png(evaluation: Evaluation, modes: list[str]) -> bytes:
    """The same panels drawn with PIL (no matplotlib): axes, curves and a legend."""
    panel_w, panel_h, pad = 420, 320, 40
    image = Image.new("RGB", (panel_w * len(modes), panel_h), "white")
    draw = ImageDraw.Draw(image)
    for column, mode in enumerate(modes):
        left, right, top, bottom = column * panel_w + pad, (column + 1) * panel_w - 10, 30, panel_h - pad
        draw.rectangle((left, top, right, bottom), outline="black")
        draw.text((left, 8), f"{mode} ({len(evaluation.targets)} images): probability vs fraction changed", fill="black")
        for index, (method, curves) in enumerate(evaluation.curves.items()):
            curve = curves[mode]
            xs = left + curve.fractions * (right - left)
            ys = bottom - np.clip(curve.scores.mean(axis=0), 0, 1) * (bottom - top)
            colour = PALETTE[index % len(PALETTE)]
            draw.line(list(zip(xs.tolist(), ys.tolist())), fill=colour, width=2)
            draw.text((right - 150, top + 6 + 12 * index), f"{method} {curve.auc.mean():.3f}", fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def plot_curves(evaluation: Evaluation, path: str | Path) -> Path:
    """Write ``curves_png`` to ``path``."""
    path = Path(path)
    path.write_bytes(curves_png(evaluation))
    return path
