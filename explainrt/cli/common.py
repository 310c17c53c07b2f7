"""What the subcommands share: exit codes, the shared argument groups, argument types, logging,
image sources, class targets and the model every command loads through ``explainrt.models``."""

from __future__ import annotations

import argparse
import difflib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from explainrt.errors import ImageReadError, InvalidInputError
from explainrt.export.inputs import INPUT_LAYOUTS
from explainrt.files import name_part
from explainrt.models import PreprocessingOverrides
from explainrt.models.loading import IMAGENET_MEAN, IMAGENET_STD
from explainrt.runtime import BACKENDS
from explainrt.targets import Target
from explainrt.targets import parse as parse_target

log = logging.getLogger(__name__)

EXIT_ERROR = 2
EXAMPLES = "examples"
"""The IMAGE argument that stands for the three example images shipped with scikit-image."""
TOP_K = 5


def parent_parsers() -> dict[str, argparse.ArgumentParser]:
    """The argument groups subcommands share: "verbose", "model" (preprocessing), "runtime" and "caption"."""
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    verbose.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    model = argparse.ArgumentParser(add_help=False)
    group = model.add_argument_group("model")
    group.add_argument("--weights", metavar="FILE",
                       help="state dict for a torchvision architecture (torch.save(model.state_dict(), FILE)); "
                            "nothing is downloaded")
    group.add_argument("--input-size", nargs=2, type=positive_int, metavar=("H", "W"),
                       help="model input size (default: the ONNX input's static size, else 224 224)")
    group.add_argument("--mean", nargs=3, type=float, metavar=("R", "G", "B"),
                       help=f"normalisation mean for pixels in [0, 1] (default: ImageNet {IMAGENET_MEAN})")
    group.add_argument("--std", nargs=3, type=float, metavar=("R", "G", "B"),
                       help=f"normalisation std (default: ImageNet {IMAGENET_STD})")
    group.add_argument("--labels", metavar="FILE",
                       help="class names, one per line (default: ImageNet names for 1000-class models)")
    group.add_argument("--input-layout", choices=INPUT_LAYOUTS, metavar="LAYOUT",
                       help="the ONNX image input's layout, nchw ([N, C, H, W]) or nhwc ([N, H, W, C], e.g. "
                            "tf2onnx/Keras exports), where the graph and its sizes do not tell it (default: told "
                            "from the model)")

    runtime = argparse.ArgumentParser(add_help=False)
    group = runtime.add_argument_group("runtime")
    group.add_argument("--model", metavar="M",
                       help="an ONNX file (explainable or not), or a torchvision architecture name with --weights "
                            "(default: the shipped EfficientNet-Lite0 with ImageNet weights)")
    group.add_argument("--layer", action="append", metavar="LAYER", dest="layers",
                       help="target layer: an ONNX tensor name, or a dotted module name for torch models; "
                            "repeat for several (default: the model's own, else the last spatial layer)")
    group.add_argument("--backend", default="onnxruntime", metavar="NAME",
                       help=f"runtime: {', '.join(BACKENDS)} (default: onnxruntime; torch needs a PyTorch model, "
                            "tensorrt an NVIDIA GPU and the trt extra)")
    group.add_argument("--provider", action="append", metavar="NAME", dest="providers",
                       help="onnxruntime execution provider, in priority order (default: CPUExecutionProvider)")
    group.add_argument("--batch-size", type=positive_int, default=32, metavar="N", help="images per runtime call")

    caption = argparse.ArgumentParser(add_help=False)
    caption.add_argument("--no-caption", dest="caption", action="store_false",
                         help="overlays without the caption line (class label, probability, method)")

    return {"verbose": verbose, "model": model, "runtime": runtime, "caption": caption}


def method_option(text: str) -> tuple[str, str]:
    """``-O KEY=VALUE`` as (key, text); the text is parsed by the method's declaration of KEY."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a name, got {text!r}")
    return key, value


def method_options(method: Any, pairs: Sequence[tuple[str, str]] | None) -> dict[str, Any]:
    """The -O options parsed by ``method``'s typed declarations (an unknown name or bad value is an error)."""
    from explainrt.methods import parse_text_options

    options = parse_text_options(method, pairs or [])
    method.check_options(options)
    return options


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def configure_logging(verbosity: int, quiet: bool = False) -> None:
    """-v: INFO (progress as log lines where the output is not a terminal), -vv: DEBUG; --quiet: no progress."""
    from explainrt.progress import set_quiet

    logging.basicConfig(format="explainrt: %(levelname)s: %(name)s: %(message)s")
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.getLogger("explainrt").setLevel(level)
    set_quiet(quiet)


