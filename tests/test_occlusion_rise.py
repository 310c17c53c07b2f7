"""Occlusion against captum.attr.Occlusion, RISE against a plain-PyTorch RISE, and the shared
perturbation runner (batches, memory budget, cancellation, progress, bad input)."""

from __future__ import annotations

import threading
import tracemalloc

import numpy as np
import pytest
import torch
from captum.attr import Occlusion
from scipy.ndimage import gaussian_filter

from explainrt import kernels
from explainrt.errors import ExplanationCancelled, InvalidInputError
from explainrt.methods.base import AttributionRequest
from explainrt.methods.perturbation import (
    BLUR_SIGMA,
    PERTURBATION_METHODS,
    Rise,
    perturbation_budget,
    perturbation_scores,
    reference_logits,
)

TOL = 1e-4


@pytest.fixture(scope="module")
def images(small_batch: np.ndarray) -> np.ndarray:
    return small_batch[:2]


def _captum_occlusion(model: torch.nn.Module, image: np.ndarray, target: int, window, stride, baseline) -> np.ndarray:
    base = torch.from_numpy(baseline[None]) if isinstance(baseline, np.ndarray) else baseline
    attribution = Occlusion(model).attribute(torch.from_numpy(image[None]), sliding_window_shapes=window,
                                             strides=stride, baselines=base, target=target, perturbations_per_eval=16)
    return attribution[0].detach().numpy()


@pytest.mark.parametrize(
    "window, stride, baseline",
    [((16, 16), (8, 8), 0.0), ((1, 16, 14), (1, 13, 11), 0.5)],
    ids=["all-channels", "per-channel"],
)
def test_occlusion_matches_captum(small_explainer, small_resnet, images, window, stride, baseline) -> None:
    explanation = small_explainer.explain(images, method="occlusion", targets=[3, -1], normalize=False,
                                          window=window, stride=stride, baseline=baseline, batch_size=16)
    assert explanation.maps.shape == (2, 64, 64) and explanation.maps.dtype == np.float32
    full_window = (3, *window) if len(window) == 2 else window
    full_stride = (3, *stride) if len(stride) == 2 else stride
    for index in range(2):
        theirs = _captum_occlusion(small_resnet, images[index], int(explanation.targets[index]), full_window,
                                   full_stride, baseline)
        assert np.abs(theirs).max() > 1e-2  # the comparison is not between two near-zero maps
        if len(window) == 2:  # a window over all channels: every channel's map is ours
            for channel in theirs:
                assert np.abs(channel - explanation.maps[index]).max() <= TOL
        else:
            assert np.abs(theirs.mean(axis=0) - explanation.maps[index]).max() <= TOL


def test_occlusion_blur_baseline_matches_captum_with_blurred_image(small_explainer, small_resnet, images) -> None:
    explanation = small_explainer.explain(images[:1], method="occlusion", targets=[2], normalize=False,
                                          window=(12, 12), stride=(10, 10), baseline="blur", max_batch=5)
    blurred = gaussian_filter(images[0], sigma=(0, BLUR_SIGMA, BLUR_SIGMA), mode="nearest")  # the documented blur
    theirs = _captum_occlusion(small_resnet, images[0], 2, (3, 12, 12), (3, 10, 10), blurred)
    assert np.abs(theirs[0] - explanation.maps[0]).max() <= TOL


def test_occlusion_runs_on_the_torch_backend(small_explainer, small_torch_explainer, images) -> None:
    options = dict(method="occlusion", targets=[1, 4], normalize=False, window=(20, 20), stride=(12, 12))
    ours = small_explainer.explain(images, **options).maps
    assert np.abs(small_torch_explainer.explain(images, **options).maps - ours).max() <= TOL


def test_occlusion_normalized_maps_show_positive_evidence(small_explainer, images) -> None:
    explanation = small_explainer.explain(images, method="occlusion", window=(16, 16), stride=(8, 8))
    assert explanation.maps.min() >= 0 and explanation.maps.max() <= 1


