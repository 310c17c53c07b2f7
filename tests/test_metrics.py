"""The faithfulness metrics on hand-made cases with known answers and against independent references.

- deletion / insertion: a model that reads only a known region (AUC of a perfect and of a reversed
  map), and RISE's own evaluation loop (``CausalMetric.single_run``, re-written here in PyTorch on
  the small ResNet: a pixel step per iteration, softmax, zero substrate / Gaussian blur);
- pointing games: synthetic maps and boxes with hits, misses and exact energy shares;
- the pasted data set: deterministic, boxes inside the image, box mapping through the
  preprocessing checked against ``Preprocessing.prepare`` on a painted box;
- ROAD against pytorch-grad-cam's implementation (see ``test_road_matches_pytorch_grad_cam``);
- Adebayo's cascading randomisation on the small ResNet, and by value against an independent
  PyTorch implementation (``test_cascading_randomization_matches_an_independent_torch_cascade``):
  the torch modules re-drawn top-down with the documented generator, pytorch-grad-cam's GradCAM on
  each randomised torch model, scipy's Spearman and scikit-image's SSIM; no ONNX, no explainrt.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from scipy.ndimage import gaussian_filter

from explainrt import Explainer
from explainrt.errors import InvalidInputError, InvalidModelError, InvalidTargetError
from explainrt.export.spec import original_model
from explainrt.metrics import (
    blur,
    cascading_randomization,
    causal_curves,
    energy_pointing_game,
    input_box,
    noisy_linear_impute,
    pasted_dataset,
    pointing_game,
    randomized_model,
    road_curves,
    trapezoid_auc,
    weighted_nodes,
)
from explainrt.metrics.curves import probabilities
from explainrt.metrics.evaluate import evaluate
from explainrt.metrics.pasted import MARGIN
from explainrt.metrics.road import removed_pixels
from explainrt.targets import Similarity

SIDE = 16
REGION = (slice(2, 6), slice(9, 13))  # the 16 pixels the region model reads


class RegionModel:
    """Two classes; class 0's logit is 10 * (mean of the region's pixels, all channels) - 5.

    With the region at 1 the class-0 probability is sigmoid(5) = 0.993; at 0 it is sigmoid(-5).
    Counts its runtime calls.
    """

    def __init__(self) -> None:
        self.calls = 0

    def logits(self, images: np.ndarray) -> np.ndarray:
        self.calls += 1
        score = 10 * images[:, :, REGION[0], REGION[1]].mean(axis=(1, 2, 3)) - 5
        return np.stack([score, np.zeros_like(score)], axis=1).astype(np.float32)


def _region_case(count: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images that are 1 on the region and 0 elsewhere; a perfect map (region first) and its reverse."""
    images = np.zeros((count, 3, SIDE, SIDE), np.float32)
    images[:, :, REGION[0], REGION[1]] = 1
    noise = np.random.default_rng(0).random((count, SIDE, SIDE)).astype(np.float32) * 0.5
    perfect = noise.copy()
    perfect[:, REGION[0], REGION[1]] += 1
    return images, perfect, -perfect


def test_trapezoid_auc_known_curves() -> None:
    fractions = np.linspace(0, 1, 11)
    assert trapezoid_auc(np.ones(11), fractions) == pytest.approx(1.0)
    assert trapezoid_auc(1 - fractions, fractions) == pytest.approx(0.5)
    scores = np.random.default_rng(1).random(11)
    rise_auc = (scores.sum() - scores[0] / 2 - scores[-1] / 2) / (scores.size - 1)  # RISE's auc(arr)
    assert trapezoid_auc(scores, fractions) == pytest.approx(rise_auc)


def test_deletion_and_insertion_of_a_perfect_map_on_a_region_model() -> None:
    images, perfect, reversed_ = _region_case()
    targets = np.zeros(2, np.int64)
    model = RegionModel()
    deletion = causal_curves(model, images, perfect, targets, "deletion", steps=64, batch_size=40)
    # 2 images x 65 steps in batches of 40: 4 runtime calls
    assert model.calls == 4
    assert deletion.scores.shape == (2, 65) and deletion.fractions[[0, -1]].tolist() == [0.0, 1.0]
    assert deletion.scores[:, 0] == pytest.approx(1 / (1 + np.exp(-5)))
    assert deletion.scores[:, 4:].max() < 0.01  # the region (16 of 256 pixels) is gone after 4 steps
    assert (deletion.auc < 0.04).all()
    assert (causal_curves(model, images, reversed_, targets, "deletion", steps=64).auc > 0.9).all()
    insertion = causal_curves(model, images, perfect, targets, "insertion", steps=64)
    assert insertion.scores[:, 0].max() < 0.05  # blurred start
    assert (insertion.auc > 0.95).all()
    assert (causal_curves(model, images, reversed_, targets, "insertion", steps=64).auc < 0.1).all()