def overrides(args: argparse.Namespace) -> PreprocessingOverrides:
    """The preprocessing flags (--input-size, --mean, --std, --labels) as the load step takes them."""
    return PreprocessingOverrides(tuple(args.input_size) if args.input_size else None,
                                  tuple(args.mean) if args.mean else None, tuple(args.std) if args.std else None,
                                  args.labels)


def load_model(args: argparse.Namespace, backend: str = "onnxruntime") -> Any:
    """The model --model names (default, torchvision architecture with --weights, ONNX file) with its
    --layer targets, --input-layout and preprocessing, through the one load step."""
    from explainrt.models import Outputs, load

    return load(args.model, args.layers or None, backend=backend, weights=args.weights,
                outputs=Outputs(output=getattr(args, "logits", None), input_layout=args.input_layout),
                overrides=overrides(args))


def load_explainer(args: argparse.Namespace) -> Any:
    """An Explainer for --model on --backend and --provider."""
    from explainrt.explainer import Explainer

    return Explainer(load_model(args, args.backend), backend=args.backend, providers=args.providers)


@dataclass(frozen=True)
class Source:
    stem: str
    name: str  # as reported in the JSON: the path, or "skimage:<name>"
    image: Any  # a path or a uint8 array


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def image_paths(items: Sequence[str]) -> list[str]:
    """IMAGE arguments with every folder replaced by the image files in it (sorted)."""
    paths: list[str] = []
    for item in items:
        folder = Path(item)
        if item == EXAMPLES or not folder.is_dir():
            paths.append(item)
            continue
        found = sorted(str(p) for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise ImageReadError(f"folder {item!r} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
        paths += found
    return paths


def sources(images: Sequence[str]) -> list[Source]:
    """The images to explain: files, folders of images (sorted), and the word ``examples``."""
    sources: list[Source] = []
    for item in image_paths(images):
        if item == EXAMPLES:
            from explainrt.models.default import example_images

            sources += [Source(name, f"skimage:{name}", image) for name, image in example_images().items()]
            continue
        path = Path(item)
        if not path.is_file():
            reason = "it is not a regular file" if path.exists() else "no such file"
            raise ImageReadError(f"cannot read image {item!r}: {reason}")
        sources.append(Source(path.stem, str(path), path))
    stems = [s.stem for s in sources]
    repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
    if repeated:
        raise InvalidInputError(f"several images are named {', '.join(map(repr, repeated))}: their outputs would "
                                "overwrite each other; explain them separately")
    return sources


def class_target(target: str | None, labels: Sequence[str] | None) -> int | Target | None:
    """--target as a class index: an int (negative: k-th most likely), or a label name; or an
    explanation target ``KIND:...`` (``explainrt.targets.parse``: class:281, region:mask.png:12,
    box:x1,y1,x2,y2:0, ...)."""
    if target is None:
        return None
    try:
        return int(target)
    except ValueError:
        pass
    if ":" in target:
        return parse_target(target)
    folded = [label.lower() for label in labels or ()]
    if target.lower() in folded:
        return folded.index(target.lower())
    close = difflib.get_close_matches(target, list(labels or ()), n=3)
    hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    raise InvalidInputError(f"--target {target!r} is neither a class index nor a label of the model{hint}")


def cli_targets(texts: Sequence[str] | None, labels: Sequence[str] | None) -> int | Target | list[int | Target] | None:
    """Every --target (repeatable): None (the top class), one target for every image, or a list of K
    targets that each image is explained for (maps [N, K, H, W]); the same --target twice is an error
    (its files would overwrite each other's)."""
    if not texts:
        return None
    if len(texts) == 1:
        return class_target(texts[0], labels)
    names = [target_name(text) for text in texts]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InvalidInputError(f"--target {', '.join(map(repr, repeated))} is given more than once: each target's "
                                "overlay and map are named after it")
    return [class_target(text, labels) for text in texts]  # type: ignore[misc]


def target_name(text: str) -> str:
    """A --target as a file-name part: ``class:281`` -> ``class-281``, ``-2`` -> ``top2`` (the 2nd most likely),
    ``box:1,2,30,40:0`` -> ``box-1-2-30-40-0``, ``region:masks/cat.png:12`` -> ``region-cat-12`` (files by stem)."""
    words = []
    for word in text.split(":"):
        if re.fullmatch(r"-\d+", word.strip()):
            word = f"top{word.strip()[1:]}"
        elif not _is_number_list(word) and ("/" in word or Path(word).suffix):
            word = Path(word).stem
        words.append(word)
    return name_part("-".join(words))


def _is_number_list(field: str) -> bool:
    try:
        [float(value) for value in field.split(",")]
    except ValueError:
        return False
    return True
