"""Draw the README figure: one image explained by the default model with each targeted method.

    python docs/make_figure.py [--image chelsea] [--out docs/figure.png]

A row of labelled panels: the image, Grad-CAM, Counterfactual-CAM, Contrast-CAM against the
runner-up class, the deliberative insecurity of the top pair, DFF concepts, Integrated
Gradients and an FGVis deletion mask. Everything comes from ``explainrt.Explainer()`` (the
shipped EfficientNet-Lite0), so the figure is reproducible on any machine.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from explainrt import Explainer
from explainrt.models.default import example_images
from explainrt.overlay import overlay, save_png

PANEL = 224
CAPTION = 34


def _short(label: str | None) -> str:
    return (label or "?").split(",")[0]


def panels(explainer: Explainer, image: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(caption, RGB panel) for the image and each method."""
    labels = explainer.preprocessing.labels
    grad = explainer.explain(image, method="gradcam")
    crop = grad.images[0]
    top = np.argsort(-grad.logits[0])
    first, second = _short(labels[top[0]]), _short(labels[top[1]])
    shown = [(f"input: {first}", crop), (f"Grad-CAM: why {first}", grad.overlays()[0])]
    runs = [
        ("counterfactual-cam", {}, f"Counterfactual-CAM: regions whose absence would raise {first}"),
        ("contrast-cam", {}, f"Contrast-CAM: {first} rather than {second}"),
        ("galore-deliberative", {}, f"Galore deliberative: where {first} vs {second} is uncertain"),
        ("dff", {"n_concepts": 4}, "DFF: 4 concepts"),
        ("integrated-gradients", {"steps": 32}, "Integrated Gradients"),
        ("fgvis", {"game": "delete"}, "FGVis deletion mask"),
    ]
    for method, options, caption in runs:
        explanation = explainer.explain(image, method=method, **options)
        if method in ("integrated-gradients", "fgvis"):  # pixel-level maps: show them sharp, on a dimmed image
            shown.append((caption, overlay(crop, explanation.maps[0], alpha=0.7)))
        else:
            shown.append((caption, explanation.overlays()[0]))
    return shown


def compose(shown: list[tuple[str, np.ndarray]], columns: int = 4) -> np.ndarray:
    """Panels in a grid, each with its caption above it."""
    rows = -(-len(shown) // columns)
    sheet = Image.new("RGB", (columns * PANEL, rows * (PANEL + CAPTION)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (caption, rgb) in enumerate(shown):
        x, y = (index % columns) * PANEL, (index // columns) * (PANEL + CAPTION)
        draw.multiline_text((x + 4, y + 3), "\n".join(textwrap.wrap(caption, 36)[:2]), fill="black", spacing=2)
        sheet.paste(Image.fromarray(rgb).resize((PANEL, PANEL)), (x, y + CAPTION))
    return np.asarray(sheet)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="chelsea", choices=sorted(example_images()))
    parser.add_argument("--out", default=str(Path(__file__).with_name("figure.png")))
    args = parser.parse_args()
    save_png(args.out, compose(panels(Explainer(), example_images()[args.image])))


if __name__ == "__main__":
    main()
