"""LIME and KernelSHAP over superpixels, against the lime and shap packages and exact Shapley values.

- LIME is compared with the lime package on the same segmentation (lime gets our labels through
  ``segmentation_fn``) and the same seed: lime draws its on/off samples from
  ``RandomState(seed).randint(0, 2, n * S)`` with row 0 all on, which we reproduce exactly, so the
  ridge coefficients are compared to a tolerance (not just the top-k sets).
- KernelSHAP's sampler and solver are compared with shap's KernelExplainer (``l1_reg=False``):
  the enumerated coalitions and weights are identical, and our solver on shap's samples gives
  shap's values. On the model: efficiency (sum = f(x) - f(all off)) within 1e-3, and exact
  Shapley values by brute force over all 2^S coalitions when n_samples covers them.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from explainrt.errors import ExplanationCancelled, InvalidInputError
from explainrt.numerics import softmax
from explainrt.methods.surrogate import (
    Coalitions,
    lime_kernel,
    lime_samples,
    segment_images,
    shapley_coalitions,
    shapley_regression,
    superpixel_means,
    weighted_ridge,
)


def _toy_game(count: int, seed: int = 1):
    """A non-additive set function of on/off vectors [m, S] (interactions, so sampling matters)."""
    coef = np.random.default_rng(seed).normal(size=count)
    return lambda z: np.sin(z @ coef) + z[:, 0] * z[:, min(3, count - 1)]


def exact_shapley(value, count: int) -> np.ndarray:
    """Shapley values by the definition: every coalition, weights |S|! (M - |S| - 1)! / M!."""
    members = np.array(list(itertools.product([0.0, 1.0], repeat=count)))
    values = dict(zip(map(tuple, members), value(members)))
    phi = np.zeros(count)
    for z in members[members.sum(axis=1) < count]:
        size = int(z.sum())
        weight = math.factorial(size) * math.factorial(count - size - 1) / math.factorial(count)
        for i in np.flatnonzero(z == 0):
            with_i = z.copy()
            with_i[i] = 1.0
            phi[i] += weight * (values[tuple(with_i)] - values[tuple(z)])
    return phi


# -- the math, against the reference packages ------------------------------------------------
def test_lime_samples_and_kernel_match_lime_package():
    from sklearn.metrics import pairwise_distances

    samples = lime_samples(12, 200, seed=7)
    expected = np.random.RandomState(7).randint(0, 2, 200 * 12).reshape(200, 12)
    expected[0] = 1
    np.testing.assert_array_equal(samples, expected)
    distances = pairwise_distances(samples, samples[:1], metric="cosine").ravel()  # lime_image's distance
    np.testing.assert_allclose(lime_kernel(samples, 0.25), np.sqrt(np.exp(-(distances**2) / 0.25**2)), atol=1e-12)


def test_weighted_ridge_matches_sklearn():
    from sklearn.linear_model import Ridge

    x = lime_samples(9, 150, seed=3).astype(float)
    y = np.random.default_rng(0).normal(size=150)
    weights = lime_kernel(x, 0.25)
    fit = weighted_ridge(x, y, weights, alpha=1.0)
    reference = Ridge(alpha=1.0, fit_intercept=True).fit(x, y, sample_weight=weights)
    np.testing.assert_allclose(fit.coefficients, reference.coef_, atol=1e-10)
    assert fit.intercept == pytest.approx(reference.intercept_, abs=1e-10)
    assert fit.r2 == pytest.approx(reference.score(x, y, sample_weight=weights), abs=1e-10)


@pytest.mark.parametrize("count", [4, 7])
def test_full_enumeration_gives_exact_shapley_values(count):
    game = _toy_game(count)
    coalitions = shapley_coalitions(count, 10_000, np.random.default_rng(0))
    assert len(coalitions.members) == 2**count - 2
    assert len({z.tobytes() for z in coalitions.members}) == 2**count - 2
    phi = shapley_regression(coalitions, game(coalitions.members), game(np.ones((1, count)))[0],
                             game(np.zeros((1, count)))[0])
    np.testing.assert_allclose(phi, exact_shapley(game, count), atol=1e-10)


def test_kernelshap_sampler_and_solver_match_shap():
    shap = pytest.importorskip("shap")
    count, budget = 10, 300
    game = _toy_game(count)
    np.random.seed(0)  # shap samples with the global NumPy generator
    explainer = shap.KernelExplainer(game, np.zeros((1, count)))
    reference = explainer.shap_values(np.ones((1, count)), nsamples=budget, l1_reg=False, silent=True).ravel()
    ours = shapley_coalitions(count, budget, np.random.default_rng(0))
    enumerated = 2 * count + 2 * math.comb(count, 2)  # sizes 1, 2 and their complements fit this budget
    assert ours.members.shape == explainer.maskMatrix.shape == (budget, count)
    np.testing.assert_array_equal(ours.members[:enumerated], explainer.maskMatrix[:enumerated])
    np.testing.assert_allclose(ours.weights[:enumerated], explainer.kernelWeights[:enumerated], rtol=1e-12)
    assert ours.weights.sum() == pytest.approx(explainer.kernelWeights.sum(), abs=1e-12)
    drawn = ours.members[enumerated:].sum(axis=1)
    assert set(drawn) <= set(range(3, count - 2))  # the sizes left to sample, and complements
    # our solver on shap's own samples gives shap's values
    phi = shapley_regression(Coalitions(explainer.maskMatrix, explainer.kernelWeights), explainer.ey[:, 0],
                             game(np.ones((1, count)))[0], game(np.zeros((1, count)))[0])
    np.testing.assert_allclose(phi, reference, atol=1e-10)


def test_superpixel_means_and_dense_labels():
    image = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    labels = segment_images(image[None, :1].repeat(3, axis=1), np.array([[5, 5, 9, 9]] * 4), seed=0)[0]
    assert labels.dtype == np.int32 and set(np.unique(labels)) == {0, 1}  # renumbered 0..S-1
    means = superpixel_means(image, labels, 2)
    np.testing.assert_allclose(means[0, :, :2], image[0, :, :2].mean())
    np.testing.assert_allclose(means[1, :, 2:], image[1, :, 2:].mean())


# -- the methods through the Explainer ---------------------------------------------------------
def _blocks(rows: int, cols: int, size: int = 64) -> np.ndarray:
    """Labels [size, size]: a rows x cols grid of rectangular superpixels."""
    y, x = np.indices((size, size))
    return (y * rows // size) * cols + x * cols // size


def _superpixel_vector(result, index: int) -> np.ndarray:
    """Image ``index``'s weight per superpixel, read from the dense extras (one weight per superpixel checked)."""
    labels, weight_map = result.extras["segments"][index], result.extras["superpixel_weights"][index]
    vector = np.full(labels.max() + 1, np.nan, np.float32)
    vector[labels] = weight_map
    np.testing.assert_array_equal(vector[labels], weight_map)
    return vector


