"""The ``explainrt`` command line: ``export``, ``explain``, ``methods`` and ``demo``.

Every error explainrt raises on purpose (``ExplainrtError``) and every OS error is reported as
one line ``explainrt: error: <message>`` on stderr with exit status 2, without a traceback
(``-vv`` logs it). ``explain`` computes every map before it writes anything, and writes each
file atomically, so a bad image or model leaves no partial output behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from explainrt.engine.files import write_atomic
from explainrt.engine.methods.base import softmax
from explainrt.errors import ExplainrtError, ImageReadError, InvalidInputError, InvalidModelError, UnknownLayerError

log = logging.getLogger(__name__)

EXIT_ERROR = 2
EXAMPLES = "examples"
"""The IMAGE argument that stands for the three example images shipped with scikit-image."""

# torchvision's ImageNet preprocessing: Resize(256) -> CenterCrop(224) -> Normalize(mean, std).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TOP_K = 5

COMMAND_MODULES: tuple[str, ...] = ("explainrt.engine.cli_check_trt", "explainrt.serve.cli", "explainrt.engine.cli_evaluate",
                                     "explainrt.engine.cli_batch")
"""Modules that add a subcommand: each has ``register(commands, parents)`` where ``parents`` maps
"verbose", "model" and "runtime" to the shared argument parsers; the subcommand sets ``run`` like the ones here."""


# -- the parser ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="explainrt",
        description="Explain image classifiers with Grad-CAM and friends, computed inside the ONNX graph.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log progress (-vv: debug, with tracebacks)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    model = argparse.ArgumentParser(add_help=False)
    group = model.add_argument_group("model")
    group.add_argument("--weights", metavar="FILE",
                       help="state dict for a torchvision architecture (torch.save(model.state_dict(), FILE)); "
                            "nothing is downloaded")
    group.add_argument("--input-size", nargs=2, type=_positive_int, metavar=("H", "W"),
                       help="model input size (default: the ONNX input's static size, else 224 224)")
    group.add_argument("--mean", nargs=3, type=float, metavar=("R", "G", "B"),
                       help=f"normalisation mean for pixels in [0, 1] (default: ImageNet {IMAGENET_MEAN})")
    group.add_argument("--std", nargs=3, type=float, metavar=("R", "G", "B"),
                       help=f"normalisation std (default: ImageNet {IMAGENET_STD})")
    group.add_argument("--labels", metavar="FILE",
                       help="class names, one per line (default: ImageNet names for 1000-class models)")

    runtime = argparse.ArgumentParser(add_help=False)
    group = runtime.add_argument_group("runtime")
    group.add_argument("--model", metavar="M",
                       help="an ONNX file (explainable or not), or a torchvision architecture name with --weights "
                            "(default: the shipped EfficientNet-Lite0 with ImageNet weights)")
    group.add_argument("--layer", action="append", metavar="LAYER", dest="layers",
                       help="target layer: an ONNX tensor name, or a dotted module name for torch models; "
                            "repeat for several (default: the model's own, else the last spatial layer)")
    group.add_argument("--backend", default="onnxruntime", help="onnxruntime (default) or torch (torch models only)")
    group.add_argument("--provider", action="append", metavar="NAME", dest="providers",
                       help="onnxruntime execution provider, in priority order (default: CPUExecutionProvider)")
    group.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="images per runtime call")

    export = commands.add_parser(
        "export", parents=[verbose, model], help="write a model as an explainable ONNX model",
        description="Rewrite MODEL so that it also returns its target layers' activations and their gradients "
                    "(outputs explainrt.activations.<i>, explainrt.gradients.<i>; input explainrt.targets). "
                    "The preprocessing (input size, mean/std, labels) is stored in the model's metadata.")
    export.add_argument("model", metavar="MODEL",
                        help="an ONNX file, or a torchvision architecture name with --weights")
    export.add_argument("--target", action="append", metavar="LAYER", dest="layers",
                        help="target layer: an ONNX tensor name, or a dotted module name (layer4) for a torchvision "
                             "architecture; repeat for several (default: the last spatial layer)")
    export.add_argument("--logits", metavar="NAME", help="the ONNX tensor of class scores (default: the first output)")
    export.add_argument("-o", "--output", metavar="OUT.onnx",
                        help="where to write the explainable model (needed unless --triton is given)")
    triton = export.add_argument_group("Triton model repository")
    triton.add_argument("--triton", metavar="DIR",
                        help="also write DIR/NAME/config.pbtxt and DIR/NAME/1/model.onnx for Triton's ONNX Runtime "
                             "backend (needs tritonclient[grpc] for the config schema)")
    triton.add_argument("--triton-name", metavar="NAME",
                        help="the Triton model name (default: the model's file stem or architecture name)")
    triton.add_argument("--max-batch-size", type=int, default=16, metavar="N",
                        help="Triton max_batch_size; 0 turns batching off (default: 16)")
    triton.add_argument("--preferred-batch-size", type=_positive_int, action="append", metavar="N",
                        dest="preferred_batch_sizes",
                        help="dynamic batching's preferred batch size; repeat for several (default: N/2 and N)")
    triton.add_argument("--max-queue-delay-us", type=int, default=5000, metavar="US",
                        help="longest a request waits for a batch to fill, in microseconds (default: 5000)")
    triton.add_argument("--instances", type=_positive_int, default=1, metavar="N",
                        help="model instances (instance_group count, default: 1)")
    triton.add_argument("--instance-kind", choices=("cpu", "gpu", "auto"), default="cpu",
                        help="where the instances run (default: cpu)")
    triton.add_argument("--force", action="store_true", help="replace an existing, non-empty DIR/NAME")
    export.set_defaults(run=_export)

    explain = commands.add_parser(
        "explain", parents=[verbose, model, runtime], help="explain images: overlay PNGs, raw maps and a JSON summary",
        description="Explain each IMAGE and write <stem>.<method>.png (overlay), <stem>.<method>.npy (map) and "
                    "explanations.json (top-5 predictions, explained class, timings) to --out. Nothing is written "
                    "unless every image is explained.")
    explain.add_argument("images", nargs="+", metavar="IMAGE",
                         help=f"image files; the word {EXAMPLES!r} stands for the example images chelsea, coffee "
                              "and astronaut")
    explain.add_argument("--method", default="gradcam", help="explanation method (see `explainrt methods`)")
    explain.add_argument("-O", "--option", action="append", metavar="KEY=VALUE", dest="options", type=_method_option,
                         help="a method option, e.g. -O window=[16,16] -O n_masks=2000; VALUE is JSON, else a string "
                              "(repeat for several)")
    explain.add_argument("--raw", action="store_true",
                         help="write raw attribution maps (.npy) instead of maps scaled to [0, 1]")
    explain.add_argument("--target", metavar="CLASS",
                         help="class to explain: an index, -k for the k-th most likely class, or a label name "
                              "(default: the most likely class)")
    explain.add_argument("--out", default="explainrt-out", metavar="DIR", help="output folder (default: explainrt-out)")
    explain.set_defaults(run=_explain)

    methods = commands.add_parser("methods", parents=[verbose], help="list the explanation methods")
    methods.set_defaults(run=_methods)

    demo = commands.add_parser(
        "demo", parents=[verbose], help="explain the example images with the default model",
        description="Grad-CAM of the shipped EfficientNet-Lite0 on scikit-image's chelsea, coffee and astronaut.")
    demo.add_argument("--out", default="explainrt-demo", metavar="DIR", help="output folder (default: explainrt-demo)")
    demo.set_defaults(run=_demo)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(commands, {"verbose": verbose, "model": model, "runtime": runtime})
    return parser


def _method_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a name, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 2 bad input or usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # usage errors and --help
        return exit_.code if isinstance(exit_.code, int) else EXIT_ERROR
    _configure_logging(args.verbose)
    try:
        return args.run(args)
    except (ExplainrtError, OSError) as error:
        log.debug("traceback of the error below", exc_info=True)
        print(f"explainrt: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("explainrt: interrupted", file=sys.stderr)
        return 130


def _configure_logging(verbosity: int) -> None:
    logging.basicConfig(format="explainrt: %(levelname)s: %(name)s: %(message)s")
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.getLogger("explainrt").setLevel(level)


# -- models ----------------------------------------------------------------------------------------
def _torchvision_architectures() -> list[str]:
    from torchvision import models

    return models.list_models(module=models)


def _is_onnx_path(model: str) -> bool:
    return model.lower().endswith(".onnx") or os.path.exists(model)


def _torchvision_model(name: str, weights: str | None) -> tuple[Any, int]:
    """A torchvision classifier with local weights, in eval mode, and its number of classes."""
    import torch
    from torchvision import models

    if weights is None:
        raise InvalidInputError(f"torchvision architecture {name!r} needs --weights FILE (a state dict saved with "
                                "torch.save(model.state_dict(), FILE)): explainrt downloads no weights")
    path = Path(weights)
    if not path.is_file():
        raise InvalidModelError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises pickle, zip and runtime errors alike
        raise InvalidModelError(f"cannot read weights file {str(path)!r}: {error}") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InvalidModelError(f"weights file {str(path)!r} does not hold a state dict (name -> tensor)")
    # The classifier is the last matrix of every torchvision classifier's state dict.
    matrices = [value for value in state.values() if value.dim() == 2]
    num_classes = int(matrices[-1].shape[0]) if matrices else 1000
    try:
        model = models.get_model(name, weights=None, num_classes=num_classes)
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as error:
        first_lines = "\n".join(str(error).splitlines()[:3])
        raise InvalidModelError(
            f"weights file {str(path)!r} does not fit torchvision's {name}: {first_lines}") from error
    return model.eval(), num_classes


def _modules(model: Any, names: Sequence[str]) -> list[Any]:
    """Sub-modules of `model` by dotted name (``layer4``, ``features.28``)."""
    found = []
    for name in names:
        try:
            found.append(model.get_submodule(name))
        except AttributeError:
            known = [n for n, _ in model.named_modules() if n]
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise UnknownLayerError(f"{type(model).__name__} has no module {name!r}{hint}") from None
    return found


def _labels(args: argparse.Namespace, num_classes: int,
            stored: tuple[str, ...] | None = None) -> tuple[str, ...] | None:
    """--labels FILE, else the model's stored labels, else ImageNet's for 1000 classes."""
    if args.labels is None:
        if stored is not None or num_classes != 1000:
            return stored
        from explainrt.engine.default_model import imagenet_labels

        return imagenet_labels()
    path = Path(args.labels)
    try:
        labels = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidInputError(f"cannot read labels file {str(path)!r}: {error}") from error
    if len(labels) != num_classes:
        raise InvalidInputError(
            f"labels file {str(path)!r} has {len(labels)} names; the model has {num_classes} classes")
    return labels


def _preprocessing(args: argparse.Namespace, input_size: Sequence[int], num_classes: int, stored: Any = None) -> Any:
    """Preprocessing from the flags, else from `stored` (a model's own), else torchvision's ImageNet
    recipe: resize the shorter side to 8/7 of the input size, centre-crop, normalise."""
    from explainrt.engine.preprocessing import Preprocessing

    height, width = (int(v) for v in input_size)
    same_size = stored is not None and stored.input_size == (height, width)
    return Preprocessing(
        input_size=(height, width),
        resize_shorter=stored.resize_shorter if same_size else max(height, width) * 8 // 7,
        mean=tuple(args.mean or (stored.mean if stored else IMAGENET_MEAN)),
        std=tuple(args.std or (stored.std if stored else IMAGENET_STD)),
        labels=_labels(args, num_classes, stored.labels if stored else None),
        interpolation=stored.interpolation if stored else "bilinear",
    )


def _overrides_preprocessing(args: argparse.Namespace) -> bool:
    return any(value is not None for value in (args.mean, args.std, args.labels, args.input_size))


def _input_size(dims: Sequence[Any], args: argparse.Namespace, stored: Any = None) -> tuple[int, int]:
    """--input-size, else the model input's static size, else the stored one, else 224x224."""
    if args.input_size:
        return tuple(args.input_size)  # type: ignore[return-value]
    spatial = list(dims[2:4])
    if len(spatial) == 2 and all(isinstance(v, int) and v > 0 for v in spatial):
        return spatial[0], spatial[1]
    if stored is not None:
        return stored.input_size
    log.info("the model's input size is dynamic: assuming 224x224 (set --input-size)")
    return 224, 224


def _with_preprocessing(model: Any, preprocessing_json: str) -> Any:
    """The explainable model with its stored preprocessing replaced."""
    from explainrt.export.explainable import METADATA_KEY, ExplainableSpec

    spec = dataclasses.replace(ExplainableSpec.from_model(model), preprocessing=preprocessing_json)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            prop.value = spec.to_json()
    return model


def _input_dims(model: Any, name: str) -> list[Any]:
    value = next(v for v in model.graph.input if v.name == name)
    return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]


