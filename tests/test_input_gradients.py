"""Saliency, Integrated Gradients and SmoothGrad against Captum and torch.autograd.

The model is ``biased_resnet`` (random ResNet-18 with random batch-norm biases, 64x64 inputs)
on ONNX Runtime (its explainrt export) and on the torch backend. Errors are
``max |ours - reference| / max |reference|`` over the maps of the batch.

Independent references (issue 17): Saliency ``abs=False`` is Captum's ``Saliency(abs=False)`` /
``InputXGradient`` summed over channels; SmoothGrad ``squared`` is a torch.autograd loop, image by
image and copy by copy, on explainrt's documented noise (numpy ``default_rng(seed)``, re-drawn in
the test), and Captum's ``NoiseTunnel(nt_type="smoothgrad_sq")`` without noise; every quadrature
rule and baseline of Integrated Gradients is Captum's ``IntegratedGradients(method=rule)`` at equal
``n_steps``. The rules, the baselines and the SmoothGrad loop run on ``smooth_model`` (tanh / SiLU, no
ReLU): on the ReLU ResNet, float32 rounding decides ReLUs
whose input is within ~1e-6 of 0 differently in torch and ONNX Runtime at some path points (measured
at 16 steps of riemann_middle: a pre-activation of 7.5e-7 in float64 is 0.0 in torch float32, the
point's gradient differs by 1.2e-2 and the map by 1.1e-3 relative, with ONNX Runtime on float64's
side), so there only the rules whose 16 points happen to avoid such ties are compared.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from captum.attr import InputXGradient, IntegratedGradients, NoiseTunnel, Saliency

from explainrt import Explainer, from_torch
from explainrt.errors import InvalidInputError
from explainrt.runtime.onnxruntime import OnnxRuntimeSession

PARITY = 1e-3  # the bound for Integrated Gradients vs Captum
AUTOGRAD = 1e-4


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)


def top_classes(model: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.from_numpy(images)).argmax(dim=1)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_input_gradients_match_autograd_on_zoo_models(name: str) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    session = OnnxRuntimeSession(from_torch(model, torch.zeros(1, 3, 64, 64)))
    images = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    targets = np.array([[1, -1], [7, -2]])
    result = session.input_gradients(images, targets)
    inputs = torch.from_numpy(images).requires_grad_(True)
    logits = model(inputs)
    rows = torch.arange(2)
    expected = np.stack([torch.autograd.grad(logits[rows, torch.from_numpy(result.targets[:, k])].sum(), inputs,
                                             retain_graph=True)[0].numpy() for k in range(2)], axis=1)
    assert result.gradients[0].shape == (2, 2, 3, 64, 64)
    assert relative_error(result.gradients[0], expected) < AUTOGRAD


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("multiply_by_input", [False, True])
@pytest.mark.parametrize("absolute", [True, False])
def test_saliency_matches_captum(biased_explainers, biased_resnet, batch, backend: str, multiply_by_input: bool,  # noqa: ANN001
                                 absolute: bool) -> None:
    """abs=True: max over channels of Captum's |attribution|; abs=False: the signed sum over channels of
    Captum's Saliency(abs=False) (the raw gradient) or InputXGradient."""
    explanation = biased_explainers[backend].explain(batch, method="saliency", targets=-1, normalize=False,
                                                     multiply_by_input=multiply_by_input, abs=absolute)
    targets = top_classes(biased_resnet, batch)
    inputs = torch.from_numpy(batch)
    if multiply_by_input:
        reference = InputXGradient(biased_resnet).attribute(inputs, target=targets)
    else:
        reference = Saliency(biased_resnet).attribute(inputs, target=targets, abs=False)
    reference = reference.detach().numpy()
    reference = np.abs(reference).max(axis=1) if absolute else reference.sum(axis=1)
    np.testing.assert_array_equal(explanation.targets, targets.numpy())
    if not absolute:
        assert explanation.maps.min() < 0 < explanation.maps.max()  # the signed map keeps both signs
    error = relative_error(explanation.maps, reference)
    print(f"saliency parity ({backend}, multiply_by_input={multiply_by_input}, abs={absolute}): {error:.2e}")
    assert error < AUTOGRAD


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("rule", ["riemann_trapezoid", "gausslegendre"])
def test_integrated_gradients_match_captum(biased_explainers, biased_resnet, batch, backend: str, rule: str) -> None:  # noqa: ANN001
    steps = 16
    explanation = biased_explainers[backend].explain(batch, method="integrated-gradients", targets=-1, normalize=False,
                                              steps=steps, rule=rule, batch_size=7)
    targets = top_classes(biased_resnet, batch)
    attributions, delta = IntegratedGradients(biased_resnet).attribute(
        torch.from_numpy(batch), baselines=0.0, target=targets, n_steps=steps, method=rule,
        return_convergence_delta=True)
    reference = attributions.detach().numpy().sum(axis=1)
    error = relative_error(explanation.maps, reference)
    print(f"integrated gradients parity ({backend}, {rule}, {steps} steps): {error:.2e}")
    assert error <= PARITY
    # Captum's convergence delta is the same completeness gap: sum(attributions) - (f(x) - f(x'))
    spread = np.abs(explanation.extras["completeness_gap"] - delta.detach().numpy())
    assert spread.max() <= PARITY * np.abs(reference).sum(axis=(1, 2)).max()