def _probabilities(explainer, images: np.ndarray, target: int) -> np.ndarray:
    return softmax(explainer.session.logits(np.ascontiguousarray(images, dtype=np.float32)))[:, target]


def test_lime_matches_lime_package(small_explainer, small_batch):
    from lime import lime_image

    image, labels, seed, n_samples = small_batch[0], _blocks(4, 4), 3, 200
    ours = small_explainer.explain(image[None], method="lime", normalize=False, segments=labels, seed=seed,
                                   n_samples=n_samples)
    target = int(ours.targets[0])
    reference = lime_image.LimeImageExplainer(kernel_width=0.25, random_state=seed, feature_selection="none")
    explanation = reference.explain_instance(
        image.transpose(1, 2, 0), lambda hwc: softmax(small_explainer.session.logits(
            np.ascontiguousarray(hwc.transpose(0, 3, 1, 2), dtype=np.float32))),
        labels=(target,), top_labels=None, num_samples=n_samples, batch_size=50,
        segmentation_fn=lambda _: labels, random_seed=0)
    expected = np.zeros(16)
    for feature, weight in explanation.local_exp[target]:
        expected[feature] = weight
    weights = _superpixel_vector(ours, 0)
    assert np.abs(expected).max() > 1e-3  # the scores do depend on the superpixels
    np.testing.assert_allclose(weights, expected, atol=1e-5 * np.abs(expected).max() + 1e-7)
    assert ours.extras["intercept"][0] == pytest.approx(explanation.intercept[target], abs=1e-5)
    assert ours.extras["r2"][0] == pytest.approx(explanation.score, abs=1e-4)
    np.testing.assert_allclose(ours.maps[0], weights[labels], rtol=0, atol=0)  # coefficients painted


