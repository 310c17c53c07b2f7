"""``explainrt explain`` and ``explainrt demo``: overlay PNGs, raw maps and a JSON summary per image.

``explain`` computes every map before it writes anything, and writes each file atomically, so a
bad image or model leaves no partial output behind.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from explainrt.cli.common import (
    EXAMPLES,
    TOP_K,
    Source,
    cli_targets,
    load_explainer,
    method_option,
    method_options,
    parent_parsers,
    sources,
    target_name,
)
from explainrt.errors import OutputWriteError
from explainrt.numerics import softmax
from explainrt.progress import progress

log = logging.getLogger(__name__)


def register(commands: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    """Add ``explain`` and ``demo`` to the CLI's subcommands."""
    verbose, model, runtime, caption = parents["verbose"], parents["model"], parents["runtime"], parents["caption"]
    explain = commands.add_parser(
        "explain", parents=[verbose, model, runtime, caption], help="explain images: overlay PNGs, raw maps and a JSON summary",
        description="Explain each IMAGE and write <stem>.<method>.png (overlay), <stem>.<method>.npy (map) and "
                    "explanations.json (top-5 predictions, explained class, timings) to --out; with several --target, "
                    "<stem>.<method>.<target>.png and .npy per target (e.g. cup.gradcam.class-281.png). Nothing is "
                    "written unless every image is explained.")
    explain.add_argument("images", nargs="+", metavar="IMAGE",
                         help=f"image files or folders of images; the word {EXAMPLES!r} stands for the example images "
                              "chelsea, coffee and astronaut")
    explain.add_argument("--method", default="gradcam", help="explanation method (see `explainrt methods`)")
    explain.add_argument("-O", "--option", action="append", metavar="KEY=VALUE", dest="options", type=method_option,
                         help="a method option, e.g. -O window=16,16 -O n_masks=2000, parsed by the option's declared "
                              "type (JSON also works); `explainrt methods NAME` lists a method's options")
    explain.add_argument("--raw", action="store_true",
                         help="write raw attribution maps (.npy) instead of maps scaled to [0, 1]")
    explain.add_argument("--target", metavar="CLASS", action="append",
                         help="class to explain: an index, -k for the k-th most likely class, or a label name "
                              "(default: the most likely class); or a target: class:281, softmax:281, "
                              "difference:281:282, region:MASK.png:12, box:x1,y1,x2,y2:0[:iou], "
                              "similarity:VECTOR.npy, weights:WEIGHTS.npy (with --output to name the model output); "
                              "repeat for K targets per image (one map and overlay each, in one run)")
    explain.add_argument("--output", dest="logits", metavar="NAME",
                         help="the model output to explain (ONNX output name; default: the first output)")
    explain.add_argument("--out", default="explainrt-out", metavar="DIR", help="output folder (default: explainrt-out)")
    explain.set_defaults(run=run_explain)


    demo = commands.add_parser(
        "demo", parents=[verbose, caption], help="explain the example images with the default model",
        description="Grad-CAM of the shipped EfficientNet-Lite0 on scikit-image's chelsea, coffee and astronaut.")
    demo.add_argument("--out", default="explainrt-demo", metavar="DIR", help="output folder (default: explainrt-demo)")
    demo.set_defaults(run=_demo)


@dataclass(frozen=True)
class _Part:
    """One map of an image: its file-name part ("" for the only target, else the target's name), the map,
    its overlay, the method's extras and its record (the target) in explanations.json."""

    name: str
    saliency: np.ndarray
    overlay: np.ndarray
    extras: dict[str, np.ndarray]
    record: dict[str, Any]


@dataclass(frozen=True)
class _Result:
    source: Source
    parts: list[_Part]  # one per target
    record: dict[str, Any]
    many: bool  # several --target: the parts' records go under "targets"


