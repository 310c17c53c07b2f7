"""Latency of Grad-CAM on the default model converted to fp16 and quantized to int8, against plain inference.

Run from the repository root on a quiet machine (a few minutes):

    python bench/quantized.py [--runs 20] [--batches 1,8] [--pause 0.05] [--out bench/results/quantized.md]

The shipped EfficientNet-Lite0 (ImageNet weights) in three forms, made here from its plain fp32 ONNX:

- ``fp32``: as shipped;
- ``fp16``: ``onnxconverter_common.float16.convert_float_to_float16`` (whole: fp16 input and output);
- ``int8``: ``onnxruntime.quantization.quantize_static``, QDQ format, int8 activations and per-channel
  int8 weights, calibrated on the three example images and their mirror images.

Per form and batch size (224x224, the example images repeated), interleaved round-robin with a pause
before every call (``bench.common.interleaved``):

- ``ort plain``: ONNX Runtime on that form's own model, with explainrt's session options;
- ``explainrt gradcam``: ``Explainer(model).explain(batch)`` end to end (maps at 224x224 in [0, 1]),
  the batch in the model's own type (float16 for the fp16 model);
- ``explainrt runtime``: only its one runtime call, ``explainer.session.run``.

The ratio is Grad-CAM over plain inference of the same form. The maps' correlation with the fp32
model's (for the fp32 model's top classes) is reported too. Progress goes to stderr; the report to
``--out``, the table to stdout.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    Contender,
    Stats,
    header_lines,
    interleaved,
    load_average,
    markdown_table,
    setup_logging,
    thread_environment,
)
from explainrt.explainer import Explainer  # noqa: E402
from explainrt.export.spec import original_model  # noqa: E402
from explainrt.models.default import example_images  # noqa: E402
from explainrt.preprocessing import Preprocessing  # noqa: E402

log = logging.getLogger("bench.quantized")
DEFAULT_OUT = Path(__file__).parent / "results" / "quantized.md"
FORMS = ("fp32", "fp16", "int8")
PLAIN, GRADCAM, RUNTIME = "ort plain", "explainrt gradcam", "explainrt runtime"


@dataclass
class Case:
    form: str
    batch: int
    stats: dict[str, Stats]
    correlation: float  # lowest per-image correlation of the maps with the fp32 model's


def forms(plain: onnx.ModelProto, calibration: np.ndarray, folder: Path) -> dict[str, onnx.ModelProto]:
    """The fp32 model, its whole fp16 conversion and its int8 QDQ quantization."""
    from onnxconverter_common import float16
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            name = plain.graph.input[0].name
            self.feeds = iter([{name: calibration[i:i + 1]} for i in range(len(calibration))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    onnx.save(plain, folder / "fp32.onnx")
    quantize_static(str(folder / "fp32.onnx"), str(folder / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True)
    return {"fp32": plain, "fp16": float16.convert_float_to_float16(plain), "int8": onnx.load(str(folder / "int8.onnx"))}


def plain_session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # as explainrt; intra-op threads at ORT's default, as explainrt
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def measure(models: dict[str, onnx.ModelProto], preprocessing: Preprocessing, images: np.ndarray,
            batches: list[int], runs: int, warmup: int, pause: float) -> list[Case]:
    reference: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # batch -> fp32 maps and their classes
    cases = []
    for form in FORMS:
        model = models[form]
        explainer = Explainer(model, preprocessing=preprocessing)
        session = plain_session(model)
        name = model.graph.input[0].name
        dtype = np.float16 if explainer.input_form.dtype == "float16" else np.float32
        for batch in batches:
            x = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))
            own = x.astype(dtype)
            targets = np.full((batch, 1), -1, dtype=np.int64)
            if batch not in reference:  # fp32 first: its maps of its top classes
                explained = explainer.explain(x)
                reference[batch] = (explained.maps, explained.targets)
            fp32_maps, classes = reference[batch]
            maps = explainer.explain(x, targets=classes).maps  # the same classes (a top class may differ)
            correlation = min(float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) for a, b in zip(maps, fp32_maps))
            log.info("%s, batch %d: maps correlate >= %.4f with fp32's", form, batch, correlation)
            contenders = [Contender(PLAIN, lambda s=session, n=name, v=own: s.run(None, {n: v})),
                          Contender(GRADCAM, lambda e=explainer, v=own: e.explain(v)),
                          Contender(RUNTIME, lambda e=explainer, v=x, t=targets: e.session.run(v, t))]
            times = interleaved(contenders, runs, warmup, pause)
            cases.append(Case(form, batch, {k: Stats.of(v) for k, v in times.items()}, correlation))
    return cases


def report(cases: list[Case], runs: int, pause: float) -> list[str]:
    fp32_plain = {c.batch: c.stats[PLAIN].median_ms for c in cases if c.form == "fp32"}
    rows = [[c.form, c.batch, f"{c.stats[PLAIN].median_ms:.2f}", f"{c.stats[GRADCAM].median_ms:.2f}",
             f"{c.stats[RUNTIME].median_ms:.2f}", f"{c.stats[GRADCAM].median_ms / c.stats[PLAIN].median_ms:.2f}x",
             f"{c.stats[PLAIN].median_ms / fp32_plain[c.batch]:.2f}x", f"{c.correlation:.4f}"] for c in cases]
    notes = [(f"Model: EfficientNet-Lite0 (explainrt default, ImageNet weights), 224x224; {runs} timed rounds, "
              f"interleaved, {pause * 1e3:.0f} ms pause before each call"),
             ("int8: quantize_static, QDQ, int8 activations, per-channel int8 weights, 6 calibration images; "
              "fp16: convert_float_to_float16 (fp16 input and output)"),
             f"Load average at the end: {load_average()}; threads: {thread_environment()}"]
    lines = header_lines("Grad-CAM on fp16 and int8 models vs plain inference (CPU)",
                         ("explainrt", "onnxruntime", "onnx", "onnxconverter-common", "numpy"), notes)
    lines += ["", *markdown_table(["form", "batch", "plain ms", "gradcam ms", "runtime ms", "gradcam / plain",
                                   "plain / fp32 plain", "map corr. vs fp32"], rows,
                                  [False, True, True, True, True, True, True, True]),
              "", "Medians. `gradcam` is end to end (one runtime call + maps at 224x224); `runtime` is that call only."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--pause", type=float, default=0.05, help="seconds of sleep before every timed call")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    setup_logging()
    default = Explainer()
    plain, preprocessing = original_model(default.session.model), default.preprocessing
    images, _ = preprocessing.prepare(list(example_images().values()))
    calibration = np.ascontiguousarray(np.concatenate([images, images[:, :, :, ::-1]]))
    with tempfile.TemporaryDirectory() as folder:
        models = forms(plain, calibration, Path(folder))
    cases = measure(models, preprocessing, images, [int(b) for b in args.batches.split(",")], args.runs,
                    args.warmup, args.pause)
    lines = report(cases, args.runs, args.pause)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