def test_lime_top_k_map_and_extras(small_explainer, small_batch):
    labels = _blocks(3, 4)
    full = small_explainer.explain(small_batch[:1], method="lime", normalize=False, segments=labels, n_samples=120)
    top3 = small_explainer.explain(small_batch[:1], method="lime", normalize=False, segments=labels, n_samples=120,
                                   num_features=3)
    weights = _superpixel_vector(full, 0)
    np.testing.assert_array_equal(top3.extras["superpixel_weights"], full.extras["superpixel_weights"])
    kept = np.argsort(-np.abs(weights))[:3]  # lime's explanation size: the largest |weights|
    np.testing.assert_allclose(top3.maps[0], np.where(np.isin(labels, kept), weights[labels], 0.0))
    top = top3.extras["top_superpixels"][0]
    positive = top[top >= 0]
    assert top.shape == (3,) and np.all(weights[positive] > 0)
    np.testing.assert_array_equal(positive, np.argsort(-weights)[: positive.size])
    assert full.extras["top_superpixels"].shape == (1, 5)
    shown = small_explainer.explain(small_batch[:1], method="lime", segments=labels, n_samples=120)
    assert shown.maps.min() >= 0 and shown.maps.max() == pytest.approx(1.0, abs=1e-5)  # signed: positive evidence shown


@pytest.mark.parametrize("baseline", ["mean", 0.0])
def test_kernelshap_equals_brute_force_shapley_values(small_explainer, small_batch, baseline):
    image, labels, count = small_batch[1], _blocks(2, 3), 6
    result = small_explainer.explain(image[None], method="kernelshap", normalize=False, segments=labels,
                                     n_samples=100, baseline=baseline)  # 100 >= 2^6 - 2: every coalition
    target = int(result.targets[0])
    if baseline == "mean":  # independent: each block's mean colour, by a loop over the blocks
        off = np.empty_like(image)
        for segment in range(count):
            inside = labels == segment
            off[:, inside] = image[:, inside].mean(axis=1, keepdims=True)
    else:
        off = np.zeros_like(image)

    def game(members: np.ndarray) -> np.ndarray:
        keep = members[:, labels][:, None]  # [m, 1, H, W]
        return _probabilities(small_explainer, image * keep + off * (1 - keep), target).astype(np.float64)

    phi = _superpixel_vector(result, 0)
    np.testing.assert_allclose(phi, exact_shapley(game, count), atol=2e-6)
    assert result.extras["base_value"][0] == pytest.approx(game(np.zeros((1, count)))[0], abs=1e-6)
    np.testing.assert_allclose(result.maps[0], phi[labels])


def test_kernelshap_efficiency_with_sampled_coalitions(small_explainer, small_batch):
    result = small_explainer.explain(small_batch[:2], method="kernelshap", normalize=False, n_samples=150,
                                     segments={"algorithm": "slic", "n_segments": 30}, output="logit")
    for index in range(2):
        phi = _superpixel_vector(result, index).astype(np.float64)
        assert len(phi) > 10  # 2^S - 2 > 150: coalitions are sampled
        full = result.logits[index, result.targets[index]]  # all on is the image itself
        assert result.extras["full_value"][index] == pytest.approx(full, abs=1e-4)
        assert phi.sum() == pytest.approx(full - result.extras["base_value"][index], abs=1e-3)


def test_per_image_segments_and_seed_reproducibility(small_explainer, small_batch):
    labels = np.stack([_blocks(3, 3), _blocks(2, 5)])
    both = small_explainer.explain(small_batch[:2], method="lime", normalize=False, segments=labels, n_samples=80, seed=5)
    for index in range(2):
        alone = small_explainer.explain(small_batch[index : index + 1], method="lime", normalize=False,
                                        segments=labels[index], n_samples=80, seed=5)
        np.testing.assert_allclose(both.maps[index], alone.maps[0], atol=1e-5)
        np.testing.assert_array_equal(both.extras["segments"][index], labels[index])
    other = small_explainer.explain(small_batch[:1], method="lime", normalize=False, segments=labels[0], n_samples=80,
                                    seed=6)
    assert not np.allclose(other.maps[0], both.maps[0])


