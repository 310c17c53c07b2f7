"""GPU benchmark: explainrt on CUDA (torch backend) against plain inference and pytorch-grad-cam,
RISE against the model's raw batched throughput, and the fused CuPy CAM kernel against composed
torch ops. Run by bench/gpu_check.sh on a lent GPU machine (a few minutes):

    python bench/gpu.py [--runs 10] [--models resnet50,default] [--batches 1,8,32] [--out bench/results/gpu.md]
    python bench/gpu.py --dry-run      # everything but the device: CPU tensors, NumPy kernels, small sizes

Sections (224x224 inputs, random float32 batches with a fixed seed, the same for every contender):

1. Latency per model and batch: ``torch plain`` (``model(x)`` under no_grad, the batch copied from
   the host as explainrt's is), ``explainrt gradcam`` (``Explainer(module, [layer], backend="torch",
   device="cuda").explain(x)``: maps at 224x224 in [0, 1] on the host), ``explainrt runtime`` (only
   ``session.run``: logits, activations, gradients) and ``pytorch-grad-cam`` (``GradCAM(...)(input_tensor=x)``,
   on its own copy of the model on the same device). Every call ends with ``torch.cuda.synchronize()``.
2. RISE with 4000 masks on one image (``explain(method="rise")`` when the method is registered)
   against the time of 4000 plain forward passes in batches of the same size.
3. Kernel: ``explainrt.kernels.cam_maps`` on CuPy arrays (fused weighting + ReLU + min-max + bilinear
   resize) against the same maps composed from torch ops, for [32, 2048, 7, 7] -> [32, 224, 224].
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Contender, Stats, header_lines, interleaved, markdown_table, setup_logging  # noqa: E402
from bench.latency import Model, load_model  # noqa: E402
from explainrt import kernels  # noqa: E402
from explainrt.explainer import Explainer  # noqa: E402
from explainrt.methods import METHODS  # noqa: E402

log = logging.getLogger("bench.gpu")

PLAIN, EXPLAINRT, RUNTIME, GRAD_CAM = "torch plain", "explainrt gradcam", "explainrt runtime", "pytorch-grad-cam"
CONTENDERS = (PLAIN, EXPLAINRT, RUNTIME, GRAD_CAM)
TARGET_RATIO = 1.10  # issue 6: explainrt Grad-CAM <= 1.10x plain inference on the same backend
TARGET_SPEEDUP = 10.0  # ... >= 10x faster than pytorch-grad-cam on CUDA at batch 32
TARGET_KERNEL = 3.0  # fused CuPy CAM kernel >= 3x faster than composed ops
TARGET_RISE = 0.90  # RISE 4000 masks at >= 90 % of the raw batched throughput


@dataclass(frozen=True)
class Settings:
    """What differs between the device run and the dry run."""

    device: str
    size: int
    batches: tuple[int, ...]
    rise_masks: int
    rise_batch: int
    kernel_shape: tuple[int, int, int, int, int]  # N, C, h, w, H (= W)
    kernel_backend: str

    @classmethod
    def of(cls, args: argparse.Namespace) -> Settings:
        batches = tuple(int(b) for b in args.batches.split(","))
        if args.dry_run:
            return cls("cpu", 64, tuple(min(b, 2) for b in batches[:2]), 40, 8, (2, 64, 7, 7, 64), "numpy")
        return cls("cuda", 224, batches, args.rise_masks, args.rise_batch, (32, 2048, 7, 7, 224), "cupy")


def synchronize(settings: Settings) -> None:
    if settings.device == "cuda":
        torch.cuda.synchronize()


def timed(settings: Settings, call: Callable[[], Any]) -> Callable[[], Any]:
    """The call, ending when the device has finished its work."""

    def run() -> Any:
        result = call()
        synchronize(settings)
        return result

    return run


# -- 1. latency ---------------------------------------------------------------------------------
@dataclass
class Case:
    model: str
    batch: int
    stats: dict[str, Stats]


def latency_cases(model: Model, settings: Settings, runs: int, warmup: int, seed: int) -> list[Case]:
    from pytorch_grad_cam import GradCAM

    theirs = copy.deepcopy(model.module).to(settings.device)  # its hooks stay on its own copy
    grad_cam = GradCAM(model=theirs, target_layers=[theirs.get_submodule(model.target_name)])
    ours = copy.deepcopy(model.module)
    target = ours.get_submodule(model.target_name)
    explainer = Explainer(ours, [target], backend="torch", device=settings.device, input_size=(settings.size,) * 2)
    plain = copy.deepcopy(model.module).to(settings.device).eval()
    cases = []
    for batch in settings.batches:
        images = torch.randn(batch, 3, settings.size, settings.size, generator=torch.Generator().manual_seed(seed + batch)).numpy()
        top = np.full((batch, 1), -1, dtype=np.int64)

        def run_plain() -> Any:
            with torch.no_grad():
                return plain(torch.from_numpy(images).to(settings.device))

        runs_by_name = {
            PLAIN: run_plain,
            EXPLAINRT: lambda: explainer.explain(images, method="gradcam"),
            RUNTIME: lambda: explainer.session.run(images, top),
            GRAD_CAM: lambda: grad_cam(input_tensor=torch.from_numpy(images).to(settings.device), targets=None),
        }
        ours_maps = explainer.explain(images, method="gradcam").maps
        theirs_maps = grad_cam(input_tensor=torch.from_numpy(images).to(settings.device), targets=None)
        log.info("%s batch %d: max |explainrt - pytorch-grad-cam| = %.2e", model.key, batch,
                 float(np.abs(ours_maps - theirs_maps).max()))
        contenders = [Contender(name, timed(settings, runs_by_name[name])) for name in CONTENDERS]
        times = interleaved(contenders, runs, warmup)
        cases.append(Case(model.key, batch, {name: Stats.of(times[name]) for name in CONTENDERS}))
    return cases


def latency_lines(cases: list[Case]) -> list[str]:
    rows, verdicts = [], []
    for case in cases:
        base = case.stats[PLAIN].median_ms
        rows += [[case.model, case.batch, name, f"{s.median_ms:.2f}", f"{s.p90_ms:.2f}", f"{s.median_ms / base:.2f}x"]
                 for name, s in case.stats.items()]
        ratio = case.stats[EXPLAINRT].median_ms / base
        speedup = case.stats[GRAD_CAM].median_ms / case.stats[EXPLAINRT].median_ms
        line = (f"- {case.model}, batch {case.batch}: explainrt Grad-CAM = {ratio:.2f}x plain inference "
                f"(target <= {TARGET_RATIO:.2f}x: **{'MET' if ratio <= TARGET_RATIO else 'NOT MET'}**); "
                f"{speedup:.1f}x faster than pytorch-grad-cam")
        if case.batch == 32:
            line += f" (target >= {TARGET_SPEEDUP:.0f}x at batch 32: **{'MET' if speedup >= TARGET_SPEEDUP else 'NOT MET'}**)"
        verdicts.append(line)
    table = markdown_table(["model", "batch", "contender", "median ms", "p90 ms", "vs torch plain"], rows,
                           [False, True, False, True, True, True])
    return [*table, "", *verdicts]


# -- 2. RISE --------------------------------------------------------------------------------------
def rise_lines(model: Model, settings: Settings, runs: int, warmup: int, seed: int) -> list[str]:
    masks, batch = settings.rise_masks, settings.rise_batch
    plain = copy.deepcopy(model.module).to(settings.device).eval()
    inputs = torch.randn(batch, 3, settings.size, settings.size, generator=torch.Generator().manual_seed(seed)).to(settings.device)

    def raw() -> None:  # the same number of images through the model, no masks, no accumulation
        with torch.no_grad():
            for _ in range(0, masks, batch):
                plain(inputs)

    contenders = [Contender("raw batched forward", timed(settings, raw))]
    method = METHODS.get("rise")
    note = f"method 'rise' is not registered in this build: only the raw throughput of {masks} images is measured"
    if method is not None:
        count_option = next((o.name for o in method.options if "mask" in o.name or o.name in ("n", "samples", "n_samples")), None)
        ours = copy.deepcopy(model.module)
        explainer = Explainer(ours, [ours.get_submodule(model.target_name)], backend="torch", device=settings.device,
                              input_size=(settings.size,) * 2)
        image = inputs[:1].cpu().numpy()
        options = {count_option: masks} if count_option else {}
        contenders.append(Contender("explainrt rise", timed(settings, lambda: explainer.explain(image, method="rise", batch_size=batch, **options))))
        note = f"explainrt rise options: {options or 'defaults (no mask-count option found)'}, batch_size={batch}"
    times = {name: Stats.of(t) for name, t in interleaved(contenders, runs, warmup).items()}
    rows = [[name, f"{s.median_ms:.1f}", f"{masks / (s.median_ms / 1e3):.0f}"] for name, s in times.items()]
    lines = [*markdown_table(["contender", f"median ms ({masks} images)", "images/s"], rows, [False, True, True]), "", f"- {note}"]
    if "explainrt rise" in times:
        share = times["raw batched forward"].median_ms / times["explainrt rise"].median_ms
        lines.append(f"- RISE throughput = {share:.0%} of raw batched throughput (target >= {TARGET_RISE:.0%}): "
                     f"**{'MET' if share >= TARGET_RISE else 'NOT MET'}**")
    return lines


# -- 3. kernel ------------------------------------------------------------------------------------
def composed_torch_cam(activations: torch.Tensor, weights: torch.Tensor, size: int) -> torch.Tensor:
    """The fused kernel's result from separate torch ops: weight, sum, ReLU, min-max, bilinear resize."""
    cams = torch.relu((activations * weights[:, :, None, None]).sum(dim=1, keepdim=True))
    low = cams.amin(dim=(2, 3), keepdim=True)
    cams = cams - low
    cams = cams / (1e-7 + cams.amax(dim=(2, 3), keepdim=True))
    return F.interpolate(cams, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def kernel_lines(settings: Settings, runs: int, warmup: int, seed: int) -> list[str]:
    n, c, h, w, size = settings.kernel_shape
    rng = np.random.default_rng(seed)
    activations = np.maximum(rng.standard_normal((n, c, h, w)), 0).astype(np.float32)
    weights = rng.standard_normal((n, c)).astype(np.float32) / c
    if settings.kernel_backend == "cupy":
        import cupy

        ours_inputs = (cupy.asarray(activations), cupy.asarray(weights))
    else:
        ours_inputs = (activations, weights)
    torch_inputs = (torch.from_numpy(activations).to(settings.device), torch.from_numpy(weights).to(settings.device))
    fused = timed(settings, lambda: kernels.cam_maps(*ours_inputs, (size, size), backend=settings.kernel_backend))
    composed = timed(settings, lambda: composed_torch_cam(*torch_inputs, size))
    difference = float(np.abs(np.asarray(_host(fused())) - composed().cpu().numpy()).max())
    times = interleaved([Contender("explainrt fused kernel", fused), Contender("torch composed ops", composed)], runs, warmup)
    stats = {name: Stats.of(t) for name, t in times.items()}
    speedup = stats["torch composed ops"].median_ms / stats["explainrt fused kernel"].median_ms
    rows = [[name, f"{s.median_ms:.3f}", f"{s.p90_ms:.3f}"] for name, s in stats.items()]
    return [f"Shape [{n}, {c}, {h}, {w}] -> [{n}, {size}, {size}], kernels backend `{settings.kernel_backend}`; "
            f"max |fused - composed| = {difference:.1e} (torch's bilinear resize is not cv2's at the borders).", "",
            *markdown_table(["contender", "median ms", "p90 ms"], rows, [False, True, True]), "",
            f"- fused kernel {speedup:.1f}x faster than composed torch ops (target >= {TARGET_KERNEL:.0f}x): "
            f"**{'MET' if speedup >= TARGET_KERNEL else 'NOT MET'}**"]


def _host(array: Any) -> np.ndarray:
    return array.get() if hasattr(array, "get") else np.asarray(array)


# -- main ------------------------------------------------------------------------------------------
def device_note(settings: Settings) -> str:
    if settings.device == "cpu":
        return "DRY RUN on the CPU (small sizes, CPU tensors, NumPy kernels): numbers are not GPU results"
    properties = torch.cuda.get_device_properties(0)
    return (f"GPU: {properties.name}, compute capability {properties.major}.{properties.minor}, "
            f"{properties.total_memory / 2**30:.0f} GiB; torch CUDA {torch.version.cuda}; TF32 off")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--models", default="resnet50,default", help="comma-separated: resnet50, default")
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--rise-masks", type=int, default=4000)
    parser.add_argument("--rise-batch", type=int, default=250, help="images per runtime call in the RISE section")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true", help="run everything on the CPU with small sizes")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu.md")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be >= 1 and --warmup >= 0")
    setup_logging()
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)
    settings = Settings.of(args)
    if args.dry_run:
        args.runs, args.warmup = min(args.runs, 2), min(args.warmup, 1)
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run to exercise the benchmark on the CPU")
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    models = [load_model(key.strip(), args.seed) for key in args.models.split(",")]
    notes = [device_note(settings), *(f"`{m.key}` = {m.title}, target `{m.target_name}`" for m in models),
             f"{args.warmup} warm-up + {args.runs} timed rounds, contenders interleaved round-robin; ms are medians."]
    command = (f"Command: `python bench/gpu.py --runs {args.runs} --warmup {args.warmup} --models {args.models} "
               f"--batches {args.batches}{' --dry-run' if args.dry_run else ''}`")
    sections: list[str] = []

    def write_report() -> None:  # after every section: a run cut short keeps what it measured
        lines = [*header_lines("GPU: explainrt on CUDA vs plain inference, pytorch-grad-cam; RISE; CAM kernel",
                               ("torch", "torchvision", "cupy-cuda13x", "cupy-cuda12x", "explainrt", "grad-cam", "numpy"),
                               notes), "", *sections, command]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        log.info("wrote %s", args.out)

    log.info("kernel: fused CAM vs composed torch ops")
    sections += ["## CAM kernel", "", *kernel_lines(settings, args.runs * 3, args.warmup, args.seed), ""]
    write_report()
    cases: list[Case] = []
    for model in models:
        log.info("latency: %s", model.title)
        cases += latency_cases(model, settings, args.runs, args.warmup, args.seed)
    sections = ["## Grad-CAM latency (torch backend)", "", *latency_lines(cases), "", *sections]
    write_report()
    log.info("RISE: %s, %d masks", models[0].key, settings.rise_masks)
    sections += [f"## RISE, {settings.rise_masks} masks, {models[0].key}", "",
                 *rise_lines(models[0], settings, max(1, args.runs // 3), min(args.warmup, 1), args.seed), ""]
    write_report()
    print("\n".join(sections))


if __name__ == "__main__":
    main()
