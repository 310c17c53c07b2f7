"""Counterfactual-CAM, Contrast-CAM, Galore and DFF against independent PyTorch computations.

The references below use the small ResNet-18 directly: forward hooks on layer4 and
torch.autograd for the objective of each formula (logits, cross-entropy, max softmax), then
torch's bilinear upsampling. None of explainrt's gradient graph or kernels is on that path.
Counterfactual-CAM and Contrast-CAM are also compared, on both backends, with pytorch-grad-cam's own
GradCAM (its hooks, its min-max scaling and cv2 resizing) given the objective as a target:
-logit_c (Grad-CAM of the negated gradient) and CE(logits, Q); this uses neither explainrt nor
formulas re-typed here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from explainrt.errors import InvalidInputError
from tests.conftest import SMALL_CLASSES, SMALL_SIZE
from tests.test_map_heads import grad_cam_reference


def _layer_and_grad(model, images: np.ndarray, objective) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """layer4 activations, d objective(logits) / d activations, logits."""
    captured = {}
    handle = model.layer4.register_forward_hook(lambda _m, _i, out: captured.setdefault("a", out))
    try:
        logits = model(torch.from_numpy(images))
    finally:
        handle.remove()
    acts = captured["a"]
    (grads,) = torch.autograd.grad(objective(logits), acts)
    return acts.detach(), grads, logits.detach()


def _upsample(maps: torch.Tensor) -> np.ndarray:
    return F.interpolate(maps[:, None], size=SMALL_SIZE, mode="bilinear", align_corners=False)[:, 0].numpy()


def _assert_close(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, atol=1e-4 * max(np.abs(want).max(), 1e-12), rtol=0)


def _attribution(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    maps = F.relu((acts * grads).sum(dim=1))
    peak = maps.amax(dim=(1, 2), keepdim=True)
    return torch.where(peak > 0, maps / peak.clamp(min=1e-30), torch.zeros_like(maps))


@pytest.fixture(scope="module")
def predictions(small_resnet, small_batch) -> np.ndarray:  # noqa: ANN001
    with torch.no_grad():
        return small_resnet(torch.from_numpy(small_batch)).numpy().argsort(axis=1)[:, ::-1]


def test_counterfactual_cam_is_grad_cam_of_negated_gradients(small_explainer, small_resnet, small_batch, predictions) -> None:  # noqa: ANN001
    targets = predictions[:, 0].copy()
    acts, grads, _ = _layer_and_grad(small_resnet, small_batch, lambda y: y[torch.arange(3), targets].sum())
    want = _upsample(F.relu((-grads.mean(dim=(2, 3), keepdim=True) * acts).sum(dim=1)))
    got = small_explainer.explain(small_batch, method="counterfactual-cam", normalize=False)
    _assert_close(got.maps, want)
    np.testing.assert_array_equal(got.targets, targets)


def test_contrast_cam_follows_the_olivesgatech_definition(small_explainer, small_resnet, small_batch, predictions) -> None:  # noqa: ANN001
    contrast = predictions[:, 3].copy()  # Q: each image's 4th most likely class
    # olivesgatech/Contrastive-Explanations: CrossEntropyLoss(logits, Q).backward(), GAP weights, ReLU,
    # bilinear upsampling, min-max. nn.CrossEntropyLoss averages over the batch: scale back per image.
    acts, grads, _ = _layer_and_grad(small_resnet, small_batch,
                                     lambda y: F.cross_entropy(y, torch.from_numpy(contrast)) * len(contrast))
    raw = _upsample(F.relu((grads.mean(dim=(2, 3), keepdim=True) * acts).sum(dim=1)))
    got = small_explainer.explain(small_batch, method="contrast-cam", contrast=contrast, normalize=False)
    _assert_close(got.maps, raw)
    np.testing.assert_array_equal(got.targets, predictions[:, 0])
    np.testing.assert_array_equal(got.extras["contrast_classes"][:, 0], contrast)
    low, high = raw.min(axis=(1, 2), keepdims=True), raw.max(axis=(1, 2), keepdims=True)
    shown = small_explainer.explain(small_batch, method="contrast-cam", contrast=contrast)
    np.testing.assert_allclose(shown.maps, (raw - low) / (high - low), atol=1e-3)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("method", ["counterfactual-cam", "contrast-cam"])
def test_targeted_cams_match_pytorch_grad_cam(small_explainer, small_torch_explainer, small_resnet, small_batch,  # noqa: ANN001
                                              predictions, backend: str, method: str) -> None:
    """Counterfactual-CAM of each image's least likely class (the top classes' maps are often blank here),
    Contrast-CAM of the prediction against each image's 4th class; normalised maps against
    pytorch-grad-cam's GradCAM."""
    explainer = small_explainer if backend == "onnxruntime" else small_torch_explainer
    classes = predictions[:, -1 if method == "counterfactual-cam" else 0].copy()
    contrast = predictions[:, 3].copy()
    options = {"contrast": contrast} if method == "contrast-cam" else {}
    got = explainer.explain(small_batch, method=method, targets=classes, **options)
    want = grad_cam_reference(small_resnet, [small_resnet.layer4], method, small_batch, classes, contrast)
    assert (want.std(axis=(1, 2)) > 0.05).all()  # maps with structure, not blank ones
    error = float(np.abs(got.maps - want).max())
    print(f"{method} vs pytorch-grad-cam ({backend}): {error:.2e}")
    assert error < 1e-4