@pytest.mark.parametrize("method", ["lime", "kernelshap"])
def test_per_image_segments_across_chunks(small_explainer, small_batch, method):
    """[N, H, W] labels are sliced per chunk: batch_size=1 over 3 images equals each image alone with its labels;
    one [H, W] map and a segmentation name are shared by every chunk."""
    labels = np.stack([_blocks(3, 3), _blocks(2, 4), _blocks(4, 2)])
    options = {"method": method, "normalize": False, "n_samples": 40, "seed": 2}
    chunked = small_explainer.explain(small_batch, segments=labels, batch_size=1, **options)
    for index in range(3):
        alone = small_explainer.explain(small_batch[index : index + 1], segments=labels[index], **options)
        np.testing.assert_allclose(chunked.maps[index], alone.maps[0], atol=1e-5 * np.abs(alone.maps).max())
        np.testing.assert_array_equal(chunked.extras["segments"][index], labels[index])
        for key, values in alone.extras.items():
            np.testing.assert_allclose(chunked.extras[key][index], values[0], atol=1e-4)
    for shared in (labels[1], {"algorithm": "slic", "n_segments": 8}):
        one_call = small_explainer.explain(small_batch, segments=shared, batch_size=3, **options)
        chunked = small_explainer.explain(small_batch, segments=shared, batch_size=1, **options)
        np.testing.assert_allclose(chunked.maps, one_call.maps, atol=1e-5 * np.abs(one_call.maps).max())
        np.testing.assert_array_equal(chunked.extras["segments"], one_call.extras["segments"])


def test_extras_are_regular_arrays_and_the_cli_saves_them_without_pickle(workdir, small_onnx, capsys):
    from PIL import Image

    from explainrt.cli import main

    (workdir / "small.onnx").write_bytes(small_onnx.SerializeToString())
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(workdir / "a.png")
    status = main(["explain", "a.png", "--model", "small.onnx", "--input-size", "64", "64", "--method", "lime",
                   "-O", "n_samples=30", "-O", 'segments={"algorithm": "slic", "n_segments": 10}', "--raw",
                   "--out", "out"])
    assert status == 0, capsys.readouterr().err
    with np.load(workdir / "out" / "a.lime.extras.npz", allow_pickle=False) as extras:
        assert sorted(extras.files) == ["intercept", "r2", "segments", "superpixel_weights", "top_superpixels"]
        assert extras["segments"].dtype == np.int32 and extras["superpixel_weights"].dtype == np.float32
        assert extras["superpixel_weights"].shape == extras["segments"].shape == (64, 64)
        assert extras["top_superpixels"].shape == (5,) and extras["r2"].shape == ()
        raw = np.load(workdir / "out" / "a.lime.npy")
        np.testing.assert_array_equal(raw, extras["superpixel_weights"])  # no num_features: the map is the weights


@pytest.mark.parametrize("segments", ["slic", "quickshift", {"algorithm": "slic", "n_segments": 12, "compactness": 20}])
def test_scikit_image_segmentations(small_explainer, small_batch, segments):
    result = small_explainer.explain(small_batch[:1], method="lime", normalize=False, segments=segments, n_samples=40)
    labels = result.extras["segments"][0]
    assert labels.shape == (64, 64) and labels.min() == 0
    assert result.extras["superpixel_weights"].shape == (1, 64, 64) and labels.max() + 1 >= 2
    assert np.isfinite(_superpixel_vector(result, 0)).all()