def _load_explainer(args: argparse.Namespace) -> Any:
    """An Explainer for --model (default, torchvision architecture or ONNX file) with preprocessing."""
    from explainrt.engine.explainer import Explainer

    layers = args.layers or None
    common = {"backend": args.backend, "providers": args.providers}
    if args.model is None:
        if args.weights:
            raise InvalidInputError("--weights needs --model ARCHITECTURE (a torchvision name such as resnet50)")
        if not layers:
            return Explainer(**common)
        from explainrt.engine.default_model import DEFAULT_PREPROCESSING, load_default_torch_model

        module = load_default_torch_model()
        return Explainer(module, _modules(module, layers), preprocessing=DEFAULT_PREPROCESSING, **common)
    if _is_onnx_path(args.model):
        if args.weights:
            raise InvalidInputError("--weights applies to torchvision architectures, not to ONNX models")
        explainer = Explainer(args.model, layers, **common)
        if explainer.preprocessing is None or _overrides_preprocessing(args):
            size = _input_size(explainer.session.input_shape, args, explainer.preprocessing)
            explainer.preprocessing = _preprocessing(args, size, explainer.spec.num_classes, explainer.preprocessing)
        return explainer
    module, num_classes = _torchvision_model(_architecture(args.model), args.weights)
    preprocessing = _preprocessing(args, args.input_size or (224, 224), num_classes)
    targets = _modules(module, layers) if layers else None
    return Explainer(module, targets, preprocessing=preprocessing, **common)


