"""The ``explainrt batch`` subcommand: explain a folder or Parquet data set on Ray (see ``batch_job``)."""

from __future__ import annotations

import argparse
from typing import Any

from explainrt.cli.common import (
    cli_targets,
    load_model,
    method_option,
    method_options,
    positive_int,
)

EXIT_SOME_FAILED = 1


def register(commands: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    """Add ``batch`` to the CLI's subcommands."""
    batch = commands.add_parser(
        "batch", parents=[parents["verbose"], parents["model"], parents["caption"]], help="explain a whole data set with Ray",
        description="Explain every image of INPUT (a folder of images, searched recursively, or a Parquet file or "
                    "folder with an image-bytes column) on Ray Data, one Explainer per actor. Writes, mirroring the "
                    "input's sub-folders, <image>.<method>.npy (map) and <image>.<method>.png (overlay), then "
                    "summary.parquet and summary.csv (prediction, label, explained class, timings per image). "
                    "Images that cannot be read are listed in the summary's error column (exit status 1).")
    batch.add_argument("input", metavar="INPUT", help="a folder of images, or Parquet file(s) with image bytes")
    batch.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder")
    batch.add_argument("--model", metavar="M",
                       help="an ONNX file (explainable or not), or a torchvision architecture name with --weights "
                            "(default: the shipped EfficientNet-Lite0 with ImageNet weights)")
    batch.add_argument("--method", default="gradcam", help="explanation method (see `explainrt methods`)")
    batch.add_argument("-O", "--option", action="append", metavar="KEY=VALUE", dest="options", type=method_option,
                       help="a method option, parsed by the option's declared type (JSON also works); "
                            "`explainrt methods NAME` lists a method's options")
    batch.add_argument("--raw", action="store_true", help="write raw attribution maps instead of maps scaled to [0, 1]")
    batch.add_argument("--target", metavar="CLASS", action="append",
                       help="class to explain for every image: an index, -k for the k-th most likely, or a label "
                            "(default: the most likely class); or a target such as box:x1,y1,x2,y2:0 or "
                            "region:MASK.png:12 (see `explainrt explain --help`); repeat for K targets per image "
                            "(<image>.<method>.<target>.npy/.png and one summary row per target)")
    batch.add_argument("--layer", action="append", metavar="LAYER", dest="layers",
                       help="target layer (ONNX tensor name, or module name for a torchvision architecture)")
    batch.add_argument("--ray", metavar="ADDRESS", dest="ray_address",
                       help="join this Ray cluster (e.g. ray://head:10001 or auto); default: start a local Ray "
                            "instance with --workers CPUs")
    batch.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                       help="images per actor call and runtime call (default: 8)")
    batch.add_argument("--workers", type=positive_int, default=2, metavar="N",
                       help="Ray actors, each holding one Explainer (default: 2)")
    batch.add_argument("--image-column", metavar="NAME",
                       help="Parquet column of encoded image bytes (default: guessed)")
    batch.add_argument("--name-column", metavar="NAME",
                       help="Parquet column naming each image (default: name/path/filename/image_id/id if present, "
                            "else a hash of the image bytes)")
    batch.add_argument("--label-column", metavar="NAME", help="Parquet column of true labels (default: label)")
    batch.set_defaults(run=_batch, logits=None)


def _batch(args: argparse.Namespace) -> int:
    from explainrt.batch.job import explain_dataset
    from explainrt.methods import get_method

    chosen = get_method(args.method)  # fail fast, before loading the model or starting Ray
    options = method_options(chosen, args.options)
    model, preprocessing = _model_and_preprocessing(args)
    target = cli_targets(args.target, preprocessing.labels)
    result = explain_dataset(
        args.input, args.out, model, chosen.name, preprocessing=preprocessing, target=target, options=options,
        normalize=not args.raw, batch_size=args.batch_size, workers=args.workers, ray_address=args.ray_address,
        image_column=args.image_column, name_column=args.name_column, label_column=args.label_column,
        captions=args.caption)
    count = len(result.summary)
    print(f"explained {count - result.failed} of {count} images with {chosen.name} in {result.seconds:.1f} s; "
          f"summary: {result.parquet}, {result.csv}")
    failed = result.summary[result.summary["error"].notna()]
    for image, error in zip(failed["image"], failed["error"]):
        print(f"  failed: {image}: {error}")
    return EXIT_SOME_FAILED if result.failed else 0


def _model_and_preprocessing(args: argparse.Namespace) -> tuple[Any, Any]:
    """The explainable model and the preprocessing the workers use, through the one load step."""
    loaded = load_model(args)
    return loaded.explainable, loaded.preprocessing
