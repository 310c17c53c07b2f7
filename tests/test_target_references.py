"""Explanation targets (explainrt.targets) in the perturbation-based methods, against reference libraries.

Score-CAM and Ablation-CAM are compared with pytorch-grad-cam's ScoreCAM and AblationCAM given the same
objective: its SemanticSegmentationTarget for ``Region``, and plain callables of one image's output for
``Weights``, ``Sum``, ``Difference`` and ``Similarity`` (pytorch-grad-cam scores each masked or ablated copy
with ``target(output)``). LIME and KernelSHAP are compared with the lime and shap packages run on a
function that returns the target's objective computed by torch on the same model (an independent
implementation of the objective), with the same superpixels, samples and seeds, mirroring
tests/test_lime_kernelshap.py for classes.

Known differences from the references, and how each test lines up the two:

- pytorch-grad-cam's AblationLayer writes ``min - 1e7`` into copy j of each batch with the minimum re-read
  after every write (copy j gets ``min - (j + 1) * 1e7``) when a layer's minimum is not 0; explainrt
  writes ``min - 1e7`` into every copy. On a layer whose ablated values reach the output linearly this
  changes the map, so there the reference runs with ``batch_size=1`` (its value is then ours) or
  explainrt gets pytorch-grad-cam's values through ``ablation_values``.
- shap draws its sampled coalitions from NumPy's global generator, explainrt from
  ``default_rng(seed)``: the sampled part of a budget cannot be reproduced, so KernelSHAP is compared
  where both enumerate every coalition (2^S - 2 <= n_samples), where both are exact Shapley values.

The models are tiny (random weights, fixed seeds): a conv segmentation net [N, 4, 32, 32] and a conv
classifier / embedder [N, 6]. Every comparison also checks that the target matters (the reference
differs from explainrt's maps for another target), so the tests fail if the objective is ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from test_lime_kernelshap import _blocks, _superpixel_vector

from explainrt import Explainer, compat
from explainrt.errors import InvalidTargetError
from explainrt.methods.dff import factorize
from explainrt.targets import (
    Class,
    Difference,
    Region,
    Similarity,
    Softmax,
    Sum,
    Target,
    Weights,
)

SIZE = 32
CLASSES = 4
FEATURES = 6

# pytorch-grad-cam's maps and ours are float32 maps scaled to [0, 1]: the scores of the masked copies
# differ by float32 rounding (ONNX Runtime or torch, float64 or float32 sums); observed max |diff|:
# Score-CAM 5.7e-6 (its softmax amplifies score rounding), Ablation-CAM 1.5e-6
MAP_ATOL = 2e-5


class TinySegNet(torch.nn.Module):
    """[N, 3, 32, 32] -> [N, 4, 32, 32]: conv-ReLU (stride 2), conv-ReLU (stride 2, 12 channels: ``relu``),
    a 1x1 conv without activation (10 channels with negative values: ``linear``, which reaches the
    logits linearly, so an ablated value changes the scores), a 3x3 conv to the classes, bilinear upsampling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU())
        self.conv = torch.nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.relu = torch.nn.ReLU()
        self.linear = torch.nn.Conv2d(12, 10, 1)
        self.head = torch.nn.Conv2d(10, CLASSES, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.linear(self.relu(self.conv(self.stem(x)))))
        return torch.nn.functional.interpolate(y, size=x.shape[2:], mode="bilinear", align_corners=False)