def test_contrasts_against_the_top_k_in_one_call(small_explainer, small_batch, predictions) -> None:  # noqa: ANN001
    together = small_explainer.explain_contrasts(small_batch, k=3, normalize=False)
    assert together.extras["contrast_maps"].shape == (3, 3, *SMALL_SIZE)
    np.testing.assert_array_equal(together.extras["contrast_classes"], predictions[:, 1:4])
    for rank in range(3):
        alone = small_explainer.explain(small_batch, method="contrast-cam", contrast=-(rank + 2), normalize=False)
        np.testing.assert_allclose(together.extras["contrast_maps"][:, rank], alone.maps, atol=1e-6)
    np.testing.assert_array_equal(together.maps, together.extras["contrast_maps"][:, 0])


@pytest.mark.parametrize(("options", "message"), [
    ({"contrast": "predicted"}, "contrast-cam explains the predicted class"),
    ({"top_k": SMALL_CLASSES}, "top_k must be an integer in 1..9"),
    ({"contrast": 1, "top_k": 2}, "not both"),
    ({"contrast": 10}, "contrast 10 is out of range for a model with 10 classes"),
    ({"contrast": [1, 2]}, "contrast must be one value or one per image \\(3 images\\), got 2"),
])
def test_contrast_cam_bad_input(small_explainer, small_batch, predictions, options, message) -> None:  # noqa: ANN001
    if options.get("contrast") == "predicted":
        options = {"contrast": predictions[:, 0].copy()}
        message = "the contrast class of image 0 is its predicted class"
    with pytest.raises(InvalidInputError, match=message):
        small_explainer.explain(small_batch, method="contrast-cam", **options)
    with pytest.raises(InvalidInputError, match="explains the predicted class"):
        small_explainer.explain(small_batch, method="contrast-cam", targets=predictions[:, 1].copy())


