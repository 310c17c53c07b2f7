"""``explainrt evaluate``: score explanation methods with faithfulness metrics over a folder or the pasted data.

Prints a table (method x metric, mean over images) and writes ``evaluation.md``,
``evaluation.json`` (means, per-image scores, curves) and ``curves.png`` (deletion / insertion
curves) to ``--out``, each atomically and only once every score is computed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from explainrt.engine.cli import EXAMPLES, _load_explainer, _positive_int, _sources
from explainrt.engine.files import write_atomic
from explainrt.errors import ImageReadError, InvalidInputError

PASTED = "pasted"
IMAGENET_CLASSES = 1000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def register(commands: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    from explainrt.metrics.evaluate import METRICS

    parser = commands.add_parser(
        "evaluate", parents=[parents["verbose"], parents["model"], parents["runtime"]],
        help="score explanation methods with faithfulness metrics (deletion, insertion, pointing game, ROAD)",
        description="Explain IMAGE files (or every image in a folder), or the pasted data set (--data pasted: "
                    "scikit-image objects with known boxes, for the pointing games), with each method, and score "
                    "the maps. Prints a method x metric table (mean over images) and writes evaluation.md, "
                    "evaluation.json and curves.png to --out. Metrics: "
                    + "; ".join(f"{name}: {text}" for name, text in METRICS.items()))
    parser.add_argument("images", nargs="*", metavar="IMAGE",
                        help=f"image files or folders; the word {EXAMPLES!r} stands for the example images")
    parser.add_argument("--data", choices=[PASTED], help="evaluate on the shipped pasted data set instead of IMAGEs")
    parser.add_argument("--count", type=_positive_int, default=12, metavar="N", help="pasted images (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pasted data set and of ROAD's noise")
    parser.add_argument("--methods", default="gradcam", metavar="M1,M2",
                        help="comma-separated methods (see `explainrt methods`; default gradcam)")
    parser.add_argument("--metrics", metavar="NAME1,NAME2",
                        help=f"comma-separated metrics from {', '.join(METRICS)} (default: deletion,insertion, "
                             "plus pointing,energy on the pasted data)")
    parser.add_argument("--steps", type=_positive_int, default=50, metavar="N",
                        help="deletion / insertion steps per image (default 50)")
    parser.add_argument("--out", default="explainrt-eval", metavar="DIR", help="output folder (default: explainrt-eval)")
    parser.set_defaults(run=run)


def _image_paths(items: list[str]) -> list[str]:
    """IMAGE arguments with every folder replaced by the image files in it (sorted)."""
    paths: list[str] = []
    for item in items:
        folder = Path(item)
        if not folder.is_dir():
            paths.append(item)
            continue
        found = sorted(str(p) for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise ImageReadError(f"folder {item!r} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
        paths += found
    return paths


def run(args: argparse.Namespace) -> int:
    from explainrt import __version__
    from explainrt.metrics.evaluate import BOX_METRICS, check_methods, check_metrics, evaluate, object_targets
    from explainrt.metrics.pasted import input_box, pasted_dataset
    from explainrt.metrics.plot import curves_png

    methods = check_methods(args.methods.split(","))  # fail fast, before loading the model
    if bool(args.images) == bool(args.data):
        raise InvalidInputError("give either IMAGE files/folders or --data pasted (one of the two)")
    default_metrics = ["deletion", "insertion", *(BOX_METRICS if args.data else ())]
    metrics = check_metrics(args.metrics.split(",") if args.metrics is not None else default_metrics)
    if args.data is None and any(m in BOX_METRICS for m in metrics):
        raise InvalidInputError(f"metrics {', '.join(BOX_METRICS)} need object boxes: use --data pasted")
    samples = pasted_dataset(args.count, seed=args.seed) if args.data else None
    sources = None if samples else _sources(_image_paths(args.images))
    explainer = _load_explainer(args)
    start = time.perf_counter()
    header: dict[str, Any] = {"explainrt": __version__, "model": args.model or "default (EfficientNet-Lite0, ImageNet)",
                              "methods": list(methods), "metrics": list(metrics), "steps": args.steps}
    if samples and explainer.spec.num_classes != IMAGENET_CLASSES:
        raise InvalidInputError(f"the pasted data set's objects are labelled with ImageNet classes: it needs a "
                                f"{IMAGENET_CLASSES}-class model, not one with {explainer.spec.num_classes} classes")
    if samples:
        images: list[Any] = [s.image for s in samples]
        boxes = np.array([input_box(s.box, s.image.shape[:2], explainer.preprocessing) for s in samples])
        logits = explainer.predict(images)
        predicted = np.array([int(row.argmax()) in s.classes for row, s in zip(logits, samples)])
        targets = object_targets(logits, [s.classes for s in samples])
        header["data"] = {"name": PASTED, "seed": args.seed, "predicted_object_rate": float(predicted.mean()),
                          "images": [{"name": s.name, "background": s.background, "box_in_input": b.tolist(),
                                      "classes": list(s.classes), "top1_is_object": bool(p)}
                                     for s, b, p in zip(samples, boxes, predicted)]}
        print(f"pasted data: the model's top class is the pasted object's for {predicted.sum()}/{len(samples)} images")
    else:
        images, boxes, targets = [s.image for s in sources], None, None
        header["data"] = {"images": [s.name for s in sources]}
    evaluation = evaluate(explainer, images, methods, metrics, boxes=boxes, targets=targets, steps=args.steps,
                          batch_size=args.batch_size, seed=args.seed, progress=len(images) >= 4)
    header["total_seconds"] = time.perf_counter() - start
    table = evaluation.markdown()
    plot = curves_png(evaluation) if evaluation.curves and any(evaluation.curves.values()) else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "evaluation.md", table.encode())
    write_atomic(out / "evaluation.json", (json.dumps({**header, **evaluation.to_json()}, indent=2) + "\n").encode())
    written = ["evaluation.md", "evaluation.json"]
    if plot is not None:
        write_atomic(out / "curves.png", plot)
        written.append("curves.png")
    print(table, end="")
    print(f"wrote {', '.join(written)} to {out}")
    return 0