class TinyClassifier(torch.nn.Module):
    """[N, 3, 32, 32] -> [N, 6] logits (or an embedding): conv-ReLU, conv-ReLU (``relu``, 12 channels), pooled linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU())
        self.conv = torch.nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.relu = torch.nn.ReLU()
        self.fc = torch.nn.Linear(12, FEATURES)
        with torch.no_grad():
            self.fc.weight.mul_(10.0)  # logits that vary with the input (PyTorch's init: spreads of ~0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(self.stem(x))).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    seg = TinySegNet().eval()
    torch.manual_seed(1)
    return {"seg": seg, "cls": TinyClassifier().eval()}


@pytest.fixture(scope="module")
def explainers(models: dict[str, torch.nn.Module]) -> Callable[[str, str, str], Explainer]:
    """explainer(model, layer, backend): one Explainer per model, target layer and backend, built once."""
    built: dict[tuple[str, str, str], Explainer] = {}

    def explainer(model: str, layer: str, backend: str = "onnxruntime") -> Explainer:
        key = (model, layer, backend)
        if key not in built:
            net = models[model]
            built[key] = Explainer(net, target_layers=[getattr(net, layer)], input_size=(SIZE, SIZE), backend=backend)
        return built[key]

    return explainer


def _images(count: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, 3, SIZE, SIZE)).astype(np.float32)


def _box_mask(top: int, bottom: int, left: int, right: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[top:bottom, left:right] = 1.0
    return mask


@dataclass(frozen=True)
class Objective:
    """One target as explainrt's object and as a torch function of one image's output (the reference's)."""

    target: Target
    torch_fn: Callable[[torch.Tensor], torch.Tensor]  # output [..., *output shape] -> [...]

    def scores(self, model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
        """The objective of each image [b, C, H, W] by torch, float64."""
        with torch.no_grad():
            return self.torch_fn(model(torch.from_numpy(np.ascontiguousarray(images, np.float32)))).double().numpy()


def _region(index: int, mask: np.ndarray) -> Objective:
    weights = torch.from_numpy(mask)
    return Objective(Region(index, mask), lambda out: (out[..., index, :, :] * weights).sum(dim=(-2, -1)))


def _weights(weights: np.ndarray) -> Objective:
    tensor = torch.from_numpy(weights)
    axes = tuple(range(-weights.ndim, 0))
    return Objective(Weights(weights), lambda out: (out * tensor).sum(dim=axes))


def _sum(first: Objective, second: Objective) -> Objective:
    return Objective(Sum([first.target, second.target]), lambda out: first.torch_fn(out) + second.torch_fn(out))


def _difference(p: int, q: int) -> Objective:
    return Objective(Difference(p, q), lambda out: out[..., p] - out[..., q])


def _similarity(vector: np.ndarray) -> Objective:
    tensor = torch.from_numpy(vector)
    return Objective(Similarity(vector), lambda out: (out * tensor).sum(dim=-1))


def _objectives(kind: str) -> tuple[str, list[Objective]]:
    """The model and one objective per image (two images, different objectives) of a target kind."""
    rng = np.random.default_rng(7)
    a, b = _box_mask(4, 20, 10, 28), _box_mask(14, 30, 2, 18)
    cases: dict[str, Callable[[], tuple[str, list[Objective]]]] = {
        "region": lambda: ("seg", [_region(2, a), _region(1, b)]),
        "weighted-region": lambda: ("seg", [_region(3, rng.uniform(size=(SIZE, SIZE)).astype(np.float32)),
                                            _region(0, rng.uniform(size=(SIZE, SIZE)).astype(np.float32) * b)]),
        "weights": lambda: ("seg", [_weights(rng.normal(scale=0.1, size=(CLASSES, SIZE, SIZE)).astype(np.float32) * a),
                                    _weights(rng.normal(scale=0.1, size=(CLASSES, SIZE, SIZE)).astype(np.float32))]),
        "sum": lambda: ("seg", [_sum(_region(0, a), _region(2, b)), _sum(_region(3, b), _region(1, 1 - a))]),
        "difference": lambda: ("cls", [_difference(1, 4), _difference(5, 0)]),
        "similarity": lambda: ("cls", [_similarity(rng.normal(size=FEATURES).astype(np.float32)),
                                       _similarity(rng.normal(size=FEATURES).astype(np.float32))]),
    }
    return cases[kind]()


def _their_target(objective: Objective) -> Callable[[torch.Tensor], torch.Tensor]:
    """pytorch-grad-cam's target for an objective: its SemanticSegmentationTarget for a Region (binary or weighted
    mask: it multiplies by the mask), else the objective's torch function (any callable of one image's output)."""
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    target = objective.target
    if isinstance(target, Region):
        return SemanticSegmentationTarget(target.index, target.mask)
    return objective.torch_fn


def _assert_target_matters(explainer: Explainer, method: str, images: np.ndarray, objectives: list[Objective],
                           reference: np.ndarray, **options: object) -> None:
    """explainrt's maps with the two images' targets swapped are far from the reference (100 times the
    tolerance): the comparison is sensitive to the objective. Score-CAM's softmax of nearly equal scores makes
    its maps depend on the target only weakly (swapped maps differ by 0.01 to 0.3 here)."""
    swapped = explainer.explain(images, method=method, targets=[o.target for o in objectives[::-1]], **options)
    assert np.abs(swapped.maps - reference).max(axis=(1, 2)).min() > 100 * MAP_ATOL


# -- Score-CAM and Ablation-CAM against pytorch-grad-cam ---------------------------------------------------
TARGET_KINDS = ["region", "weighted-region", "weights", "sum", "difference", "similarity"]


def _cases(*layers: str) -> list[tuple[str, str]]:
    """(kind, layer): every target kind at the layers given (the classifier has only ``relu``)."""
    return [(kind, layer) for kind in TARGET_KINDS for layer in layers
            if layer == "relu" or _objectives(kind)[0] == "seg"]


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize(("kind", "layer"), _cases("relu", "linear"))
def test_scorecam_targets_match_pytorch_grad_cam(models, explainers, kind: str, layer: str, backend: str) -> None:
    """Score-CAM: each upsampled, min-max scaled channel masks the input; softmax of the copies' objectives."""
    from pytorch_grad_cam import ScoreCAM

    model_name, objectives = _objectives(kind)
    model, explainer = models[model_name], explainers(model_name, layer, backend)
    images = _images(seed=0)
    with ScoreCAM(model=model, target_layers=[getattr(model, layer)]) as cam:
        cam.batch_size = 5  # several batches of copies (their default is 16)
        reference = cam(torch.from_numpy(images), targets=[_their_target(o) for o in objectives])
    ours = explainer.explain(images, method="scorecam", targets=[o.target for o in objectives], batch_size=4)
    assert reference.std(axis=(1, 2)).min() > 0.05  # maps that vary
    np.testing.assert_allclose(ours.maps, reference, rtol=0, atol=MAP_ATOL)
    np.testing.assert_allclose(ours.logits[:, 0], [o.scores(model, image[None])[0] for o, image in
                                                   zip(objectives, images)], rtol=1e-5, atol=1e-5)
    _assert_target_matters(explainer, "scorecam", images, objectives, reference)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize(("kind", "layer", "their_batch"),
                         [(kind, layer, batch) for kind, layer in _cases("relu", "linear")
                          for batch in ((32,) if layer == "relu" else (1, 4))])
def test_ablationcam_targets_match_pytorch_grad_cam(models, explainers, kind: str, layer: str, their_batch: int,
                                                    backend: str) -> None:
    """Ablation-CAM: weight = (score - score with the channel ablated) / score, the scores the target's objective.

    ``relu``: every image's minimum is 0, both zero a channel. ``linear`` (minimum < 0, the ablated values reach
    the output): with pytorch-grad-cam's batch_size 1 its value is ours (min - 1e7); with batch_size 4 explainrt
    is given pytorch-grad-cam's per-copy values (``compat.pytorch_grad_cam_ablation_values``)."""
    from pytorch_grad_cam import AblationCAM

    model_name, objectives = _objectives(kind)
    model, explainer = models[model_name], explainers(model_name, layer, backend)
    images = _images(seed=1)
    with AblationCAM(model=model, target_layers=[getattr(model, layer)], batch_size=their_batch) as cam:
        reference = cam(torch.from_numpy(images), targets=[_their_target(o) for o in objectives])
    options: dict[str, object] = {}
    if their_batch != 1 and layer == "linear":
        options["ablation_values"] = lambda a: compat.pytorch_grad_cam_ablation_values(a, their_batch)
    ours = explainer.explain(images, method="ablationcam", targets=[o.target for o in objectives], batch_size=3,
                             **options)
    assert reference.std(axis=(1, 2)).min() > 0.05
    np.testing.assert_allclose(ours.maps, reference, rtol=0, atol=MAP_ATOL)
    _assert_target_matters(explainer, "ablationcam", images, objectives, reference, **options)
    if options:  # the values matter on this layer: explainrt's default (min - 1e7 for every copy) differs
        default = explainer.explain(images, method="ablationcam", targets=[o.target for o in objectives])
        assert np.abs(default.maps - reference).max() > 0.05


# -- LIME and KernelSHAP against the lime and shap packages --------------------------------------------------
def _mean_colours(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[C, H, W]: each superpixel's mean colour (lime's hide_color=None), by a loop over the superpixels."""
    off = np.empty_like(image)
    for segment in np.unique(labels):
        inside = labels == segment
        off[:, inside] = image[:, inside].mean(axis=1, keepdims=True)
    return off


SURROGATE_KINDS = ["region", "weighted-region", "weights", "difference"]


@pytest.mark.parametrize("kind", SURROGATE_KINDS)
def test_lime_targets_match_lime_package(models, explainers, kind: str) -> None:
    """lime's LimeImageExplainer on the same blocks and seed, its classifier_fn the target's objective by torch
    (one column, label 0): the ridge coefficients, intercept and score equal explainrt's LIME of the target."""
    from lime import lime_image

    model_name, objectives = _objectives(kind)
    model, explainer = models[model_name], explainers(model_name, "relu")
    images, labels, seed, n_samples = _images(seed=3), _blocks(4, 4, SIZE), 5, 300
    ours = explainer.explain(images, method="lime", targets=[o.target for o in objectives], normalize=False,
                             segments=labels, seed=seed, n_samples=n_samples, batch_size=64)
    for index, (objective, image) in enumerate(zip(objectives, images)):
        reference = lime_image.LimeImageExplainer(kernel_width=0.25, random_state=seed, feature_selection="none")
        explanation = reference.explain_instance(
            image.transpose(1, 2, 0), lambda hwc, o=objective: o.scores(model, hwc.transpose(0, 3, 1, 2))[:, None],
            labels=(0,), top_labels=None, num_samples=n_samples, batch_size=50, segmentation_fn=lambda _: labels,
            random_seed=0)
        expected = np.zeros(16)
        for feature, weight in explanation.local_exp[0]:
            expected[feature] = weight
        weights = _superpixel_vector(ours, index)
        assert np.abs(expected).max() > 1e-2
        np.testing.assert_allclose(weights, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
        assert ours.extras["intercept"][index] == pytest.approx(explanation.intercept[0], rel=1e-5, abs=1e-5)
        assert ours.extras["r2"][index] == pytest.approx(explanation.score, abs=1e-5)
        # the target matters: LIME of the other image's objective is far from this reference
        other = explainer.explain(image[None], method="lime", targets=objectives[1 - index].target, normalize=False,
                                  segments=labels, seed=seed, n_samples=n_samples, batch_size=64)
        assert np.abs(_superpixel_vector(other, 0) - expected).max() > 0.1 * np.abs(expected).max()


@pytest.mark.parametrize("baseline", ["mean", 0.0])
@pytest.mark.parametrize("kind", SURROGATE_KINDS)
def test_kernelshap_targets_match_shap_package(models, explainers, kind: str, baseline: object) -> None:
    """shap's KernelExplainer (``l1_reg=False``) on on/off vectors of 8 blocks (background all off, x all on), its
    model the target's objective by torch of the image with the off blocks at the baseline; n_samples covers
    all 2^8 - 2 coalitions, so both enumerate them: the Shapley values, base and full values agree."""
    shap = pytest.importorskip("shap")
    model_name, objectives = _objectives(kind)
    model, explainer = models[model_name], explainers(model_name, "relu")
    images, labels, count = _images(seed=4), _blocks(2, 4, SIZE), 8
    ours = explainer.explain(images, method="kernelshap", targets=[o.target for o in objectives], normalize=False,
                             segments=labels, n_samples=2**count, baseline=baseline, batch_size=64)
    for index, (objective, image) in enumerate(zip(objectives, images)):
        off = _mean_colours(image, labels) if baseline == "mean" else np.full_like(image, baseline)

        def game(members: np.ndarray, image=image, off=off, objective=objective) -> np.ndarray:
            keep = members[:, labels][:, None].astype(np.float32)  # [m, 1, H, W]
            return objective.scores(model, image * keep + off * (1 - keep))

        reference = shap.KernelExplainer(game, np.zeros((1, count)))
        np.random.seed(0)
        phi = np.asarray(reference.shap_values(np.ones((1, count)), nsamples=2**count, l1_reg=False,
                                               silent=True)).ravel()
        assert reference.nsamplesRun == 2**count - 2  # every coalition
        weights = _superpixel_vector(ours, index)
        assert np.abs(phi).max() > 1e-2
        np.testing.assert_allclose(weights, phi, rtol=0, atol=1e-5 * np.abs(phi).max())
        base = float(np.ravel(reference.expected_value)[0])
        assert ours.extras["base_value"][index] == pytest.approx(base, rel=1e-5, abs=1e-5)
        assert ours.extras["full_value"][index] == pytest.approx(game(np.ones((1, count)))[0], rel=1e-5, abs=1e-5)
        other = objectives[1 - index]
        assert np.abs(phi - _shapley_of(other, model, image, off, labels, count)).max() > 0.1 * np.abs(phi).max()


def _shapley_of(objective: Objective, model: torch.nn.Module, image: np.ndarray, off: np.ndarray,
                labels: np.ndarray, count: int) -> np.ndarray:
    """Exact Shapley values of another objective (the target-matters check), by the efficiency-exact solver
    on every coalition."""
    from explainrt.methods.surrogate import shapley_coalitions, shapley_regression

    coalitions = shapley_coalitions(count, 2**count, np.random.default_rng(0))

    def game(members: np.ndarray) -> np.ndarray:
        keep = members[:, labels][:, None].astype(np.float32)
        return objective.scores(model, image * keep + off * (1 - keep))

    return shapley_regression(coalitions, game(coalitions.members), game(np.ones((1, count)))[0],
                              game(np.zeros((1, count)))[0])


# -- class indices and ranked targets: the same objective as the explicit target --------------------------
@pytest.mark.parametrize("method", ["scorecam", "ablationcam", "lime", "kernelshap", "occlusion", "rise",
                                    "integrated-gradients"])
def test_class_index_on_a_segmentation_output_is_the_whole_class_region(explainers, method: str) -> None:
    """targets=c on a segmentation output is Region(c, all ones) (as for Grad-CAM, tests/test_targets.py): the
    perturbation methods score each copy with the class's summed scores (RISE too: not a softmax over pixels)."""
    explainer = explainers("seg", "relu")
    images = _images(1, seed=0)
    options = {"segments": _blocks(2, 4, SIZE), "n_samples": 40} if method in ("lime", "kernelshap") else {}
    whole = explainer.explain(images, method=method, targets=Region(2, np.ones((SIZE, SIZE), np.float32)),
                              normalize=False, **options)
    ours = explainer.explain(images, method=method, targets=2, normalize=False, **options)
    np.testing.assert_allclose(ours.maps, whole.maps, rtol=0, atol=1e-5 * np.abs(whole.maps).max())


RANKED = {"difference": (Difference(-1, -2), lambda p, q: Difference(p, q)),
          "softmax": (Softmax(-2), lambda p, q: Softmax(q))}


@pytest.mark.parametrize("kind", sorted(RANKED))
@pytest.mark.parametrize("method", ["scorecam", "ablationcam", "lime", "kernelshap", "occlusion", "rise"])
def test_ranked_targets_name_each_image_classes_in_perturbation_methods(models, explainers, method: str,
                                                                        kind: str) -> None:
    """Difference(-1, -2) and Softmax(-2) are about each image's own top classes p, q (Explanation.targets reports
    them), fixed once on the image as targets=-1 is: every perturbed copy is scored for p and q, not for the
    classes that rank first on that copy, so the maps equal those of Difference(p, q) / Softmax(q) per image."""
    explainer = explainers("cls", "relu")
    images = _images(2, seed=1)
    with torch.no_grad():
        orders = np.argsort(-models["cls"](torch.from_numpy(images)).numpy(), axis=1)[:, :2].tolist()
    assert orders[0] != orders[1]  # the two images rank different classes first: binding is per image
    ranked_target, fixed_target = RANKED[kind]
    options = {"segments": _blocks(2, 4, SIZE), "n_samples": 100} if method in ("lime", "kernelshap") else {}
    fixed = explainer.explain(images, method=method, targets=[fixed_target(p, q) for p, q in orders],
                              normalize=False, **options)
    ranked = explainer.explain(images, method=method, targets=ranked_target, normalize=False, **options)
    assert ranked.targets.tolist() == fixed.targets.tolist() == [
        p if kind == "difference" else q for p, q in orders]
    np.testing.assert_allclose(ranked.maps, fixed.maps, rtol=0, atol=1e-4 * np.abs(fixed.maps).max())


@pytest.mark.parametrize("method", ["rise", "ablationcam"])
def test_perturbed_copies_are_scored_for_their_own_image_targets_only(explainers, monkeypatch: pytest.MonkeyPatch,
                                                                       method: str) -> None:
    """Each image's copies are scored for that image's targets, not for every image's: with two images and one
    Weights target each, a target scores the two explained images once and its own image's copies."""
    explainer = explainers("cls", "relu")
    rng = np.random.default_rng(3)
    targets = [Weights(rng.standard_normal(FEATURES).astype(np.float32)) for _ in range(2)]
    rows: dict[int, int] = {id(target): 0 for target in targets}
    score = Weights.score

    def counted(self: Weights, outputs: np.ndarray) -> np.ndarray:
        rows[id(self)] += outputs.shape[0]
        return score(self, outputs)

    monkeypatch.setattr(Weights, "score", counted)
    options = {"n_masks": 16} if method == "rise" else {}
    explainer.explain(_images(2, seed=0), method=method, targets=targets, **options)
    copies = 16 if method == "rise" else 12  # masks, or the target layer's channels ablated one at a time
    assert sorted(rows.values()) == [2 + copies, 2 + copies]


@pytest.mark.parametrize("target", [Difference(-7, -1), Softmax(-7), Sum([Class(-7), Weights(np.ones(FEATURES))])])
def test_a_rank_beyond_the_classes_is_refused_by_name(explainers, target: Target) -> None:
    with pytest.raises(InvalidTargetError, match="out of range for an output of 6 classes"):
        explainers("cls", "relu").explain(_images(1), method="scorecam", targets=target)


def test_dff_scores_concepts_on_a_segmentation_output_by_pixel_probabilities(models, explainers) -> None:
    """DFF's concept classes on a segmentation head: each concept's filled feature map through the head, the
    per-pixel softmax over the classes averaged over the map (not a softmax over the map's width)."""
    explainer = explainers("seg", "relu")
    images = _images(2, seed=0)
    explanation = explainer.explain(images, method="dff", n_concepts=3)
    seg = models["seg"]
    with torch.no_grad():
        activations = seg.relu(seg.conv(seg.stem(torch.from_numpy(images))))
    concepts, _ = factorize(activations.numpy(), 3)
    with torch.no_grad():
        filled = torch.from_numpy(concepts)[:, :, None, None].expand(3, *activations.shape[1:])
        head = seg.head(seg.linear(filled))
        logits = torch.nn.functional.interpolate(head, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    probabilities = logits.double().softmax(dim=1).mean(dim=(2, 3)).numpy()
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :3]
    assert explanation.extras["concept_classes"].tolist() == [top.tolist()] * 2
    np.testing.assert_allclose(explanation.extras["concept_scores"][0], np.take_along_axis(probabilities, top, 1),
                               atol=1e-5)