def _architecture(name: str) -> str:
    known = _torchvision_architectures()
    if name in known:
        return name
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise InvalidModelError(f"model {name!r} is neither an ONNX file nor a torchvision architecture{hint}")


# -- export ----------------------------------------------------------------------------------------
def _export(args: argparse.Namespace) -> int:
    if args.output is None and args.triton is None:
        raise InvalidInputError("export needs -o OUT.onnx, --triton DIR or both")
    triton_settings = (args.triton_name or Path(args.model).stem, args.max_batch_size, args.preferred_batch_sizes,
                       args.max_queue_delay_us, args.instances, args.instance_kind, args.force)
    if args.triton is not None:
        from explainrt.export.triton import check_triton_target

        check_triton_target(args.triton, *triton_settings)  # before the (slow) export
    if _is_onnx_path(args.model):
        proto = _explainable_onnx(args)
    else:
        proto = _explainable_torchvision(args)
    from explainrt.export.explainable import ExplainableSpec

    spec = ExplainableSpec.from_model(proto)
    explains = f"explains {spec.logits!r} ({spec.num_classes} classes) w.r.t. {', '.join(map(repr, spec.target_layers))}"
    if args.output is not None:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(output, proto.SerializeToString())
        print(f"wrote {output}: {explains}")
    if args.triton is not None:
        from explainrt.export.triton import write_triton_repository

        folder = write_triton_repository(proto, args.triton, *triton_settings)
        print(f"wrote Triton model {folder.name!r} to {folder} (config.pbtxt, 1/model.onnx): {explains}")
    return 0