def _confidence_terms(model, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """a(s) and d from torch.autograd of s = max softmax itself (not via the cross-entropy)."""
    acts, grads, _ = _layer_and_grad(model, images, lambda y: torch.softmax(y, dim=1).max(dim=1).values.sum())
    return _attribution(acts, F.relu(grads)), _attribution(acts, F.relu(-grads))


def _class_attribution(model, images: np.ndarray, classes: np.ndarray) -> torch.Tensor:  # noqa: ANN001
    acts, grads, _ = _layer_and_grad(model, images, lambda y: y[torch.arange(len(classes)), classes].sum())
    return _attribution(acts, grads)


def test_galore_deliberative_insecurities(small_explainer, small_resnet, small_batch, predictions) -> None:  # noqa: ANN001
    _, difficulty = _confidence_terms(small_resnet, small_batch)
    by_rank = [_class_attribution(small_resnet, small_batch, predictions[:, r].copy()) for r in range(3)]
    got = small_explainer.explain(small_batch, method="galore-deliberative", normalize=False)
    for pair, (a, b) in enumerate([(0, 1), (0, 2), (1, 2)]):
        _assert_close(got.extras["insecurity_maps"][:, pair], _upsample(by_rank[a] * by_rank[b] * difficulty))
        _assert_close(got.extras["insecurity_maps"][:, pair], _upsample(by_rank[b] * by_rank[a] * difficulty))
        np.testing.assert_array_equal(got.extras["insecurity_pairs"][:, pair], predictions[:, [a, b]])
    np.testing.assert_array_equal(got.maps, got.extras["insecurity_maps"][:, 0])


def test_galore_counterfactual_discriminant_map(small_explainer, small_resnet, small_batch, predictions) -> None:  # noqa: ANN001
    aware, _ = _confidence_terms(small_resnet, small_batch)
    explained = _class_attribution(small_resnet, small_batch, predictions[:, 0].copy())
    counter = _class_attribution(small_resnet, small_batch, predictions[:, 2].copy())
    got = small_explainer.explain(small_batch, method="galore-counterfactual", counter_class=-3, normalize=False)
    _assert_close(got.maps, _upsample(aware * (1 - counter) * explained))
    np.testing.assert_array_equal(got.extras["counter_classes"], predictions[:, 2])


def test_galore_counterfactual_pair_swaps_roles(small_explainer, small_batch, predictions) -> None:  # noqa: ANN001
    """R(x, y*, y_c, x_c) with x_c = x: its second map D(x, y_c, y*) is the first map with the classes swapped."""
    first, second = predictions[:, 0].copy(), predictions[:, 1].copy()
    pair = small_explainer.explain(small_batch, method="galore-counterfactual", targets=first, counter_class=second,
                                   counter_image=small_batch, normalize=False)
    swapped = small_explainer.explain(small_batch, method="galore-counterfactual", targets=second, counter_class=first,
                                      normalize=False)
    np.testing.assert_allclose(pair.extras["counter_maps"], swapped.maps, atol=1e-6)


def test_galore_bad_input(small_explainer, small_batch, predictions) -> None:  # noqa: ANN001
    with pytest.raises(InvalidInputError, match=r"counter_image: images have shape \(3, 3, 32, 64\)"):
        small_explainer.explain(small_batch, method="galore-counterfactual", counter_image=small_batch[:, :, :32])
    with pytest.raises(InvalidInputError, match="counter_image must be one image or one per image"):
        small_explainer.explain(small_batch, method="galore-counterfactual", counter_image=small_batch[:2])
    with pytest.raises(InvalidInputError, match="counter class of image 0 is the explained class"):
        small_explainer.explain(small_batch, method="galore-counterfactual", counter_class=predictions[:, 0].copy())


def test_dff_matches_pytorch_grad_cam(small_explainer, small_resnet, small_batch) -> None:  # noqa: ANN001
    from pytorch_grad_cam import DeepFeatureFactorization

    reference = DeepFeatureFactorization(small_resnet, small_resnet.layer4, computation_on_concepts=small_resnet.fc)
    _, explanations, concept_logits = reference(torch.from_numpy(small_batch), n_components=4)
    got = small_explainer.explain(small_batch, method="dff", n_concepts=4)
    np.testing.assert_allclose(got.extras["concept_maps"], np.stack(explanations), atol=1e-4)
    probabilities = torch.softmax(torch.from_numpy(concept_logits), dim=1).numpy()
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(got.extras["concept_classes"][0], top)
    np.testing.assert_allclose(got.extras["concept_scores"][0], np.take_along_axis(probabilities, top, axis=1), atol=1e-5)
    with pytest.raises(InvalidInputError, match="n_concepts must be an integer >= 1"):
        small_explainer.explain(small_batch, method="dff", n_concepts=0)


def test_dff_overlay_colours_each_concept(default_explainer, example_images) -> None:  # noqa: ANN001
    explanation = default_explainer.explain(example_images["chelsea"], method="dff", n_concepts=3)
    pixels = explanation.overlays()[0]
    strongest = explanation.extras["concept_maps"][0].argmax(axis=0)
    assert pixels.shape == (224, 224, 3)
    # the cat's concept scores a cat class
    cat_concept = np.bincount(strongest.ravel(), minlength=3).argmax()
    assert explanation.extras["concept_classes"][0, cat_concept, 0] in {281, 282, 285}