@pytest.mark.parametrize(("options", "message"), [
    ({"segments": np.zeros((64, 64), dtype=np.int64)}, "segments: image 0 has a single segment"),
    ({"segments": _blocks(2, 2, 32)}, r"segments must be one value or one per image \(1 images\), got 32 "
                                      r"\(shape \(32, 32\); one map for all images has the images' size \(64, 64\)"),
    ({"segments": np.stack([_blocks(2, 2, 32)])}, "segments for image 0 must be int labels of shape"),
    ({"segments": np.zeros((64, 64))}, "segments must be"),
    ({"segments": "watershed"}, r"method 'lime': segments must be 'slic', 'quickshift', a dict .* got 'watershed'"),
    ({"segments": {"algorithm": "slic", "n_segmentz": 4}}, "segments: bad parameters for 'slic'"),
    ({"n_samples": 1}, "n_samples must be an integer >= 2"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"seed": "0"}, "seed must be an integer"),
    ({"baseline": "blur"}, "baseline must be 'mean' or a finite number"),
    ({"num_features": 0}, "num_features must be an integer >= 1"),
    ({"kernel_width": -1.0}, "kernel_width must be a finite number > 0"),
    ({"alpha": -1}, "alpha must be a finite number >= 0"),
    ({"output": "loss"}, "output must be one of"),
])
def test_bad_options(small_explainer, small_batch, options, message):
    with pytest.raises(InvalidInputError, match=message):
        small_explainer.explain(small_batch[:1], method="lime", **{"n_samples": 10, **options})


def test_bad_inputs_kernelshap(small_explainer, small_batch):
    with pytest.raises(InvalidInputError, match="kernelshap.*kernel_width"):
        small_explainer.explain(small_batch[:1], method="kernelshap", kernel_width=0.5)
    with pytest.raises(InvalidInputError, match=r"segments must be one value or one per image \(3 images\), got 2"):
        small_explainer.explain(small_batch, method="kernelshap", batch_size=2, n_samples=10,
                                segments=np.stack([_blocks(2, 2)] * 2))
    with pytest.raises(InvalidInputError, match="images have shape"):  # the pipeline's size check
        small_explainer.explain(np.zeros((1, 3, 32, 32), np.float32), method="kernelshap")


def test_lime_finds_the_cat_on_the_default_model(default_explainer, example_images):
    """Chelsea's face pasted on a noisy grey canvas: LIME's top superpixels for the cat lie on the cat."""
    from PIL import Image

    canvas = np.full((224, 224, 3), 128, np.uint8) + np.random.default_rng(0).integers(0, 20, (224, 224, 3), np.uint8)
    canvas[110:210, 60:210] = np.asarray(Image.fromarray(example_images["chelsea"]).resize((150, 100)))
    result = default_explainer.explain(canvas, method="lime", normalize=False, n_samples=200)
    assert result.targets[0] in {281, 282, 285}
    labels, top = result.extras["segments"][0], result.extras["top_superpixels"][0]
    inside = np.zeros((224, 224), bool)
    inside[110:210, 60:210] = True
    assert np.all(top >= 0)
    assert all(inside[labels == superpixel].mean() > 0.9 for superpixel in top)


@pytest.mark.parametrize("method", ["lime", "kernelshap"])
def test_cancel_stops_between_runtime_calls(small_explainer, small_batch, monkeypatch, method):
    import threading

    cancel, calls = threading.Event(), []
    logits = small_explainer.session.logits

    def counting(images):
        calls.append(len(images))
        if len(calls) == 2:
            cancel.set()
        return logits(images)

    monkeypatch.setattr(small_explainer.session, "logits", counting)
    with pytest.raises(ExplanationCancelled):
        small_explainer.explain(small_batch[:1], method=method, segments=_blocks(3, 3), n_samples=200, batch_size=16,
                                cancel=cancel)
    assert len(calls) == 2  # the reference pass and one batch of 16 perturbations, then it stopped


def test_torch_backend_gives_the_same_attributions(small_explainer, small_torch_explainer, small_batch):
    options = {"normalize": False, "segments": _blocks(3, 3), "n_samples": 60, "output": "logit"}
    for method in ("lime", "kernelshap"):
        onnx = small_explainer.explain(small_batch[:1], method=method, **options)
        torch = small_torch_explainer.explain(small_batch[:1], method=method, **options)
        np.testing.assert_allclose(torch.maps, onnx.maps, atol=1e-4 * np.abs(onnx.maps).max())