@pytest.fixture(scope="module")
def smooth_model() -> torch.nn.Module:
    """A random CNN with smooth activations only (32x32 inputs, 10 classes): its gradient has no kinks."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
        torch.nn.SiLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()


@pytest.fixture(scope="module")
def smooth_batch() -> np.ndarray:
    return np.random.default_rng(5).standard_normal((3, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def smooth_explainers(smooth_model: torch.nn.Module) -> dict:
    """``smooth_model`` on ONNX Runtime and on the torch backend, by backend name."""
    layers = [smooth_model[3]]
    return {"onnxruntime": Explainer(from_torch(smooth_model, torch.zeros(1, 3, 32, 32), layers)),
            "torch": Explainer(smooth_model, target_layers=layers, backend="torch", input_size=(32, 32))}


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("rule", ["riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid",
                                  "gausslegendre"])
def test_integrated_gradients_rules_match_captum(smooth_explainers, smooth_model, smooth_batch, backend: str,  # noqa: ANN001
                                                 rule: str) -> None:
    """Each quadrature rule against Captum's, at equal n_steps; steps 5 so that the rules' sums differ
    (checked: the maps of two rules are further apart than the tolerance)."""
    images = smooth_batch
    targets = top_classes(smooth_model, images)
    explanation = smooth_explainers[backend].explain(images, method="integrated-gradients", normalize=False, steps=5,
                                                     rule=rule, batch_size=4, baseline=0.5)
    reference = IntegratedGradients(smooth_model).attribute(torch.from_numpy(images), baselines=0.5, target=targets,
                                                            n_steps=5, method=rule).detach().numpy().sum(axis=1)
    np.testing.assert_array_equal(explanation.targets, targets.numpy())
    error = relative_error(explanation.maps, reference)
    print(f"integrated gradients rule parity ({backend}, {rule}, 5 steps): {error:.2e}")
    assert error < AUTOGRAD
    other = "riemann_right" if rule == "riemann_left" else "riemann_left"
    apart = smooth_explainers[backend].explain(images, method="integrated-gradients", normalize=False, steps=5,
                                               rule=other, baseline=0.5)
    assert relative_error(apart.maps, reference) > 10 * AUTOGRAD


def test_integrated_gradients_baselines_match_captum(smooth_explainers, smooth_model, smooth_batch) -> None:  # noqa: ANN001
    """A constant, an image and the blurred input as baselines, against Captum given the same baseline
    tensor; each baseline's map differs from the zero baseline's by far more than the tolerance."""
    from explainrt.methods.gradients import baselines

    batch = smooth_batch
    targets = top_classes(smooth_model, batch)
    grey = np.linspace(-1, 1, 3 * 32 * 32, dtype=np.float32).reshape(3, 32, 32)
    zero = smooth_explainers["onnxruntime"].explain(batch, method="integrated-gradients", normalize=False, steps=8)
    for option, reference_baseline in ((0.5, torch.full(batch.shape, 0.5)),
                                       (grey, torch.from_numpy(np.broadcast_to(grey, batch.shape).copy())),
                                       ("blur", torch.from_numpy(baselines("blur", batch)))):
        explanation = smooth_explainers["onnxruntime"].explain(batch, method="integrated-gradients", normalize=False,
                                                               baseline=option, steps=8)
        reference = IntegratedGradients(smooth_model).attribute(torch.from_numpy(batch), baselines=reference_baseline,
                                                                target=targets, n_steps=8).detach().numpy().sum(axis=1)
        assert relative_error(explanation.maps, reference) < AUTOGRAD
        assert relative_error(zero.maps, reference) > 10 * AUTOGRAD


def test_blur_baseline_is_a_smoothed_image(batch) -> None:  # noqa: ANN001
    from explainrt.methods.gradients import baselines

    blurred = baselines("blur", batch)
    assert blurred.shape == batch.shape and blurred.dtype == np.float32
    assert blurred.std() < 0.5 * batch.std()  # white noise loses most of its variance
    np.testing.assert_allclose(blurred.mean(axis=(2, 3)), batch.mean(axis=(2, 3)), atol=0.05)


def test_integrated_gradients_completeness_converges(biased_explainers, batch) -> None:  # noqa: ANN001
    explanation = biased_explainers["onnxruntime"].explain(batch, method="integrated-gradients", normalize=False, steps=64)
    logits = explanation.logits[np.arange(3), explanation.targets]
    plain = biased_explainers["onnxruntime"].session.logits(np.zeros_like(batch))[np.arange(3), explanation.targets]
    np.testing.assert_allclose(explanation.maps.sum(axis=(1, 2)) - (logits - plain),
                               explanation.extras["completeness_gap"], rtol=1e-3, atol=1e-4)
    assert np.abs(explanation.extras["completeness_gap"]).max() < 0.01 * np.abs(logits - plain).max()


def test_integrated_gradients_do_not_depend_on_batch_size(biased_explainers, batch) -> None:  # noqa: ANN001
    one = biased_explainers["onnxruntime"].explain(batch, method="integrated-gradients", normalize=False, steps=6, batch_size=1)
    many = biased_explainers["onnxruntime"].explain(batch, method="integrated-gradients", normalize=False, steps=6, batch_size=64)
    assert relative_error(one.maps, many.maps) < 1e-5


def test_integrated_gradients_explain_the_requested_rank(biased_explainers, biased_resnet, batch) -> None:  # noqa: ANN001
    explanation = biased_explainers["onnxruntime"].explain(batch, method="integrated-gradients", targets=-2, steps=4)
    with torch.no_grad():
        second = biased_resnet(torch.from_numpy(batch)).argsort(dim=1, descending=True)[:, 1].numpy()
    np.testing.assert_array_equal(explanation.targets, second)


def autograd_smoothgrad(model: torch.nn.Module, images: np.ndarray, targets: torch.Tensor, samples: int,
                        noise: float, seed: int, squared: bool = False) -> np.ndarray:
    """Mean gradient (``squared``: mean squared gradient, Captum's smoothgrad_sq) over the noisy copies
    explainrt documents: one standard-normal float32 draw of [n, samples, C, H, W] from numpy's
    default_rng(seed), scaled by noise * (max - min) per image."""
    draws = np.random.default_rng(seed).standard_normal((images.shape[0], samples, *images.shape[1:]), dtype=np.float32)
    stds = noise * (images.max(axis=(1, 2, 3)) - images.min(axis=(1, 2, 3)))
    means = []
    for image, target, std, eps in zip(images, targets, stds, draws):
        noisy = torch.from_numpy(image[None] + std * eps).requires_grad_(True)
        model(noisy)[:, target].sum().backward()
        gradients = noisy.grad.numpy()
        means.append((gradients * gradients if squared else gradients).mean(axis=0))
    return np.stack(means)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("squared", [False, True])
def test_smoothgrad_matches_an_autograd_loop_with_the_same_noise(smooth_explainers, smooth_model, smooth_batch,  # noqa: ANN001
                                                                 backend: str, squared: bool) -> None:
    """The loop re-draws explainrt's noise with its documented generator and seed, then takes torch.autograd
    gradients image by image, copy by copy (explainrt batches copies of several images per call)."""
    batch = smooth_batch
    explanation = smooth_explainers[backend].explain(batch, method="smoothgrad", normalize=False, n_samples=5, noise=0.2,
                                                     seed=3, batch_size=4, squared=squared)
    mean = autograd_smoothgrad(smooth_model, batch, top_classes(smooth_model, batch), 5, 0.2, 3, squared)
    error = relative_error(explanation.maps, mean.sum(axis=1) if squared else np.abs(mean).sum(axis=1))
    print(f"smoothgrad parity ({backend}, squared={squared}): {error:.2e}")
    assert error < AUTOGRAD


def test_smoothgrad_squared_and_seeds(biased_explainers, batch) -> None:  # noqa: ANN001
    explainer = biased_explainers["onnxruntime"]
    plain = explainer.explain(batch, method="smoothgrad", normalize=False, n_samples=4, seed=1)
    again = explainer.explain(batch, method="smoothgrad", normalize=False, n_samples=4, seed=1)
    other = explainer.explain(batch, method="smoothgrad", normalize=False, n_samples=4, seed=2)
    squared = explainer.explain(batch, method="smoothgrad", normalize=False, n_samples=4, seed=1, squared=True)
    np.testing.assert_array_equal(plain.maps, again.maps)
    assert relative_error(other.maps, plain.maps) > 1e-2
    assert (squared.maps >= 0).all() and relative_error(squared.maps, plain.maps) > 1e-2


@pytest.mark.parametrize("squared", [False, True])
def test_smoothgrad_without_noise_is_captum_noise_tunnel_without_noise(biased_explainers, biased_resnet, batch,  # noqa: ANN001
                                                                       squared: bool) -> None:
    explanation = biased_explainers["onnxruntime"].explain(batch, method="smoothgrad", normalize=False, n_samples=2,
                                                           noise=0.0, squared=squared)
    tunnel = NoiseTunnel(Saliency(biased_resnet)).attribute(
        torch.from_numpy(batch), nt_type="smoothgrad_sq" if squared else "smoothgrad", nt_samples=2, stdevs=0.0,
        target=top_classes(biased_resnet, batch), abs=False).detach().numpy()
    reference = tunnel.sum(axis=1) if squared else np.abs(tunnel).sum(axis=1)
    assert relative_error(explanation.maps, reference) < AUTOGRAD


@pytest.mark.parametrize(("method", "options", "message"), [
    ("integrated-gradients", {"steps": 0}, "steps must be an integer >= 1"),
    ("integrated-gradients", {"steps": 2.5}, "steps must be an integer >= 1"),
    ("integrated-gradients", {"rule": "simpson"}, "rule must be one of 'riemann_trapezoid', .*, got 'simpson'"),
    ("integrated-gradients", {"rule": "riemann_trapezoid", "steps": 1}, "riemann_trapezoid needs steps >= 2"),
    ("integrated-gradients", {"baseline": np.zeros((3, 32, 32))}, r"\[C, H, W\] = \[3, 64, 64\], got shape \[3, 32, 32\]"),
    ("integrated-gradients", {"baseline": "noise"},
     r"baseline must be a finite number, 'blur' or a numeric array \[C, H, W\], got 'noise'"),
    ("smoothgrad", {"n_samples": 0}, "n_samples must be an integer >= 1"),
    ("smoothgrad", {"noise": -0.1}, "noise must be a finite number >= 0"),
    ("smoothgrad", {"seed": -1}, "seed must be an integer >= 0"),
    ("saliency", {"abs": "yes"}, "abs must be True or False"),
])
def test_bad_options_are_named(biased_explainers, batch, method: str, options: dict, message: str) -> None:  # noqa: ANN001
    with pytest.raises(InvalidInputError, match=message):
        biased_explainers["onnxruntime"].explain(batch, method=method, **options)
