"""explainrt.kernels: NumPy reference against cv2 / pytorch-grad-cam / torch, C++ and CuPy
against the NumPy reference, input validation, and the CUDA sources."""

from __future__ import annotations

import glob
import re
import shutil
import subprocess

import cv2
import numpy as np
import pytest
import torch
from pytorch_grad_cam.utils.image import scale_cam_image

import explainrt.kernels as kernels
from explainrt.errors import BackendUnavailableError, InvalidInputError
from explainrt.kernels import _cupy

TOL = 1e-5

# (h, w, H, W): up, down (integer and not), non-square, mixed, identity, 1-pixel-wide sources.
RESIZE_CASES = [
    (7, 7, 224, 224),
    (7, 5, 13, 31),
    (224, 224, 7, 7),
    (14, 14, 7, 7),
    (300, 200, 97, 61),
    (13, 17, 7, 40),
    (6, 6, 6, 6),
    (1, 9, 4, 3),
    (9, 1, 5, 17),
    (1, 16, 1, 5),
    (1, 1, 3, 4),
]

# (N, C, h, w, H, W) for the batched kernels, N=1 and N>1.
BATCH_CASES = [
    (1, 5, 7, 7, 224, 224),
    (3, 16, 7, 5, 13, 31),
    (2, 8, 14, 14, 7, 7),
    (4, 3, 1, 9, 4, 3),
    (1, 2, 9, 1, 5, 17),
]


def _rand(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _weights(per_pixel: bool, n: int, c: int, h: int, w: int) -> np.ndarray:
    return _rand(2, n, c, h, w) if per_pixel else _rand(2, n, c)


def _max_diff(a, b) -> float:
    assert a.shape == b.shape
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max(initial=0.0))


# --- NumPy reference against the libraries it reproduces ---------------------------------------


@pytest.mark.parametrize("h, w, H, W", RESIZE_CASES)
def test_numpy_resize_matches_cv2(h: int, w: int, H: int, W: int) -> None:
    maps = _rand(0, 3, h, w)
    expected = np.stack(
        [cv2.resize(m, (W, H), interpolation=cv2.INTER_LINEAR).reshape(H, W) for m in maps]
    )
    assert _max_diff(kernels.resize_bilinear(maps, (H, W), backend="numpy"), expected) <= TOL


@pytest.mark.parametrize("per_pixel", [False, True])
@pytest.mark.parametrize("N, C, h, w, H, W", BATCH_CASES)
def test_numpy_cam_maps_matches_scale_cam_image(
    per_pixel: bool, N: int, C: int, h: int, w: int, H: int, W: int
) -> None:
    activations = _rand(1, N, C, h, w)
    weights = _weights(per_pixel, N, C, h, w)
    broadcast = weights if per_pixel else weights[:, :, None, None]
    cam = np.maximum((broadcast * activations).sum(axis=1), 0)
    expected = scale_cam_image(cam, (W, H))
    got = kernels.cam_maps(activations, weights, (H, W), backend="numpy")
    assert got.dtype == np.float32 and got.flags.c_contiguous
    assert _max_diff(got, expected) <= TOL


def test_numpy_normalize_matches_scale_cam_image() -> None:
    maps = _rand(3, 4, 9, 11)
    expected = scale_cam_image(maps)
    assert _max_diff(kernels.normalize_minmax(maps, backend="numpy"), expected) <= TOL


@pytest.mark.parametrize("N, C, h, w, H, W", BATCH_CASES)
def test_numpy_channel_masks_match_score_cam(
    N: int, C: int, h: int, w: int, H: int, W: int
) -> None:
    activations = _rand(4, N, C, h, w)
    upsampled = torch.nn.UpsamplingBilinear2d(size=(H, W))(torch.from_numpy(activations))
    flat = upsampled.view(N, C, -1)
    maxs = flat.max(dim=-1)[0][:, :, None, None]
    mins = flat.min(dim=-1)[0][:, :, None, None]
    expected = ((upsampled - mins) / (maxs - mins + 1e-8)).numpy()
    assert _max_diff(kernels.channel_masks(activations, (H, W), backend="numpy"), expected) <= TOL


# --- C++ against NumPy (the compiled module must be built: no skipping) -------------------------


def test_cpp_backend_is_built() -> None:
    assert "cpp" in kernels.available_backends(), (
        "explainrt.kernels._cpu does not import; run `pip install -e . --no-build-isolation`"
    )


