"""``explainrt check-trt MODEL.onnx``: would TensorRT's ONNX parser accept every node of the model?

Compares each node with onnx-tensorrt's published operator table (shipped with explainrt, for the
TensorRT version it names) and prints one line per finding. Exit status: 0 when nothing was
found, 1 with findings, 2 when the model cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys

from explainrt.deploy.trt_support import Finding, check_tensorrt_support, operator_table
from explainrt.export.spec import load_model

EXIT_FINDINGS = 1
EXPLAINRT_PREFIX = "explainrt/"
"""Nodes explainrt adds to a model (gradient graph, target resolution, outputs) carry this prefix."""


def register(commands: argparse._SubParsersAction, parents: dict[str, argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "check-trt", parents=[parents["verbose"]], help="check a model against TensorRT's ONNX operator support",
        description="Report every node of MODEL whose operator, element type, attributes or constant inputs "
                    "TensorRT's ONNX parser does not support, according to onnx-tensorrt's operator table "
                    "(shipped with explainrt). Exit status 0: none found; 1: findings; 2: unreadable model.")
    parser.add_argument("model", metavar="MODEL", help="an ONNX file (explainable or not)")
    parser.add_argument("--explainrt-only", action="store_true",
                        help=f"check only the nodes explainrt added (names starting with {EXPLAINRT_PREFIX!r})")
    parser.add_argument("--json", action="store_true", help="print the findings as a JSON list")
    parser.set_defaults(run=_check_trt)


def _check_trt(args: argparse.Namespace) -> int:
    findings = check_tensorrt_support(load_model(args.model))
    if args.explainrt_only:
        findings = [f for f in findings if f.node.startswith(EXPLAINRT_PREFIX)]
    table = operator_table()
    if args.json:
        json.dump([vars(f) for f in findings], sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        _print_report(findings, args.model, table.tensorrt_version)
    return EXIT_FINDINGS if findings else 0


def _print_report(findings: list[Finding], model: str, version: str) -> None:
    for finding in findings:
        print(finding)
    summary = f"{len(findings)} finding(s)" if findings else "no findings"
    print(f"{model}: {summary} against TensorRT {version}'s ONNX operator table")