def _explainable_onnx(args: argparse.Namespace) -> Any:
    from explainrt.engine.preprocessing import Preprocessing
    from explainrt.export.explainable import METADATA_KEY, ExplainableSpec, load_model, make_explainable, original_model

    if args.weights:
        raise InvalidInputError("--weights applies to torchvision architectures, not to ONNX models")
    proto = load_model(args.model)
    stored = None
    if any(p.key == METADATA_KEY for p in proto.metadata_props):
        stored_json = ExplainableSpec.from_model(proto).preprocessing
        stored = Preprocessing.from_json(stored_json) if stored_json else None
        proto = original_model(proto)
    explainable = make_explainable(proto, args.layers or "auto", logits=args.logits)
    spec = ExplainableSpec.from_model(explainable)
    if stored is None or _overrides_preprocessing(args):
        size = _input_size(_input_dims(explainable, spec.image_input), args, stored)
        stored = _preprocessing(args, size, spec.num_classes, stored)
    return _with_preprocessing(explainable, stored.to_json())


def _explainable_torchvision(args: argparse.Namespace) -> Any:
    import torch

    from explainrt.export.torch_export import from_torch

    if args.logits:
        raise InvalidInputError("--logits applies to ONNX models; a torchvision model's logits are its output")
    module, num_classes = _torchvision_model(_architecture(args.model), args.weights)
    preprocessing = _preprocessing(args, args.input_size or (224, 224), num_classes)
    targets = _modules(module, args.layers) if args.layers else None
    example = torch.zeros(1, 3, *preprocessing.input_size)
    return from_torch(module, example, targets, preprocessing=preprocessing.to_json())