@pytest.mark.parametrize("per_pixel", [False, True])
@pytest.mark.parametrize("N, C, h, w, H, W", BATCH_CASES)
def test_cpp_cam_maps_match_numpy(
    per_pixel: bool, N: int, C: int, h: int, w: int, H: int, W: int
) -> None:
    activations = _rand(5, N, C, h, w)
    weights = _weights(per_pixel, N, C, h, w)
    expected = kernels.cam_maps(activations, weights, (H, W), backend="numpy")
    got = kernels.cam_maps(activations, weights, (H, W), backend="cpp")
    assert got.dtype == np.float32 and got.flags.c_contiguous
    assert _max_diff(got, expected) <= TOL


@pytest.mark.parametrize("h, w, H, W", RESIZE_CASES)
@pytest.mark.parametrize("N", [1, 3])
def test_cpp_resize_and_normalize_match_numpy(N: int, h: int, w: int, H: int, W: int) -> None:
    maps = _rand(6, N, h, w)
    for run in (
        lambda backend: kernels.resize_bilinear(maps, (H, W), backend=backend),
        lambda backend: kernels.normalize_minmax(maps, backend=backend),
    ):
        assert _max_diff(run("cpp"), run("numpy")) <= TOL


@pytest.mark.parametrize("N, C, h, w, H, W", BATCH_CASES)
def test_cpp_channel_masks_match_numpy(N: int, C: int, h: int, w: int, H: int, W: int) -> None:
    activations = _rand(7, N, C, h, w)
    expected = kernels.channel_masks(activations, (H, W), backend="numpy")
    assert _max_diff(kernels.channel_masks(activations, (H, W), backend="cpp"), expected) <= TOL


def test_empty_batch_gives_empty_output() -> None:
    for backend in ("numpy", "cpp"):
        out = kernels.cam_maps(_rand(8, 0, 3, 4, 4), _rand(9, 0, 3), (8, 6), backend=backend)
        assert out.shape == (0, 8, 6) and out.dtype == np.float32


# --- input validation ---------------------------------------------------------------------------


def test_auto_converts_other_float_dtypes_to_float32() -> None:
    activations, weights = _rand(10, 2, 3, 5, 5), _rand(11, 2, 3)
    expected = kernels.cam_maps(activations, weights, (9, 9), backend="numpy")
    got = kernels.cam_maps(activations.astype(np.float64), weights.astype(np.float64), (9, 9))
    assert got.dtype == np.float32 and _max_diff(got, expected) <= TOL
    assert kernels.normalize_minmax(np.ones((1, 2, 2), np.float16)).dtype == np.float32