def _compute(explainer: Any, sources: list[Source], method: str, target: Any, batch_size: int,
             options: dict[str, Any], normalize: bool, captions: bool = True,
             texts: list[str] | None = None) -> list[_Result]:
    """Explain every source, batch by batch; nothing is written here. ``target`` a list: the K targets
    every image is explained for, ``texts`` their --target texts (which name their files)."""
    from explainrt.preprocessing import load_image

    many = isinstance(target, list)
    names = [target_name(text) for text in texts or []]
    results: list[_Result] = []
    with progress(len(sources), method, unit="images", enabled=len(sources) > 1) as bar:
        for first in range(0, len(sources), batch_size):
            chunk = sources[first : first + batch_size]
            tick = time.perf_counter()
            pixels = [load_image(source.image) for source in chunk]
            read = time.perf_counter() - tick
            explanation = explainer.explain(pixels, method=method, targets=[target] * len(chunk) if many else target,
                                            batch_size=batch_size, normalize=normalize, progress=True, **options)
            overlays = explanation.overlays(captions=captions)
            timings = {"read": read, **explanation.timings, "batch_images": len(chunk)}
            objective = explanation.objective  # target objects: logits hold each image's objective [N, 1]
            probabilities = None if objective else softmax(explanation.class_scores)
            tops = [[]] * len(chunk) if objective else explanation.top_k(TOP_K)
            given = target if many else [target]
            for index, (source, top) in enumerate(zip(chunk, tops, strict=True)):
                parts = []
                for k, chosen in enumerate(given):
                    at = (index, k) if many else (index,)
                    cls = int(explanation.targets[at])
                    known = explanation.labels and 0 <= cls < len(explanation.labels)
                    score = ({"objective": repr(chosen), "score": float(explanation.logits[index, k])} if objective
                             else {"probability": float(probabilities[index, cls])})  # type: ignore[index]
                    described = {"index": cls, "label": explanation.labels[cls] if known else None, **score}
                    parts.append(_Part(names[k] if many else "", explanation.maps[at], overlays[at],
                                       {key: values[at] for key, values in explanation.extras.items()},
                                       {"target": texts[k], **described} if many and texts else described))
                record = {"image": source.name, **({} if many else {"target": parts[0].record}),
                          "top5": [dataclasses.asdict(p) for p in top], "timings": timings}
                if explanation.notes[index]:
                    record["note"] = explanation.notes[index]
                results.append(_Result(source, parts, record, many))
            bar.update(len(chunk))
    return results


SUMMARY = "explanations.json"


