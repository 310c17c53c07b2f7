"""``explainrt export``: write a model as explainable ONNX, and optionally as a Triton model repository."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from explainrt.cli.common import load_model, positive_int
from explainrt.errors import InvalidInputError
from explainrt.export.heads import MAPS_DTYPES, TARGET_OBJECTIVES, add_map_heads, checked_maps, closed_form
from explainrt.export.spec import OBJECTIVES, TAP_PREFIX, ExplainableSpec
from explainrt.export.variants import variant_model
from explainrt.files import write_atomic


def register(commands: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    """Add ``export`` to the CLI's subcommands."""
    verbose, model = parents["verbose"], parents["model"]
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
    export.add_argument("--objective", choices=tuple(OBJECTIVES),
                        help="what the gradients (and maps) are of: logit (input explainrt.targets, class indices); "
                             "cross_entropy (Contrast-CAM's maps); weights (any linear objective, e.g. a Region or "
                             "Similarity target: input explainrt.weights [N, K, *output]); boxes_yolov8 / boxes_yolov5 "
                             "(Box targets: input explainrt.boxes [N, K, 6]); weights_boxes_* (both); default: the "
                             "model's own (logit for a model not explainable yet)")
    export.add_argument("--maps", metavar="METHODS",
                        help="append map heads for these comma-separated methods (gradcam,gradcam++,xgradcam,hirescam,"
                             "layercam,counterfactual-cam; contrast-cam with --objective cross_entropy): outputs "
                             "explainrt.maps.<method> [N, K, H, W], the normalised heatmaps computed in the graph")
    export.add_argument("--maps-only", action="store_true",
                        help="with --maps: drop the activation and gradient outputs (only logits, resolved targets "
                             "and maps leave the runtime)")
    export.add_argument("--maps-dtype", choices=tuple(MAPS_DTYPES), default="float32",
                        help="element type of the maps: float32, float16 or uint8 (round(255 * map)); default float32")
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
    triton.add_argument("--preferred-batch-size", type=positive_int, action="append", metavar="N",
                        dest="preferred_batch_sizes",
                        help="dynamic batching's preferred batch size; repeat for several (default: N/2 and N)")
    triton.add_argument("--max-queue-delay-us", type=int, default=5000, metavar="US",
                        help="longest a request waits for a batch to fill, in microseconds (default: 5000)")
    triton.add_argument("--instances", type=positive_int, default=1, metavar="N",
                        help="model instances (instance_group count, default: 1)")
    triton.add_argument("--instance-kind", choices=("cpu", "gpu", "auto"), default="cpu",
                        help="where the instances run (default: cpu)")
    triton.add_argument("--force", action="store_true", help="replace an existing, non-empty DIR/NAME")
    export.set_defaults(run=_export)



def _layer_names(spec: ExplainableSpec, args: argparse.Namespace) -> list[str]:
    """The target layers as the user named them: the --target module names rather than the tensors the
    PyTorch export tapped them at (explainrt.tap.<i>, which mean nothing to the user)."""
    tapped = all(name.startswith(TAP_PREFIX) for name in spec.target_layers)
    return list(args.layers) if tapped and args.layers and len(args.layers) == len(spec.target_layers) else list(
        spec.target_layers)


def _export(args: argparse.Namespace) -> int:
    if args.output is None and args.triton is None:
        raise InvalidInputError("export needs -o OUT.onnx, --triton DIR or both")
    triton_settings = (args.triton_name or Path(args.model).stem, args.max_batch_size, args.preferred_batch_sizes,
                       args.max_queue_delay_us, args.instances, args.instance_kind, args.force)
    if args.maps_only and not args.maps:
        raise InvalidInputError("--maps-only needs --maps METHODS")
    maps = checked_maps(args.maps or "")  # before the (slow) export
    for method in maps:  # a logit method's head weighs a target objective's gradients in its place
        closed_form(method, args.objective, target_objective=True)  # no --objective: add_map_heads checks the model's
    if args.triton is not None:
        from explainrt.deploy.triton import check_triton_target

        check_triton_target(args.triton, *triton_settings)  # before the (slow) export
    proto = load_model(args).explainable
    loaded = ExplainableSpec.from_model(proto)
    objective = args.objective or loaded.objective
    if objective != loaded.objective:  # the model made explainable again, for the objective asked for
        proto = variant_model(proto, loaded, objective, False)
    if maps:
        proto = add_map_heads(copy.deepcopy(proto), maps, args.maps_only, args.maps_dtype,
                              target_objective=objective in TARGET_OBJECTIVES)
    spec = ExplainableSpec.from_model(proto)
    explains = (f"explains {spec.logits!r} ({spec.num_classes} classes; objective {spec.objective}) w.r.t. "
                f"{', '.join(map(repr, _layer_names(spec, args)))}")
    if maps:
        explains += f"; maps {', '.join(maps)} ({spec.maps_dtype}{', maps only' if spec.maps_only else ''})"
    if args.output is not None:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(output, proto.SerializeToString())
        print(f"wrote {output}: {explains}")
    if args.triton is not None:
        from explainrt.deploy.triton import write_triton_repository

        folder = write_triton_repository(proto, args.triton, *triton_settings)
        print(f"wrote Triton model {folder.name!r} to {folder} (config.pbtxt, 1/model.onnx): {explains}")
    return 0