@pytest.mark.parametrize(
    "activations, weights, match",
    [
        (_rand(0, 3, 5, 5), _rand(0, 1, 3), r"activations .*shape \(3, 5, 5\)"),
        (_rand(0, 1, 3, 5, 5), _rand(0, 2, 3), r"weights .*shape \(2, 3\)"),
        (_rand(0, 1, 3, 5, 5), _rand(0, 1, 4), r"weights .*shape \(1, 4\)"),
        (_rand(0, 1, 3, 5, 5), _rand(0, 1, 3, 5, 4), r"weights .*shape \(1, 3, 5, 4\)"),
        (_rand(0, 1, 3, 5, 5), _rand(0, 1, 3, 5), r"weights .*shape \(1, 3, 5\)"),
        (_rand(0, 1, 3, 0, 5), _rand(0, 1, 3), r"activations .*shape \(1, 3, 0, 5\)"),
        (np.ones((1, 3, 5, 5), np.int32), _rand(0, 1, 3), r"activations .*floating.*int32"),
        (_rand(0, 1, 3, 5, 5), np.ones((1, 3), np.complex64), r"weights .*floating.*complex64"),
        (_rand(0, 1, 3, 5, 5), [[1, 2], [3]], r"weights cannot be read as an array"),
    ],
)
@pytest.mark.parametrize("backend", ["numpy", "cpp"])
def test_cam_maps_rejects_bad_arrays(backend: str, activations, weights, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        kernels.cam_maps(activations, weights, (7, 7), backend=backend)


@pytest.mark.parametrize("call", ["resize_bilinear", "normalize_minmax"])
def test_map_kernels_reject_wrong_rank(call: str) -> None:
    run = getattr(kernels, call)
    args = ((4, 4),) if call == "resize_bilinear" else ()
    with pytest.raises(InvalidInputError, match=r"maps .*shape \(2, 3, 4, 4\)"):
        run(_rand(0, 2, 3, 4, 4), *args)
    with pytest.raises(InvalidInputError, match=r"maps .*floating.*bool"):
        run(np.ones((2, 4, 4), bool), *args)


@pytest.mark.parametrize("out_hw", [(0, 5), (5, -1), (5,), 5, (2.5, 3), (True, 3), None])
def test_bad_out_hw_is_rejected(out_hw) -> None:
    with pytest.raises(InvalidInputError, match="out_hw"):
        kernels.resize_bilinear(_rand(0, 1, 4, 4), out_hw)
    with pytest.raises(InvalidInputError, match="out_hw"):
        kernels.channel_masks(_rand(0, 1, 2, 4, 4), out_hw)


def test_unknown_backend_name_is_rejected() -> None:
    with pytest.raises(InvalidInputError, match="backend .*'tpu'"):
        kernels.normalize_minmax(_rand(0, 1, 4, 4), backend="tpu")


def test_unavailable_backend_raises_instead_of_falling_back(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "_probe", lambda name: f"backend {name!r} is missing (test)")
    with pytest.raises(BackendUnavailableError, match="'cpp' is missing"):
        kernels.normalize_minmax(_rand(0, 1, 4, 4), backend="cpp")


class _FakeCudaArray:
    """Looks like a CUDA buffer to explainrt (exports __cuda_array_interface__), holds nothing."""

    __cuda_array_interface__ = {
        "shape": (1, 4, 4), "typestr": "<f4", "data": (0, False), "version": 3
    }


def test_host_backend_rejects_device_array() -> None:
    with pytest.raises(InvalidInputError, match="maps is on a CUDA device"):
        kernels.normalize_minmax(_FakeCudaArray(), backend="numpy")


@pytest.mark.skipif("cupy" in kernels.available_backends(), reason="cupy can run here")
def test_without_cupy_device_inputs_and_cupy_backend_raise() -> None:
    with pytest.raises(BackendUnavailableError, match="cupy"):
        kernels.normalize_minmax(_FakeCudaArray())  # auto routes CUDA inputs to cupy
    with pytest.raises(BackendUnavailableError, match="cupy"):
        kernels.normalize_minmax(_rand(0, 1, 4, 4), backend="cupy")


# --- CuPy: CUDA sources (no GPU needed) and GPU runs ----------------------------------------


@pytest.mark.parametrize("entry", sorted(_cupy.KERNEL_SOURCES))
def test_cuda_source_defines_its_entry_point(entry: str) -> None:
    assert re.search(rf'extern "C" __global__ void {entry}\(', _cupy.KERNEL_SOURCES[entry])


def _nvcc() -> str | None:
    return shutil.which("nvcc") or next(iter(sorted(glob.glob("/usr/local/cuda*/bin/nvcc"))), None)


@pytest.mark.parametrize("entry", sorted(_cupy.KERNEL_SOURCES))
def test_cuda_source_compiles_to_ptx(entry: str, tmp_path) -> None:
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found on PATH or in /usr/local/cuda*/bin: CUDA sources not compiled")
    source, ptx = tmp_path / f"{entry}.cu", tmp_path / f"{entry}.ptx"
    source.write_text(_cupy.KERNEL_SOURCES[entry])
    result = subprocess.run(
        [nvcc, "--ptx", str(source), "-o", str(ptx)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert f".entry {entry}(" in ptx.read_text()


@pytest.mark.gpu
@pytest.mark.parametrize("per_pixel", [False, True])
@pytest.mark.parametrize("N, C, h, w, H, W", BATCH_CASES)
def test_cupy_matches_numpy(
    cupy, per_pixel: bool, N: int, C: int, h: int, w: int, H: int, W: int
) -> None:
    activations = _rand(12, N, C, h, w)
    weights = _weights(per_pixel, N, C, h, w)
    maps = activations[:, 0]
    calls = [
        lambda a, wt, m, backend: kernels.cam_maps(a, wt, (H, W), backend=backend),
        lambda a, wt, m, backend: kernels.resize_bilinear(m, (H, W), backend=backend),
        lambda a, wt, m, backend: kernels.normalize_minmax(m, backend=backend),
        lambda a, wt, m, backend: kernels.channel_masks(a, (H, W), backend=backend),
    ]
    on_device = [cupy.asarray(x) for x in (activations, weights, np.ascontiguousarray(maps))]
    for call in calls:
        got = call(*on_device, backend="auto")
        assert isinstance(got, cupy.ndarray)
        assert _max_diff(cupy.asnumpy(got), call(activations, weights, maps, "numpy")) <= TOL