def _torch_rise(model: torch.nn.Module, image: np.ndarray, target: int, n_masks: int, grid: int, p: float,
                seed: int) -> np.ndarray:
    """Plain-PyTorch RISE (the reference code's explain step) over explainrt's masks."""
    masks = torch.from_numpy(kernels.rise_masks(seed, 0, n_masks, grid, p, image.shape[1:], backend="numpy"))
    with torch.no_grad():
        probabilities = torch.softmax(model(torch.from_numpy(image)[None] * masks[:, None]).double(), dim=1)
    saliency = probabilities[:, target] @ masks.double().reshape(n_masks, -1)
    return (saliency / n_masks / p).reshape(image.shape[1:]).numpy()


def test_rise_matches_plain_pytorch_rise(small_explainer, small_resnet, images) -> None:
    explanation = small_explainer.explain(images, method="rise", targets=[5, -1], normalize=False, n_masks=96,
                                          grid=5, p=0.4, seed=3, batch_size=32)
    for index in range(2):
        theirs = _torch_rise(small_resnet, images[index], int(explanation.targets[index]), 96, 5, 0.4, 3)
        assert np.abs(theirs - explanation.maps[index]).max() <= TOL * max(1.0, float(np.abs(theirs).max()))


def test_rise_does_not_depend_on_batching(small_explainer, images) -> None:
    options = dict(method="rise", targets=[0], normalize=False, n_masks=50, grid=4, seed=1)
    big = small_explainer.explain(images[:1], batch_size=64, **options).maps
    small = small_explainer.explain(images[:1], batch_size=64, max_batch=7, **options).maps
    assert np.abs(big - small).max() <= 1e-6


def test_rise_memory_does_not_grow_with_n_masks(small_explainer, images) -> None:
    """Python-side peak (tracemalloc: NumPy buffers, masks) at N=40 and N=400 masks."""
    peaks = []
    for n_masks in (40, 400):
        tracemalloc.start()
        small_explainer.explain(images[:1], method="rise", normalize=False, n_masks=n_masks, batch_size=20)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    one_batch = 20 * 3 * 64 * 64 * 4
    assert peaks[1] < peaks[0] + one_batch, peaks  # 10x the masks, not even one batch more


# --- the runner ----------------------------------------------------------------------------------


class _CountingSession:
    """Wraps a session: records each runtime batch size; sets `cancel` after `cancel_after` calls."""

    def __init__(self, session, cancel: threading.Event | None = None, cancel_after: int = 10**9) -> None:
        self.session, self.cancel, self.cancel_after, self.sizes = session, cancel, cancel_after, []

    def logits(self, images: np.ndarray) -> np.ndarray:
        self.sizes.append(images.shape[0])
        if self.cancel is not None and len(self.sizes) >= self.cancel_after:
            self.cancel.set()
        return self.session.logits(images)


def _request(session, images, options=None, cancel=None, batch_size=8, progress=False) -> AttributionRequest:
    return AttributionRequest(images, np.array([-1] * len(images)), session, batch_size, False, options or {},
                              cancel, progress)


def test_runner_scores_equal_direct_logits_and_respect_the_budget(small_explainer, images) -> None:
    session = _CountingSession(small_explainer.session)
    request = _request(session, images, {"max_batch": 3})
    masks = kernels.rise_masks(0, 0, 10, 4, 0.5, (64, 64))
    scores = perturbation_scores(request, 1, [masks[:7], masks[7:]], 10, np.array([2, 7]), baseline=0.25)
    direct = small_explainer.session.logits(kernels.apply_masks(images[1], masks, 0.25))[:, [2, 7]]
    assert np.abs(scores - direct).max() <= 1e-5
    assert session.sizes == [3, 3, 1, 3]


def test_reference_logits_resolve_negative_targets(small_explainer, images) -> None:
    logits, targets = reference_logits(_request(small_explainer.session, images))
    assert np.array_equal(targets, logits.argmax(axis=1))