def _write_results(out: Path, results: list[_Result], header: dict[str, Any], method: str) -> Path:
    """Write every file into a staging folder beside ``out``, then move the set into ``out``: a failure
    while writing (a full disk, a read-only folder) leaves ``out`` as it was, and the files of an
    earlier run in ``out`` (those its explanations.json lists) are replaced as one set."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as error:
        raise OutputWriteError(f"cannot write to --out {out}: {error.strerror or error}") from error
    try:
        names = _write_set(staging, results, header, method)
        out.mkdir(exist_ok=True)
        stale = set(_previous_set(out)) - set(names)
        with _interrupts_deferred():  # a Ctrl-C while moving lands after the whole set is in place
            for name in names:  # the summary last: it names the set that is complete
                os.replace(staging / name, out / name)
            for name in stale:
                (out / name).unlink(missing_ok=True)
    except OSError as error:
        raise OutputWriteError(f"cannot write to --out {out}: {error.strerror or error}; nothing was written") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / SUMMARY


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) and SIGTERM back until the block is done, then deliver them: renames are
    quick, and a set moved half into place is what the staging folder exists to prevent."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers are the main thread's
        yield
        return
    received: list[int] = []
    previous = {number: signal.signal(number, lambda caught, _frame: received.append(caught))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in received:
            signal.raise_signal(number)


def _write_set(folder: Path, results: list[_Result], header: dict[str, Any], method: str) -> list[str]:
    """Every output file in ``folder``; their names, the summary last."""
    from explainrt.overlay import save_png

    records, names = [], []
    for result in results:
        described = []
        for part in result.parts:
            stem = _file_stem(result, part, method)
            written = {"overlay": f"{stem}.png", "map": f"{stem}.npy"}
            save_png(folder / written["overlay"], part.overlay)
            np.save(folder / written["map"], part.saliency)
            if part.extras:  # method-specific arrays (contrast maps, concepts, ...)
                written["extras"] = f"{stem}.extras.npz"
                np.savez_compressed(folder / written["extras"], **part.extras)
            names += written.values()
            described.append({**part.record, **written})
        records.append({**result.record, "targets": described} if result.many else {**result.record, **written})
    (folder / SUMMARY).write_text(json.dumps({**header, "images": records}, indent=2) + "\n", encoding="utf-8")
    return [*names, SUMMARY]


def _previous_set(out: Path) -> list[str]:
    """The files an earlier ``explain`` wrote to ``out``, as its explanations.json lists them (none if unreadable)."""
    try:
        records = json.loads((out / SUMMARY).read_text(encoding="utf-8"))["images"]
        parts = [part for record in records for part in [record, *(record.get("targets") or [])]]
        return [part[key] for part in parts for key in ("overlay", "map", "extras")
                if isinstance(part.get(key), str) and Path(part[key]).name == part[key] != ".."]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def run_explain(args: argparse.Namespace) -> int:
    from explainrt.methods import get_method
    from explainrt.version import __version__

    chosen = get_method(args.method)  # fail fast, before loading the model
    method = chosen.name
    options = method_options(chosen, args.options)
    images = sources(args.images)
    explainer = load_explainer(args)
    target = cli_targets(args.target, explainer.preprocessing.labels)
    start = time.perf_counter()
    results = _compute(explainer, images, method, target, args.batch_size, options, not args.raw, args.caption,
                       args.target)
    header = {"explainrt": __version__, "model": args.model or "default (EfficientNet-Lite0, ImageNet)",
              "method": method, "options": _recorded(options, args.options), "raw_maps": bool(args.raw), "backend": args.backend,
              "timings_unit": "seconds",
              "total_seconds": time.perf_counter() - start}
    summary = _write_results(Path(args.out), results, header, method)
    for result in results:
        record = result.record
        for part in result.parts:
            print(f"{result.source.stem}: {method} of {_described(part.record)}-> {_file_stem(result, part, method)}.png")
        if "note" in record:
            log.warning("%s: %s", result.source.stem, record["note"])
        for rank, prediction in enumerate(record["top5"], start=1):
            print(f"  {rank}. {prediction['probability']:6.1%}  {prediction['index']:>5}  {prediction['label'] or ''}")
    count = sum(3 if part.extras else 2 for result in results for part in result.parts) + 1
    print(f"wrote {count} files to {args.out} (summary: {summary})")
    return 0


def _file_stem(result: _Result, part: _Part, method: str) -> str:
    """``<stem>.<method>``, and ``.<target>`` with several targets: the name of a map's files."""
    return f"{result.source.stem}.{method}{'.' + part.name if part.name else ''}"


def _described(record: dict[str, Any]) -> str:
    """A map's target for the console: "class 281 (tabby) ", with several targets "class:281: class 281 (tabby) "."""
    label = f"({record['label']}) " if record["label"] else ""
    return f"{record['target'] + ': ' if 'target' in record else ''}class {record['index']} {label}"


def _recorded(options: dict[str, Any], texts: list[tuple[str, str]] | None) -> dict[str, Any]:
    """The options as explanations.json records them: parsed values, or the given text for arrays."""
    given = dict(texts or [])
    recorded = {}
    for name, value in options.items():
        try:
            json.dumps(value)
            recorded[name] = value
        except TypeError:
            recorded[name] = given[name]
    return recorded


def _demo(args: argparse.Namespace) -> int:
    """``explain examples`` with every other setting at its default."""
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(), parent_parsers())
    return run_explain(parser.parse_args(["explain", EXAMPLES, f"--out={args.out}", *([] if args.caption else ["--no-caption"])]))