# -- explain ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Source:
    stem: str
    name: str  # as reported in the JSON: the path, or "skimage:<name>"
    image: Any  # a path or a uint8 array


@dataclass(frozen=True)
class _Result:
    source: _Source
    saliency: np.ndarray
    overlay: np.ndarray
    record: dict[str, Any]
    extras: dict[str, np.ndarray]


def _sources(images: Sequence[str]) -> list[_Source]:
    sources: list[_Source] = []
    for item in images:
        if item == EXAMPLES:
            from explainrt.engine.default_model import example_images

            sources += [_Source(name, f"skimage:{name}", image) for name, image in example_images().items()]
            continue
        path = Path(item)
        if not path.is_file():
            reason = "it is not a regular file" if path.exists() else "no such file"
            raise ImageReadError(f"cannot read image {item!r}: {reason}")
        sources.append(_Source(path.stem, str(path), path))
    stems = [s.stem for s in sources]
    repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
    if repeated:
        raise InvalidInputError(f"several images are named {', '.join(map(repr, repeated))}: their outputs would "
                                "overwrite each other; explain them separately")
    return sources


def _class_target(target: str | None, labels: Sequence[str] | None) -> int | None:
    """--target as a class index: an int (negative: k-th most likely), or a label name."""
    if target is None:
        return None
    try:
        return int(target)
    except ValueError:
        pass
    folded = [label.lower() for label in labels or ()]
    if target.lower() in folded:
        return folded.index(target.lower())
    close = difflib.get_close_matches(target, list(labels or ()), n=3)
    hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    raise InvalidInputError(f"--target {target!r} is neither a class index nor a label of the model{hint}")