def test_memory_budget_caps_the_batch(small_explainer, images) -> None:
    per_copy_mb = (3 + 1) * 64 * 64 * 4 / 2**20
    assert perturbation_budget(_request(None, images, {"memory_mb": 5 * per_copy_mb})) == 5
    assert perturbation_budget(_request(None, images, {"memory_mb": 100, "max_batch": 4})) == 4
    with pytest.raises(InvalidInputError, match="memory_mb=0.001 is below one perturbed copy"):
        perturbation_budget(_request(None, images, {"memory_mb": 0.001}))
    with pytest.raises(InvalidInputError, match="method 'rise': max_batch must be an integer >= 1"):
        Rise().check_options({"max_batch": 0})  # the declaration checks the value; the budget reads it


def test_runner_checks_the_announced_total(small_explainer, images) -> None:
    with pytest.raises(InvalidInputError, match="held 4 masks, not the total=5"):
        perturbation_scores(_request(small_explainer.session, images), 0, [np.ones((4, 64, 64), np.float32)], 5,
                            np.array([0]))


@pytest.mark.parametrize("method", [m.name for m in PERTURBATION_METHODS])
def test_perturbation_methods_stop_when_cancelled(small_explainer, images, method: str) -> None:
    cancel = threading.Event()
    session = _CountingSession(small_explainer.session, cancel, cancel_after=3)
    request = _request(session, images, {"n_masks": 100} if method == "rise" else {}, cancel, batch_size=4)
    method_object = next(m for m in PERTURBATION_METHODS if m.name == method)
    with pytest.raises(ExplanationCancelled):
        method_object.attribute(request)
    assert len(session.sizes) == 3  # no runtime call after the cancelling one


def test_progress_bar_is_shown_when_asked(small_explainer, images, capsys, monkeypatch, caplog) -> None:
    from explainrt import progress

    monkeypatch.setattr(progress, "on_terminal", lambda: True)  # a bar on a terminal
    Rise().attribute(_request(small_explainer.session, images[:1], {"n_masks": 16}, progress=True))
    assert "rise (image 0)" in capsys.readouterr().err
    monkeypatch.setattr(progress, "on_terminal", lambda: False)  # log lines elsewhere (-v)
    with caplog.at_level("INFO", logger="explainrt"):
        Rise().attribute(_request(small_explainer.session, images[:1], {"n_masks": 16}, progress=True))
    assert "rise (image 0): started (16 copies)" in caplog.messages
    Rise().attribute(_request(small_explainer.session, images[:1], {"n_masks": 16}, progress=False))
    assert not capsys.readouterr().err


@pytest.mark.parametrize(
    "options, match",
    [
        ({"method": "occlusion", "window": (65, 8)}, "window .* is larger than the image"),
        ({"method": "occlusion", "window": (8, 8), "stride": 0}, "stride"),
        ({"method": "occlusion", "window": (8, 8), "stride": (4, 0)}, "stride"),
        ({"method": "occlusion", "baseline": "noise"}, "baseline must be a finite number or 'blur'"),
        ({"method": "rise", "p": 1.5}, r"method 'rise': p must be a finite number in \(0, 1\), got 1.5"),
        ({"method": "rise", "p": 0}, r"method 'rise': p must be a finite number in \(0, 1\), got 0"),
        ({"method": "rise", "n_masks": 0}, "n_masks must be an integer >= 1"),
        ({"method": "rise", "grid": 0}, "grid must be an integer >= 1"),
        ({"method": "rise", "seed": -1}, r"seed must be an integer in 0\.\.2\^64 - 1, got -1"),
        ({"method": "rise", "memory_mb": -2}, "memory_mb must be a finite number > 0 or None, got -2"),
    ],
)
def test_bad_options_name_the_parameter(small_explainer, images, options, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        small_explainer.explain(images, **options)


def test_mixed_image_sizes_are_rejected(small_explainer) -> None:
    mixed = [np.zeros((3, 64, 64), np.float32), np.zeros((3, 32, 32), np.float32)]
    with pytest.raises(InvalidInputError, match="images have mixed sizes"):
        small_explainer.explain(mixed, method="rise")
    with pytest.raises(InvalidInputError, match="expects"):
        small_explainer.explain(np.zeros((2, 3, 32, 32), np.float32), method="occlusion")