def _rise_gkern(size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """RISE's gkern: a Gaussian-smoothed delta, one kernel per channel (conv2d weights [3, 3, k, k])."""
    delta = np.zeros((size, size))
    delta[size // 2, size // 2] = 1
    kernel = np.zeros((3, 3, size, size), np.float32)
    for channel in range(3):
        kernel[channel, channel] = gaussian_filter(delta, sigma)
    return torch.from_numpy(kernel)


def _rise_single_run(model: torch.nn.Module, image: torch.Tensor, saliency: np.ndarray, mode: str, step: int,
                     target: int) -> np.ndarray:
    """RISE's CausalMetric.single_run, re-written: ``step`` pixels per iteration, softmax score of ``target``."""
    pixels = saliency.size
    n_steps = (pixels + step - 1) // step
    if mode == "del":
        start, finish = image.clone(), torch.zeros_like(image)
    else:
        start, finish = torch.nn.functional.conv2d(image, _rise_gkern(), padding=5), image.clone()
    order = np.flip(np.argsort(saliency.reshape(-1, pixels), axis=1), axis=-1)
    scores = np.empty(n_steps + 1)
    with torch.no_grad():
        for i in range(n_steps + 1):
            scores[i] = torch.softmax(model(start), dim=1)[0, target].item()
            if i < n_steps:
                coords = order[:, step * i : step * (i + 1)]
                start.numpy().reshape(1, 3, pixels)[0, :, coords] = finish.numpy().reshape(1, 3, pixels)[0, :, coords]
    return scores


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_curves_match_rise_reference_loop(mode: str, small_resnet, small_explainer, small_batch) -> None:  # noqa: ANN001
    maps = np.random.default_rng(2).random((2, 64, 64)).astype(np.float32)  # distinct values: one order
    images = small_batch[:2]
    targets = np.array([3, 7])
    curves = causal_curves(small_explainer.session, images, maps, targets, mode, steps=8, batch_size=6)
    for index in range(2):
        reference = _rise_single_run(small_resnet, torch.from_numpy(images[index : index + 1].copy()), maps[index],
                                     mode[:3], 64 * 64 // 8, int(targets[index]))
        np.testing.assert_allclose(curves.scores[index], reference, atol=2e-5)
        rise_auc = (reference.sum() - reference[0] / 2 - reference[-1] / 2) / (reference.size - 1)
        assert curves.auc[index] == pytest.approx(rise_auc, abs=2e-5)


def test_blur_is_rise_gaussian_with_zero_padding(small_batch) -> None:  # noqa: ANN001
    reference = torch.nn.functional.conv2d(torch.from_numpy(small_batch), _rise_gkern(), padding=5).numpy()
    np.testing.assert_allclose(blur(small_batch), reference, atol=1e-5)


def test_causal_curves_bad_input() -> None:
    images, perfect, _ = _region_case()
    targets = np.zeros(2, np.int64)
    with pytest.raises(InvalidInputError, match="steps must be an integer >= 1, got 0"):
        causal_curves(RegionModel(), images, perfect, targets, "deletion", steps=0)
    with pytest.raises(InvalidInputError, match="mode must be one of"):
        causal_curves(RegionModel(), images, perfect, targets, "removal")
    with pytest.raises(InvalidInputError, match=r"maps must have shape \[N, H, W\]"):
        causal_curves(RegionModel(), images, perfect[:, :8], targets, "deletion")
    with pytest.raises(InvalidInputError, match="targets must hold one class per image"):
        causal_curves(RegionModel(), images, perfect, targets[:1], "deletion")
    with pytest.raises(InvalidTargetError, match=r"class indices >= 0 .* got \[0, -1\]"):
        causal_curves(RegionModel(), images, perfect, np.array([0, -1]), "deletion")
    model = RegionModel()
    with pytest.raises(InvalidTargetError, match=r"targets \[2\] name classes beyond the model's 2"):
        causal_curves(model, images, perfect, np.array([0, 2]), "insertion", steps=10, batch_size=100)
    assert model.calls == 1  # refused on the first batch's scores


# -- pointing games ---------------------------------------------------------------------------------
def _bump(center_xy: tuple[int, int], shape: tuple[int, int] = (100, 120)) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return np.exp(-((cols - center_xy[0]) ** 2 + (rows - center_xy[1]) ** 2) / 50.0)


def test_pointing_game_hits_and_misses() -> None:
    box = [40, 30, 70, 60]  # columns 40..69, rows 30..59
    maps = np.stack([_bump((55, 45)), _bump((80, 45)), _bump((69 + 12, 59 + 9)), _bump((5, 5))])
    boxes = np.array([box] * 4)
    # inside; 11 px right of the box; 15 px away diagonally (12, 9); far away
    assert pointing_game(maps, boxes).tolist() == [True, True, True, False]
    assert pointing_game(maps, boxes, tolerance=10).tolist() == [True, False, False, False]
    assert pointing_game(maps, boxes, tolerance=0).tolist() == [True, False, False, False]


def test_energy_pointing_game_is_the_exact_share_inside_the_box() -> None:
    maps = np.zeros((4, 10, 20))
    maps[0] = 1  # uniform: the box's area share
    maps[1, 2:4, 5:9] = 3  # all energy inside
    maps[2, 0, 0] = 1  # all energy outside
    maps[3, 2:4, 5:9] = 1  # negative values are no energy
    maps[3, 0, :] = -5
    maps[3, 9, 0] = 1
    boxes = np.array([[5, 2, 9, 4]] * 4)
    expected = [8 / 200, 1.0, 0.0, 8 / 9]
    np.testing.assert_allclose(energy_pointing_game(maps, boxes), expected)
    assert energy_pointing_game(np.zeros((1, 10, 20)), boxes[:1]).tolist() == [0.0]


def test_pointing_bad_input() -> None:
    maps = np.zeros((1, 10, 20))
    with pytest.raises(InvalidInputError, match=r"box \[5, 2, 25, 4\] of image 0 is empty or outside"):
        pointing_game(maps, np.array([[5, 2, 25, 4]]))
    with pytest.raises(InvalidInputError, match="is empty or outside"):
        energy_pointing_game(maps, np.array([[5, 4, 9, 4]]))
    with pytest.raises(InvalidInputError, match=r"boxes must have shape \[N, 4\]"):
        pointing_game(maps, np.array([[1, 2, 3]]))
    with pytest.raises(InvalidInputError, match="tolerance must be"):
        pointing_game(maps, np.array([[5, 2, 9, 4]]), tolerance=-1)


# -- the pasted data set ----------------------------------------------------------------------------
def test_pasted_dataset_is_deterministic_with_boxes_inside() -> None:
    first, again, other = pasted_dataset(6, seed=3), pasted_dataset(6, seed=3), pasted_dataset(6, seed=4)
    for a, b in zip(first, again, strict=True):
        assert a.name == b.name and a.box == b.box and np.array_equal(a.image, b.image)
    assert [s.box for s in first] != [s.box for s in other]
    margin = int(np.ceil(256 * MARGIN))
    for sample in first:
        x0, y0, x1, y1 = sample.box
        assert sample.image.shape == (256, 256, 3) and sample.image.dtype == np.uint8
        assert margin <= x0 < x1 <= 256 - margin and margin <= y0 < y1 <= 256 - margin
    assert {s.name.split("-")[-1] for s in first} == {"cat", "cup"}
    with pytest.raises(InvalidInputError, match="count must be an integer >= 1, got 0"):
        pasted_dataset(0)


@pytest.mark.parametrize("image_hw", [(256, 256), (300, 451), (480, 320)])
def test_input_box_follows_the_preprocessing(image_hw: tuple[int, int]) -> None:
    from explainrt.models.default import DEFAULT_PREPROCESSING

    box = (image_hw[1] // 4, image_hw[0] // 3, image_hw[1] * 3 // 4, image_hw[0] * 2 // 3)
    painted = np.zeros((*image_hw, 3), np.uint8)
    painted[box[1] : box[3], box[0] : box[2]] = 255
    _, crops = DEFAULT_PREPROCESSING.prepare([painted])
    rows, cols = np.nonzero(crops[0, :, :, 0] > 127)
    seen = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    mapped = input_box(box, image_hw, DEFAULT_PREPROCESSING)
    np.testing.assert_allclose(mapped, seen, atol=1)


def test_default_model_predicts_the_pasted_objects(default_explainer) -> None:  # noqa: ANN001
    samples = pasted_dataset(8)
    logits = default_explainer.predict([s.image for s in samples])
    hits = [int(row.argmax()) in s.classes for row, s in zip(logits, samples)]
    assert np.mean(hits) >= 0.75, hits


# -- ROAD -------------------------------------------------------------------------------------------
def test_road_matches_pytorch_grad_cam(small_resnet, small_explainer, small_batch) -> None:  # noqa: ANN001
    """Compared with pytorch_grad_cam.metrics.road on the same maps and percentages, noise disabled:
    (1) the removed pixels and the imputed images of MoRF (RemoveMostRelevantFirst) and LeRF
    (RemoveLeastRelevantFirst) with NoisyLinearImputer(noise=0); pytorch-grad-cam's ``percentile``
    is the share of pixels *kept*, so our removal of p % is its percentile 100 - p; (2) the score
    differences PerturbationConfidenceMetric returns (softmax probability after imputation minus
    before, ClassifierOutputSoftmaxTarget) against ours, with our ONNX Runtime session against its
    torch model. Noise: ours is seeded, theirs uses torch.randn; with noise 0 both are exact.
    Pixel counts: we remove round(p % of H * W) pixels, pytorch-grad-cam those >= np.percentile
    (interpolated); on 64 x 64 maps both agree at 10, 50 and 90 % (at 20 % its threshold lands on a
    pixel and it removes one more)."""
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        PerturbationConfidenceMetric,
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    maps = np.random.default_rng(5).random((3, 64, 64)).astype(np.float32)
    targets = np.array([1, 4, 8])
    images = torch.from_numpy(small_batch)
    for order, perturbation in (("morf", RemoveMostRelevantFirst), ("lerf", RemoveLeastRelevantFirst)):
        curves = road_curves(small_explainer.session, small_batch, maps, targets, order, (10, 50, 90), noise=0.0)
        for column, percentage in enumerate((10, 50, 90)):
            metric = PerturbationConfidenceMetric(perturbation(100 - percentage, NoisyLinearImputer(noise=0.0)))
            differences, imputed = metric(images, maps, [ClassifierOutputSoftmaxTarget(int(t)) for t in targets],
                                          small_resnet, return_visualization=True)
            np.testing.assert_allclose(curves.scores[:, column] - curves.original, differences, atol=1e-4)
            for index in range(3):
                removed = removed_pixels(maps[index], order, percentage)
                expected = imputed[index].numpy()
                assert np.array_equal(removed, (expected != small_batch[index]).any(axis=0))
                ours = noisy_linear_impute(small_batch[index], ~removed, noise=0.0)
                np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_road_noise_is_seeded_and_only_on_removed_pixels(small_batch) -> None:  # noqa: ANN001
    keep = np.random.default_rng(6).random((64, 64)) > 0.3
    clean = noisy_linear_impute(small_batch[0], keep, noise=0.0)
    noisy = noisy_linear_impute(small_batch[0], keep, noise=0.5, rng=np.random.default_rng(1))
    again = noisy_linear_impute(small_batch[0], keep, noise=0.5, rng=np.random.default_rng(1))
    assert np.array_equal(noisy, again)
    assert np.array_equal(noisy[:, keep], small_batch[0][:, keep])
    assert np.std(noisy[:, ~keep] - clean[:, ~keep]) == pytest.approx(0.5, rel=0.05)


def test_road_bad_input(small_explainer, small_batch) -> None:  # noqa: ANN001
    maps = np.zeros((3, 64, 64), np.float32)
    with pytest.raises(InvalidInputError, match=r"percentages must be .* in \(0, 100\)"):
        road_curves(small_explainer.session, small_batch, maps, np.zeros(3, np.int64), percentages=(50, 100))
    with pytest.raises(InvalidInputError, match="order must be one of"):
        road_curves(small_explainer.session, small_batch, maps, np.zeros(3, np.int64), order="random")
    with pytest.raises(InvalidTargetError, match="class indices >= 0"):
        road_curves(small_explainer.session, small_batch, maps, np.array([0, -1, 0]))
    with pytest.raises(InvalidTargetError, match="beyond the model's"):
        road_curves(small_explainer.session, small_batch, maps, np.array([0, 1000, 0]), percentages=(50,))


# -- Adebayo's cascading randomisation ----------------------------------------------------------------
def test_randomized_model_cascades_from_the_logits(small_onnx) -> None:  # noqa: ANN001
    plain = original_model(small_onnx)
    names = weighted_nodes(plain)
    assert len(names) == 21 and names[0] == next(n.name for n in plain.graph.node if n.op_type == "Gemm")

    def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
        return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    original, two, three = weights(plain), weights(randomized_model(plain, 2)), weights(randomized_model(plain, 3))
    nodes = {n.name: n for n in plain.graph.node}
    touched = [{i for i in nodes[name].input if i in original} for name in names[:3]]
    changed_two = {name for name in original if not np.array_equal(original[name], two[name])}
    assert changed_two == touched[0] | touched[1]
    for name in touched[0] | touched[1]:  # step 3 keeps step 2's random values
        assert np.array_equal(two[name], three[name])
    assert all(not np.array_equal(original[name], three[name]) for name in touched[2])


def test_cascading_randomization_decorrelates_gradcam(small_onnx, small_batch) -> None:  # noqa: ANN001
    result = cascading_randomization(small_onnx, small_batch, "gradcam", steps=[1, 21])
    assert result.spearman.shape == result.ssim.shape == (3, 3)
    np.testing.assert_allclose(result.spearman[0], 1.0)
    np.testing.assert_allclose(result.ssim[0], 1.0)
    assert result.spearman[1].mean() < 0.5  # the logits layer re-drawn: Grad-CAM's weights change
    assert result.ssim[1:].mean() < 0.7
    # EigenCAM reads only the activations: re-drawing the logits layer cannot change it
    # (its 2 x 2 layer4 maps on this 64 x 64 random net stay coarse, so deeper steps are not asserted)
    eigen = cascading_randomization(small_onnx, small_batch, "eigencam", steps=[1])
    np.testing.assert_allclose(eigen.spearman[1], 1.0)
    np.testing.assert_array_equal(eigen.maps[1], eigen.maps[0])


def torch_cascade_reference(model: torch.nn.Module, images: np.ndarray, counts: list[int],
                            seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Spearman [steps + 1, n], SSIM [steps + 1, n], maps [steps + 1, n, H, W]) of Grad-CAM under cascading
    randomisation, in torch: the Conv2d / Linear modules from the logits down, the k-th one's weight then
    bias re-drawn from numpy's default_rng([seed, k]) as normal(mean, std) of the tensor it replaces."""
    import copy

    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity

    with torch.no_grad():
        classes = model(torch.from_numpy(images)).argmax(dim=1).tolist()

    def grad_cam(net: torch.nn.Module) -> np.ndarray:
        with GradCAM(model=net, target_layers=[net[3]]) as cam:
            return scale_cam_image(cam(input_tensor=torch.from_numpy(images),
                                       targets=[ClassifierOutputTarget(c) for c in classes]))

    maps = [grad_cam(model)]
    for count in counts:
        randomized = copy.deepcopy(model)
        weighted = [m for m in randomized if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))][::-1]
        with torch.no_grad():
            for index, module in enumerate(weighted[:count]):
                rng = np.random.default_rng([seed, index])
                for tensor in (module.weight, module.bias):
                    values = tensor.numpy()
                    tensor.copy_(torch.from_numpy(rng.normal(values.mean(), values.std(), values.shape).astype(np.float32)))
        maps.append(grad_cam(randomized))
    spearman = [[spearmanr(a.ravel(), b.ravel()).statistic for a, b in zip(maps[0], step)] for step in maps]
    ssim = [[structural_similarity(a, b, data_range=1.0) for a, b in zip(maps[0], step)] for step in maps]
    return np.array(spearman), np.array(ssim), np.stack(maps)


def test_cascading_randomization_matches_an_independent_torch_cascade() -> None:
    from explainrt import from_torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
        torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()
    images = np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype(np.float32)
    explainable = from_torch(net, torch.zeros(1, 3, 32, 32), [net[3]])
    assert len(weighted_nodes(original_model(explainable))) == 4  # the torch model's four weighted modules
    counts = [1, 2, 4]
    result = cascading_randomization(explainable, images, "gradcam", steps=counts, seed=7)
    spearman, ssim, maps = torch_cascade_reference(net, images, counts, seed=7)
    assert (np.ptp(maps, axis=(2, 3)) > 0.5).all()  # every map varies
    assert spearman[1:].min() < 0.9  # the randomisation changes the maps
    errors = [float(np.abs(result.maps - maps).max()), float(np.abs(result.spearman - spearman).max()),
              float(np.abs(result.ssim - ssim).max())]
    print("cascading randomisation vs torch (maps, spearman, ssim): " + ", ".join(f"{e:.2e}" for e in errors))
    assert max(errors) < 1e-3


# -- the curves plot ----------------------------------------------------------------------------------
@pytest.mark.parametrize("without_matplotlib", [False, True])
def test_curves_png_with_and_without_matplotlib(without_matplotlib: bool, monkeypatch: pytest.MonkeyPatch,
                                                tmp_path) -> None:  # noqa: ANN001
    import builtins

    from explainrt.metrics import Evaluation, plot_curves
    from explainrt.metrics.curves import CausalCurves

    if without_matplotlib:
        real_import = builtins.__import__

        def refuse(name: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if name.startswith("matplotlib"):
                raise ImportError(name)
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", refuse)
    fractions = np.linspace(0, 1, 5)
    curves = {mode: CausalCurves(mode, fractions, np.stack([1 - fractions, fractions]), np.array([0.5, 0.5]))
              for mode in ("deletion", "insertion")}
    evaluation = Evaluation(("gradcam",), ("deletion", "insertion"), np.array([1, 2]),
                            {"gradcam": {"deletion": np.array([0.5, 0.5]), "insertion": np.array([0.5, 0.5])}},
                            {"gradcam": curves})
    path = plot_curves(evaluation, tmp_path / "curves.png")
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 800
        pixels = np.asarray(image.convert("RGB"))
    assert (np.abs(pixels.astype(int) - (31, 119, 180)).sum(axis=2) < 60).sum() > 50  # the method's line colour
    assert "| gradcam | 0.500 | 0.500 |" in evaluation.markdown()


def test_probability_metrics_refuse_outputs_and_targets_that_are_no_class_probability(small_explainer,  # noqa: ANN001
                                                                                      small_batch) -> None:  # noqa: ANN001
    """Deletion, insertion and ROAD score a class's softmax probability: a segmentation output [N, K, H, W] and a
    Similarity target (Explanation.targets -1, which would index the last class) are refused by name; the pointing
    games take a segmentation output."""
    torch.manual_seed(0)
    segmenter = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 3, 1)).eval()
    explainer = Explainer(segmenter, [segmenter[1]], input_size=(16, 16))
    images = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    for metrics in (["deletion"], ["insertion", "road"]):
        with pytest.raises(InvalidInputError, match=r"explained output is \[N, 3, 16, 16\]"):
            evaluate(explainer, images, ["gradcam"], metrics, progress=False)
    boxes = np.array([[0, 0, 8, 8], [4, 4, 16, 16]])
    pointing = evaluate(explainer, images, ["gradcam"], ["pointing", "energy"], boxes=boxes, progress=False)
    assert set(pointing.scores["gradcam"]) == {"pointing", "energy"}
    vector = np.ones(small_explainer.spec.num_classes, np.float32)
    with pytest.raises(InvalidTargetError, match=r"class indices as targets, not Similarity"):
        evaluate(small_explainer, small_batch, ["gradcam"], ["deletion"], targets=Similarity(vector), progress=False)
    with pytest.raises(InvalidInputError, match="classifier output"):
        probabilities(explainer.session, [images], np.array([0, 1]))


def test_cascading_randomization_refuses_what_is_no_onnx_model(small_explainer, small_batch) -> None:  # noqa: ANN001
    with pytest.raises(InvalidModelError, match="got Explainer"):
        cascading_randomization(small_explainer, small_batch)
