"""``explainrt evaluate``: score explanation methods with faithfulness metrics over a folder or the pasted data.

Prints a table (method x metric, mean over images) and writes ``evaluation.md``,
``evaluation.json`` (means, per-image scores, curves) and ``curves.png`` (deletion / insertion
curves) to ``--out``, each atomically and only once every score is computed. ``--sanity`` adds
Adebayo's cascading model-parameter randomisation (``sanity.md``, and in ``evaluation.json``);
``--road-percentages`` sets the pixel percentages ROAD removes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from explainrt.cli.common import EXAMPLES, load_explainer, positive_int, sources
from explainrt.errors import InvalidInputError
from explainrt.files import write_atomic

PASTED = "pasted"
IMAGENET_CLASSES = 1000


def register(commands: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    from explainrt.metrics.evaluate import METRICS
    from explainrt.metrics.road import DEFAULT_PERCENTAGES

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
    parser.add_argument("--count", type=positive_int, default=12, metavar="N", help="pasted images (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pasted data set and of ROAD's noise")
    parser.add_argument("--methods", default="gradcam", metavar="M1,M2",
                        help="comma-separated methods (see `explainrt methods`; default gradcam)")
    parser.add_argument("--metrics", metavar="NAME1,NAME2",
                        help=f"comma-separated metrics from {', '.join(METRICS)} (default: deletion,insertion, "
                             "plus pointing,energy on the pasted data)")
    parser.add_argument("--steps", type=positive_int, default=50, metavar="N",
                        help="deletion / insertion steps per image (default 50)")
    parser.add_argument("--road-percentages", type=_road_percentages, metavar="P1,P2",
                        help="comma-separated percentages of the pixels ROAD removes, each in (0, 100) "
                             f"(default {','.join(map(str, DEFAULT_PERCENTAGES))}; needs road in --metrics)")
    parser.add_argument("--sanity", action="store_true",
                        help="also run Adebayo's cascading model-parameter randomisation (ONNX Runtime backend): "
                             "per randomised layer cut, the Spearman rank correlation of each method's maps with "
                             "the original model's (near 0 is good); written to sanity.md")
    parser.add_argument("--sanity-steps", type=positive_int, default=5, metavar="N",
                        help="layer cuts of the sanity check, spread evenly from the top layer to all (default 5)")
    parser.add_argument("--out", default="explainrt-eval", metavar="DIR", help="output folder (default: explainrt-eval)")
    parser.set_defaults(run=run)


def _road_percentages(text: str) -> tuple[float, ...]:
    """--road-percentages: comma-separated numbers, each strictly between 0 and 100."""
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated percentages such as 10,20,30, got {text!r}")
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    outside = [part for part, value in zip(parts, values) if not 0 < value < 100]
    if outside:
        raise argparse.ArgumentTypeError(f"percentages must lie strictly between 0 and 100, got {', '.join(outside)}")
    return values


def run(args: argparse.Namespace) -> int:
    from explainrt.metrics.evaluate import BOX_METRICS, check_methods, check_metrics, evaluate, object_targets
    from explainrt.metrics.pasted import input_box, pasted_dataset
    from explainrt.metrics.plot import curves_png
    from explainrt.metrics.road import DEFAULT_PERCENTAGES
    from explainrt.version import __version__

    methods = check_methods(args.methods.split(","))  # fail fast, before loading the model
    if bool(args.images) == bool(args.data):
        raise InvalidInputError("give either IMAGE files/folders or --data pasted (one of the two)")
    default_metrics = ["deletion", "insertion", *(BOX_METRICS if args.data else ())]
    metrics = check_metrics(args.metrics.split(",") if args.metrics is not None else default_metrics)
    if args.data is None and any(m in BOX_METRICS for m in metrics):
        raise InvalidInputError(f"metrics {', '.join(BOX_METRICS)} need object boxes: use --data pasted")
    if args.road_percentages is not None and "road" not in metrics:
        raise InvalidInputError("--road-percentages sets the road metric's removals: add road to --metrics")
    if args.sanity and args.backend != "onnxruntime":
        raise InvalidInputError(f"--sanity re-draws the ONNX model's weights and runs them on ONNX Runtime: it "
                                f"needs --backend onnxruntime, not {args.backend!r}")
    samples = pasted_dataset(args.count, seed=args.seed) if args.data else None
    files = None if samples else sources(args.images)
    explainer = load_explainer(args)
    start = time.perf_counter()
    header: dict[str, Any] = {"explainrt": __version__, "model": args.model or "default (EfficientNet-Lite0, ImageNet)",
                              "methods": list(methods), "metrics": list(metrics), "steps": args.steps}
    road_percentages = args.road_percentages or DEFAULT_PERCENTAGES
    if "road" in metrics:
        header["road_percentages"] = list(road_percentages)
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
        images, boxes, targets = [s.image for s in files], None, None
        header["data"] = {"images": [s.name for s in files]}
    evaluation = evaluate(explainer, images, methods, metrics, boxes=boxes, targets=targets, steps=args.steps,
                          batch_size=args.batch_size, seed=args.seed, progress=True,
                          road_percentages=road_percentages)
    sanity_table = None
    if args.sanity:
        sanity_table, header["sanity"] = _sanity(explainer, images, methods, evaluation.targets, args)
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
    if sanity_table is not None:
        write_atomic(out / "sanity.md", sanity_table.encode())
        written.append("sanity.md")
    print(table, end="")
    if sanity_table is not None:
        print("\n" + sanity_table, end="")
    print(f"wrote {', '.join(written)} to {out}")
    return 0


def _sanity(explainer: Any, images: list[Any], methods: tuple[str, ...], targets: np.ndarray,
            args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Cascading randomisation of each method: a markdown table (layer cut x method, mean Spearman
    rank correlation over images) and its JSON record (per-image Spearman and SSIM)."""
    from explainrt.export.spec import original_model
    from explainrt.metrics.sanity import cascading_randomization, weighted_nodes

    model = explainer.session.model
    batch, _ = explainer.prepare(images)
    results = {method: cascading_randomization(model, batch, method, targets, steps=args.sanity_steps,
                                               seed=args.seed, batch_size=args.batch_size, providers=args.providers)
               for method in methods}
    names = weighted_nodes(original_model(model))
    layers = next(iter(results.values())).layers
    cuts = [names.index(layer) + 1 for layer in layers]
    lines = ["Sanity check (cascading randomisation, top layers re-drawn): mean Spearman rank correlation of the "
             "maps with the original model's; near 0 is good", "",
             "| layers randomised | down to | " + " | ".join(methods) + " |", "|---" * (len(methods) + 2) + "|"]
    for step, (cut, layer) in enumerate(zip(cuts, layers), start=1):
        lines.append(f"| {cut} | {layer} | "
                     + " | ".join(f"{results[m].spearman[step].mean():.3f}" for m in methods) + " |")
    record = {"seed": args.seed, "cuts": [{"layers_randomized": c, "down_to": name} for c, name in zip(cuts, layers)],
              "spearman": {m: r.spearman[1:].tolist() for m, r in results.items()},
              "ssim": {m: r.ssim[1:].tolist() for m, r in results.items()}}
    return "\n".join(lines) + "\n", record
