"""Perturbation kernels: NumPy against independent references (skimage's resize for RISE, plain
loops for occlusion windows, direct formulas), C++ and CuPy against NumPy, input validation."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.transform import resize

import explainrt.kernels as kernels
from explainrt.errors import InvalidInputError
from explainrt.kernels import _cupy
from explainrt.kernels import _numpy as reference

TOL = 1e-6

# (H, W, grid): square, odd, non-square, grid 1, grid larger than the cells.
RISE_CASES = [(10, 12, 4), (64, 64, 7), (33, 20, 5), (8, 8, 1), (9, 9, 2), (5, 7, 6)]

# (C, H, W, window, stride): all channels, per-channel blocks, cropped last windows, 1-pixel.
OCCLUSION_CASES = [
    (3, 8, 8, (3, 3), (2, 2)),
    (3, 9, 11, (2, 3, 4), (1, 2, 3)),
    (1, 7, 5, (7, 5), (1, 1)),
    (2, 6, 6, (1, 1, 1), (1, 1, 1)),
    (3, 10, 10, 4, 3),
]


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _max_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max(initial=0.0))


def _host_backends() -> list[str]:
    return [b for b in ("numpy", "cpp") if b in kernels.available_backends()]


# --- NumPy reference against independent definitions --------------------------------------------


def test_counter_uniform_is_uniform_and_depends_only_on_seed_index_slot() -> None:
    u = reference.counter_uniform(3, np.arange(20000)[:, None], np.arange(5)[None, :])
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    assert np.array_equal(u[123], reference.counter_uniform(3, np.array(123), np.arange(5)))
    assert not np.array_equal(u[:10], reference.counter_uniform(4, np.arange(10)[:, None], np.arange(5)[None, :]))


@pytest.mark.parametrize("H, W, grid", RISE_CASES)
def test_numpy_rise_masks_match_reference_code(H: int, W: int, grid: int) -> None:
    """RISE's generate_masks: skimage resize(order=1, mode='reflect') of the grid, cropped at the shift."""
    seed, first, count, p = 5, 3, 6, 0.4
    masks = kernels.rise_masks(seed, first, count, grid, p, (H, W), backend="numpy")
    cells, u_y, u_x = reference.rise_grids(seed, first, count, grid, p)
    cell_h, cell_w = -(-H // grid), -(-W // grid)
    for i in range(count):
        up = resize(cells[i], ((grid + 1) * cell_h, (grid + 1) * cell_w), order=1, mode="reflect",
                    anti_aliasing=False)
        dy, dx = int(u_y[i] * cell_h), int(u_x[i] * cell_w)
        assert dy < cell_h and dx < cell_w
        assert _max_diff(masks[i], up[dy : dy + H, dx : dx + W]) <= TOL


def test_rise_masks_are_counter_based_and_keep_p() -> None:
    whole = kernels.rise_masks(9, 0, 40, 5, 0.3, (16, 16), backend="numpy")
    parts = [kernels.rise_masks(9, first, 10, 5, 0.3, (16, 16), backend="numpy") for first in range(0, 40, 10)]
    assert np.array_equal(whole, np.concatenate(parts))
    cells, _, _ = reference.rise_grids(9, 0, 4000, 5, 0.3)
    assert abs(cells.mean() - 0.3) < 0.01
    assert not np.array_equal(whole, kernels.rise_masks(10, 0, 40, 5, 0.3, (16, 16), backend="numpy"))


def _occlusion_loop(shape, window, stride) -> np.ndarray:
    """Keep masks by Captum's rule, written as loops: offsets k * stride, windows cropped at the edge."""
    positions = [int(np.ceil((size - span) / step)) + 1 for size, span, step in zip(shape, window, stride)]
    masks = []
    for c in range(positions[0]):
        for y in range(positions[1]):
            for x in range(positions[2]):
                keep = np.ones(shape, np.float32)
                keep[c * stride[0] : c * stride[0] + window[0], y * stride[1] : y * stride[1] + window[1],
                     x * stride[2] : x * stride[2] + window[2]] = 0
                masks.append(keep)
    return np.stack(masks)


@pytest.mark.parametrize("C, H, W, window, stride", OCCLUSION_CASES)
def test_occlusion_masks_match_loops(C: int, H: int, W: int, window, stride) -> None:
    grid = kernels.occlusion_grid((C, H, W), window, stride)
    expected = _occlusion_loop((C, H, W), grid.window, grid.stride)
    assert grid.total == expected.shape[0]
    for backend in _host_backends():
        got = kernels.occlusion_masks((C, H, W), window, stride, 0, grid.total, backend=backend)
        assert np.array_equal(got, expected)
        tail = kernels.occlusion_masks((C, H, W), window, stride, 1, grid.total - 1, backend=backend)
        assert np.array_equal(tail, expected[1:])


def test_apply_masks_is_captums_ablation_formula() -> None:
    image, masks = _rng(0).standard_normal((3, 5, 6), np.float32), _rng(1).random((4, 5, 6), np.float32)
    per_channel = _rng(2).random((4, 3, 5, 6), np.float32)
    baseline = _rng(3).standard_normal((3, 5, 6), np.float32)
    one = np.float32(1)
    assert np.array_equal(kernels.apply_masks(image, masks, 0.25, backend="numpy"),
                          image * masks[:, None] + np.float32(0.25) * (one - masks[:, None]))
    assert np.array_equal(kernels.apply_masks(image, per_channel, baseline, backend="numpy"),
                          image * per_channel + baseline * (one - per_channel))
    assert np.array_equal(kernels.apply_masks(image, masks, backend="numpy"), image * masks[:, None])


def test_segment_masks_and_accumulate_scores_match_direct_formulas() -> None:
    segments = _rng(4).integers(0, 6, (7, 9))
    on_off = (_rng(5).random((5, 6)) > 0.5).astype(np.float32)
    masks = kernels.segment_masks(segments, on_off, backend="numpy")
    for b in range(5):
        for y in range(7):
            for x in range(9):
                assert masks[b, y, x] == on_off[b, segments[y, x]]
    scores = _rng(6).standard_normal((5, 3), np.float32)
    expected = np.einsum("bt,bhw->thw", scores.astype(np.float64), masks.astype(np.float64))
    assert _max_diff(kernels.accumulate_scores(scores, masks, backend="numpy"), expected) <= 1e-5


# --- C++ against NumPy ----------------------------------------------------------------------------


def test_cpp_backend_is_built() -> None:
    assert "cpp" in kernels.available_backends()


def _kernel_calls(rng: np.random.Generator) -> dict[str, object]:
    """One call per perturbation kernel, as a function of the backend name."""
    image = rng.standard_normal((3, 17, 13), np.float32)
    masks = rng.random((6, 17, 13), np.float32)
    per_channel = rng.random((6, 3, 17, 13), np.float32)
    blurred = rng.standard_normal((3, 17, 13), np.float32)
    segments = rng.integers(0, 9, (17, 13)).astype(np.int64)
    on_off = (rng.random((6, 9)) > 0.5).astype(np.float32)
    scores = rng.standard_normal((6, 4), np.float32)
    return {
        "apply_masks": lambda b: kernels.apply_masks(image, masks, -0.7, backend=b),
        "apply_masks_per_channel": lambda b: kernels.apply_masks(image, per_channel, blurred, backend=b),
        "segment_masks": lambda b: kernels.segment_masks(segments, on_off, backend=b),
        "accumulate_scores": lambda b: kernels.accumulate_scores(scores, masks, backend=b),
        "rise_masks": lambda b: kernels.rise_masks(2**63 + 11, 100, 7, 6, 0.55, (29, 31), backend=b),
        "rise_masks_grid_1": lambda b: kernels.rise_masks(1, 0, 3, 1, 0.5, (4, 5), backend=b),
        "occlusion_masks": lambda b: kernels.occlusion_masks((3, 17, 13), (2, 5, 4), (1, 3, 2), 4, 20, backend=b),
    }


@pytest.mark.parametrize("call", sorted(_kernel_calls(_rng(0))))
def test_cpp_matches_numpy(call: str) -> None:
    run = _kernel_calls(_rng(7))[call]
    expected, got = run("numpy"), run("cpp")
    assert got.dtype == np.float32 and got.flags.c_contiguous
    tol = 1e-5 if call == "accumulate_scores" else 0.0  # float64 vs sgemm accumulation; the rest is exact
    assert _max_diff(got, expected) <= tol


def test_cpp_large_batches_match() -> None:
    """Large batches (RISE masks and accumulation above the OpenMP grain run in parallel) match NumPy."""
    masks = kernels.rise_masks(3, 0, 64, 7, 0.5, (224, 224), backend="cpp")
    assert np.array_equal(masks, kernels.rise_masks(3, 0, 64, 7, 0.5, (224, 224), backend="numpy"))
    scores = _rng(8).random((64, 2), np.float32)
    assert _max_diff(kernels.accumulate_scores(scores, masks, backend="cpp"),
                     kernels.accumulate_scores(scores, masks, backend="numpy")) <= 1e-4
    image = _rng(9).standard_normal((3, 224, 224), np.float32)
    assert np.array_equal(kernels.apply_masks(image, masks, 0.1, backend="cpp"),
                          kernels.apply_masks(image, masks, 0.1, backend="numpy"))


# --- input validation -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "cpp"])
def test_bad_perturbation_inputs_name_the_parameter(backend: str) -> None:
    image, masks = np.zeros((3, 4, 5), np.float32), np.ones((2, 4, 5), np.float32)
    cases = [
        (lambda: kernels.apply_masks(image[0], masks, backend=backend), r"image must be .*\(4, 5\)"),
        (lambda: kernels.apply_masks(image, masks[:, :3], backend=backend), r"masks must be .*\(2, 3, 5\)"),
        (lambda: kernels.apply_masks(image, np.ones((2, 2, 4, 5), np.float32), backend=backend), "masks must be"),
        (lambda: kernels.apply_masks(image, masks, np.zeros((3, 4, 4)), backend=backend), r"baseline .*\(3, 4, 4\)"),
        (lambda: kernels.segment_masks(np.zeros((4, 5)), masks[:, 0], backend=backend), "segments must be an integer"),
        (lambda: kernels.segment_masks(np.full((4, 5), 5), np.ones((2, 5)), backend=backend), r"labels 5\.\.5"),
        (lambda: kernels.segment_masks(np.full((4, 5), -1), np.ones((2, 5)), backend=backend), "segments labels"),
        (lambda: kernels.accumulate_scores(np.ones((3, 1)), masks, backend=backend), r"scores must be .*\(3, 1\)"),
        (lambda: kernels.accumulate_scores(np.ones((2, 1)), image[0], backend=backend), "masks must be a"),
        (lambda: kernels.rise_masks(0, 0, 1, 0, 0.5, (8, 8), backend=backend), "grid must be an integer >= 1"),
        (lambda: kernels.rise_masks(0, 0, 1, 2, 1.0, (8, 8), backend=backend), r"p \(the probability"),
        (lambda: kernels.rise_masks(0, 0, 1, 2, 0.0, (8, 8), backend=backend), r"p \(the probability"),
        (lambda: kernels.rise_masks(-1, 0, 1, 2, 0.5, (8, 8), backend=backend), "seed must be"),
        (lambda: kernels.rise_masks(0, 0, -1, 2, 0.5, (8, 8), backend=backend), "count must be"),
        (lambda: kernels.rise_masks(0, 0, 1, 2, 0.5, (0, 8), backend=backend), "out_hw"),
        (lambda: kernels.occlusion_masks((3, 4, 5), (5, 5), (1, 1), 0, 1, backend=backend), "larger than the image"),
        (lambda: kernels.occlusion_masks((3, 4, 5), (2, 2), (0, 1), 0, 1, backend=backend), "stride"),
        (lambda: kernels.occlusion_masks((3, 4, 5), (2, 2), (3, 1), 0, 1, backend=backend), "must not exceed window"),
        (lambda: kernels.occlusion_masks((3, 4, 5), (2, 2, 2, 2), 1, 0, 1, backend=backend), "window must be"),
        (lambda: kernels.occlusion_masks((3, 4, 5), (2, 2), 1, 0, 13, backend=backend), "count"),
    ]
    for call, match in cases:
        with pytest.raises(InvalidInputError, match=match):
            call()


def test_empty_batches_give_empty_outputs() -> None:
    for backend in _host_backends():
        assert kernels.rise_masks(0, 5, 0, 3, 0.5, (6, 7), backend=backend).shape == (0, 6, 7)
        assert kernels.occlusion_masks((1, 6, 7), 3, 3, 6, 0, backend=backend).shape == (0, 1, 6, 7)
        empty = np.zeros((0, 6, 7), np.float32)
        assert kernels.apply_masks(np.ones((2, 6, 7), np.float32), empty, backend=backend).shape == (0, 2, 6, 7)
        assert kernels.accumulate_scores(np.zeros((0, 2), np.float32), empty, backend=backend).shape == (2, 6, 7)


# --- CuPy: CUDA sources (no GPU needed) and GPU runs ----------------------------------------------

PERTURBATION_ENTRIES = sorted(set(_cupy.KERNEL_SOURCES) & set(_cupy.PERTURBATION_KERNELS))


def test_every_perturbation_kernel_has_a_cuda_source() -> None:
    # each source is checked for its entry point and compiled to PTX by tests/test_kernels.py
    assert PERTURBATION_ENTRIES == sorted(_cupy.PERTURBATION_KERNELS)


@pytest.mark.gpu
@pytest.mark.parametrize("call", sorted(_kernel_calls(_rng(0))))
def test_cupy_matches_numpy(cupy, call: str) -> None:
    run = _kernel_calls(_rng(7))[call]
    got = run("cupy")
    assert isinstance(got, cupy.ndarray)
    tol = 1e-5 if call == "accumulate_scores" else 0.0
    assert _max_diff(cupy.asnumpy(got), run("numpy")) <= tol


@pytest.mark.gpu
def test_cupy_auto_keeps_device_inputs_on_the_device(cupy) -> None:
    image = cupy.asarray(_rng(10).standard_normal((3, 8, 8), np.float32))
    masks = kernels.rise_masks(0, 0, 4, 3, 0.5, (8, 8), backend="cupy")
    copies = kernels.apply_masks(image, masks, 0.0)
    assert isinstance(copies, cupy.ndarray)
    assert _max_diff(cupy.asnumpy(copies), kernels.apply_masks(cupy.asnumpy(image), cupy.asnumpy(masks),
                                                                backend="numpy")) == 0.0