def _compute(explainer: Any, sources: list[_Source], method: str, target: int | None, batch_size: int,
             options: dict[str, Any], normalize: bool) -> list[_Result]:
    """Explain every source, batch by batch; nothing is written here."""
    from explainrt.engine.preprocessing import load_image

    results: list[_Result] = []
    with tqdm(total=len(sources), unit="image", desc=method, disable=True if len(sources) < 4 else None) as bar:
        for first in range(0, len(sources), batch_size):
            chunk = sources[first : first + batch_size]
            tick = time.perf_counter()
            pixels = [load_image(source.image) for source in chunk]
            read = time.perf_counter() - tick
            explanation = explainer.explain(pixels, method=method, targets=target, batch_size=batch_size,
                                            normalize=normalize, progress=False, **options)
            overlays = explanation.overlays()
            timings = {"read": read, **explanation.timings, "batch_images": len(chunk)}
            probabilities = softmax(explanation.logits)
            for index, (source, top) in enumerate(zip(chunk, explanation.top_k(TOP_K), strict=True)):
                cls = int(explanation.targets[index])
                record = {
                    "image": source.name,
                    "target": {"index": cls, "label": explanation.labels[cls] if explanation.labels else None,
                               "probability": float(probabilities[index, cls])},
                    "top5": [dataclasses.asdict(p) for p in top],
                    "timings": timings,
                }
                extras = {key: values[index] for key, values in explanation.extras.items()}
                results.append(_Result(source, explanation.maps[index], overlays[index], record, extras))
            bar.update(len(chunk))
    return results


def _write_results(out: Path, results: list[_Result], header: dict[str, Any], method: str) -> Path:
    from explainrt.engine.overlay import save_png

    out.mkdir(parents=True, exist_ok=True)
    records = []
    for result in results:
        png = out / f"{result.source.stem}.{method}.png"
        npy = out / f"{result.source.stem}.{method}.npy"
        save_png(png, result.overlay)
        write_atomic(npy, lambda handle, saliency=result.saliency: np.save(handle, saliency))
        written = {"overlay": png.name, "map": npy.name}
        if result.extras:  # method-specific arrays (contrast maps, concepts, ...)
            npz = out / f"{result.source.stem}.{method}.extras.npz"
            write_atomic(npz, lambda handle, extras=result.extras: np.savez_compressed(handle, **extras))
            written["extras"] = npz.name
        records.append({**result.record, **written})
    summary = out / "explanations.json"
    write_atomic(summary, (json.dumps({**header, "images": records}, indent=2) + "\n").encode())
    return summary


def _explain(args: argparse.Namespace) -> int:
    from explainrt import __version__
    from explainrt.engine.methods import get_method

    chosen = get_method(args.method)  # fail fast, before loading the model
    method = chosen.name
    options = dict(args.options or [])
    chosen.check_options(options)
    sources = _sources(args.images)
    explainer = _load_explainer(args)
    target = _class_target(args.target, explainer.preprocessing.labels)
    start = time.perf_counter()
    results = _compute(explainer, sources, method, target, args.batch_size, options, not args.raw)
    header = {"explainrt": __version__, "model": args.model or "default (EfficientNet-Lite0, ImageNet)",
              "method": method, "options": options, "raw_maps": bool(args.raw), "backend": args.backend,
              "timings_unit": "seconds",
              "total_seconds": time.perf_counter() - start}
    summary = _write_results(Path(args.out), results, header, method)
    for result in results:
        record = result.record
        print(f"{result.source.stem}: {method} of class {record['target']['index']} "
              f"{_label(record['target']['label'])}-> {result.source.stem}.{method}.png")
        for rank, prediction in enumerate(record["top5"], start=1):
            print(f"  {rank}. {prediction['probability']:6.1%}  {prediction['index']:>5}  {prediction['label'] or ''}")
    count = sum(3 if result.extras else 2 for result in results) + 1
    print(f"wrote {count} files to {args.out} (summary: {summary})")
    return 0


def _label(label: str | None) -> str:
    return f"({label}) " if label else ""


# -- methods, demo ---------------------------------------------------------------------------------
def _methods(args: argparse.Namespace) -> int:
    from explainrt.engine.methods import METHODS

    width = max(map(len, METHODS))
    for name, method in METHODS.items():
        print(f"{name:<{width}}  {method.summary}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    return _explain(build_parser().parse_args(["explain", EXAMPLES, f"--out={args.out}"]))


if __name__ == "__main__":
    sys.exit(main())
