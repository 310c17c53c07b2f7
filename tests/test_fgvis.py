"""FGVis: the defended input gradient against an independent torch implementation, and the
preservation and deletion games on ``biased_resnet`` (random ResNet-18, random batch-norm biases).

The independent reference hooks every ``nn.ReLU`` module (in call order): each hook keeps the
value and lets the gradient through only where the activation is at most its reference (a
straight-through ``torch.where(out <= reference, out, out.detach())``; ReLU's own backward adds
out > 0), where the sessions use an in-graph Where (ONNX) or a torch-function mode (torch).

The whole optimisation (``test_fgvis_games_match_an_independent_torch_loop``) is re-run image by
image in torch: the mask as a tensor, e = m * x (baseline 0), the score gradient dS/dm by
torch.autograd through the product m * x (with the hooked ReLUs above, references from the image),
normalised by its largest magnitude, the sparsity term added, a clipped step; the same stopping and
keeping rules. FGVis has no randomness, so both run the same steps (see the test's docstring
for how many steps compare by value, and why).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from explainrt import Explainer, from_torch
from explainrt.errors import InvalidInputError
from explainrt.export.explainable import make_explainable
from explainrt.export.spec import REFERENCE_PREFIX, RELU_OUTPUT_PREFIX, original_model
from explainrt.runtime.onnxruntime import OnnxRuntimeSession

TOLERANCE = 1e-4
RELUS = (torch.nn.ReLU, torch.nn.ReLU6)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)


def relu_activations(model: torch.nn.Module, images: np.ndarray) -> list[np.ndarray]:
    """Every ``nn.ReLU`` and ``nn.ReLU6`` module's output, in call order."""
    recorded: list[np.ndarray] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: recorded.append(out.detach().numpy().copy()))
               for m in model.modules() if isinstance(m, RELUS)]
    try:
        with torch.no_grad():
            model(torch.from_numpy(images))
    finally:
        for handle in handles:
            handle.remove()
    return recorded


def bounded_relu_gradient(model: torch.nn.Module, images: np.ndarray, references: list[np.ndarray],
                          targets: np.ndarray) -> np.ndarray:
    """d(-log softmax_t)/d input, each ReLU or ReLU6 (k-th call) passing the gradient only where
    0 < activation <= references[k] (and, for ReLU6, activation < 6)."""
    bounds = iter(references)
    handles = [m.register_forward_hook(
        lambda _m, _i, out: torch.where(out <= torch.from_numpy(next(bounds)), out, out.detach()))
        for m in model.modules() if isinstance(m, RELUS)]
    try:
        inputs = torch.from_numpy(images).requires_grad_(True)
        loss = -torch.log_softmax(model(inputs), dim=1)[torch.arange(len(targets)), torch.from_numpy(targets)].sum()
        return torch.autograd.grad(loss, inputs)[0].numpy()
    finally:
        for handle in handles:
            handle.remove()


def fgvis_reference(model: torch.nn.Module, image: np.ndarray, game: str, sparsity: float, lr: float,
                    steps: int, defense: bool) -> tuple[np.ndarray, int, bool, int]:
    """(mask [C, H, W], steps taken, goal reached, class under the mask) of one image, baseline 0."""
    references = relu_activations(model, image[None])
    x = torch.from_numpy(image)[None]
    with torch.no_grad():
        target = int(model(x).argmax())
    mask, kept, kept_size = torch.ones_like(x), None, float("inf")
    taken, reached, shown = steps, False, -1
    for step in range(steps + 1):
        bounds = iter(references)
        handles = [m.register_forward_hook(
            lambda _m, _i, out, bounds=bounds: torch.where(out <= torch.from_numpy(next(bounds)), out, out.detach()))
            for m in model.modules() if isinstance(m, RELUS) and defense]
        try:
            leaf = mask.clone().requires_grad_(True)
            logits = model(leaf * x)
            (score_gradient,) = torch.autograd.grad(torch.log_softmax(logits, dim=1)[0, target], leaf)
        finally:
            for handle in handles:
                handle.remove()
        predicted = int(logits.argmax())
        if game == "delete":
            shown = predicted
            if predicted != target:
                taken, reached = step, True
                break
        elif predicted == target and float(mask.sum()) < kept_size:
            kept, kept_size, taken, reached = mask.clone(), float(mask.sum()), step, True
        if step == steps:
            break
        pull = score_gradient / score_gradient.abs().max()
        mask = torch.clamp(mask - lr * ((sparsity - pull) if game == "preserve" else (pull - sparsity)), 0.0, 1.0)
    if game == "preserve":
        shown = target if reached else predicted
        mask = kept if reached else mask
    return mask[0].numpy(), taken, reached, shown


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize(("game", "steps", "lr", "defense"), [
    ("preserve", 15, 0.1, False), ("delete", 30, 0.2, False), ("delete", 30, 1.0, True)])
def test_fgvis_games_match_an_independent_torch_loop(biased_explainers, biased_resnet, images, backend: str,  # noqa: ANN001
                                                     game: str, steps: int, lr: float, defense: bool) -> None:
    """The games' masks, steps, goals and classes against the torch loop, image by image.

    The trajectory is compared only while it is well-conditioned: the score gradient jumps where a ReLU
    or max-pool decision flips, so a 1e-6 rounding difference there (torch on a batch of 1 vs 2:
    measured at step 16 of the undefended preservation game, input 1.5e-6 apart, gradient 3 %) moves
    the masks apart (0.02-0.07 by step 22); and the defence's test out <= reference is a tie wherever
    the mask has not yet changed the receptive field, decided by rounding (masks 2e-4 apart after two
    defended preservation steps; and the undefended deletion at lr 0.1 on the torch backend: 2.3e-4 after
    two steps, where lr 0.2 flips the class one step earlier). The defended gradient itself is compared above."""
    explanation = biased_explainers[backend].explain(images, method="fgvis", game=game, steps=steps, lr=lr,
                                                     defense=defense, normalize=False)
    sparsity = 0.1 if game == "preserve" else 0.0  # the games' default lambda
    for index, image in enumerate(images):
        mask, taken, reached, shown = fgvis_reference(biased_resnet, image, game, sparsity, lr, steps, defense)
        error = float(np.abs(explanation.extras["mask"][index] - mask).max())
        print(f"fgvis {game} ({backend}, defense={defense}) image {index}: mask error {error:.2e}, "
              f"steps {taken}, reached {reached}")
        assert error < TOLERANCE
        assert explanation.extras["steps"][index] == taken and explanation.extras["reached"][index] == reached
        assert explanation.extras["perturbed_classes"][index] == shown
        assert mask.min() < 1  # the optimisation moved the mask


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_defended_gradient_matches_an_independent_torch_implementation(biased_explainers, biased_resnet, images,  # noqa: ANN001
                                                                      backend: str) -> None:
    """References well away from the activations (each its activation x 0.7 or x 1.5, at random),
    so that no comparison out <= reference is decided by rounding: the two backends' activations
    differ by ~1e-6, and one element decided differently moves the gradient by ~1e-3."""
    session = biased_explainers[backend].session
    targets = np.array([[3], [-2]])
    perturbed = (0.6 * images + 0.8 * np.random.default_rng(1).standard_normal(images.shape)).astype(np.float32)
    first, activations = session.defended_input_gradients(perturbed, targets, None, "cross_entropy")
    plain = session.input_gradients(perturbed, targets, "cross_entropy")
    # without references nothing bounds the activations: the plain gradient
    assert relative_error(first.gradients[0], plain.gradients[0]) < TOLERANCE
    rng = np.random.default_rng(2)
    in_call_order = relu_activations(biased_resnet, perturbed)
    factors = [np.where(rng.random(a.shape) < 0.2, 0.7, 1.5).astype(np.float32) for a in in_call_order]
    if backend == "onnxruntime":  # its Relus count from the logits back: the reverse of ResNet's call order
        factors = factors[::-1]
    assert [a.shape for a in activations] == [f.shape for f in factors]
    defended, _ = session.defended_input_gradients(perturbed, first.targets, [a * f for a, f in zip(activations, factors)],
                                                   "cross_entropy")
    expected = bounded_relu_gradient(biased_resnet, perturbed, [a * f for a, f in zip(
        in_call_order, factors[::-1] if backend == "onnxruntime" else factors)], first.targets[:, 0])
    assert relative_error(defended.gradients[0][:, 0], expected) < TOLERANCE
    assert relative_error(plain.gradients[0][:, 0], expected) > 0.05  # the defence does bite here


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_defended_relu6_matches_the_torch_implementation(backend: str) -> None:
    """ReLU6 (an ONNX Clip from 0, as in MobileNet and the default EfficientNet-Lite) is defended too."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU6(),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU6(inplace=True),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 5)).eval()
    if backend == "torch":
        session = Explainer(model, target_layers=[model[4]], backend="torch", input_size=(16, 16)).session
    else:
        session = OnnxRuntimeSession(from_torch(model, torch.zeros(1, 3, 16, 16), [model[4]]))
    images = (3 * np.random.default_rng(3).standard_normal((2, 3, 16, 16))).astype(np.float32)
    targets = np.array([[1], [4]])
    _, activations = session.defended_input_gradients(images, targets, None, "cross_entropy")
    in_call_order = relu_activations(model, images)
    assert any((a >= 6).any() for a in in_call_order)  # the upper clip matters
    rng = np.random.default_rng(4)
    factors = [np.where(rng.random(a.shape) < 0.3, 0.7, 1.5).astype(np.float32) for a in in_call_order]
    ordered = factors[::-1] if backend == "onnxruntime" else factors  # ONNX counts from the logits back
    assert [a.shape for a in activations] == [f.shape for f in ordered]
    defended, _ = session.defended_input_gradients(images, targets, [a * f for a, f in zip(activations, ordered)],
                                                   "cross_entropy")
    expected = bounded_relu_gradient(model, images, [a * f for a, f in zip(in_call_order, factors)], targets[:, 0])
    assert relative_error(defended.gradients[0][:, 0], expected) < TOLERANCE


def test_defended_gradient_with_the_original_activations(biased_explainers, biased_resnet, images) -> None:  # noqa: ANN001
    """FGVis's use: references from the unperturbed image (torch backend: the same arithmetic as the
    hooks, so even near-ties are decided alike)."""
    session = biased_explainers["torch"].session
    targets = np.array([[3], [5]])
    _, references = session.defended_input_gradients(images, targets, None, "cross_entropy")
    perturbed = (0.6 * images + 0.8 * np.random.default_rng(1).standard_normal(images.shape)).astype(np.float32)
    defended, _ = session.defended_input_gradients(perturbed, targets, references, "cross_entropy")
    expected = bounded_relu_gradient(biased_resnet, perturbed, relu_activations(biased_resnet, images), targets[:, 0])
    assert relative_error(defended.gradients[0][:, 0], expected) < TOLERANCE


def test_defended_model_adds_one_reference_per_relu_and_keeps_outputs(biased_onnx, images) -> None:  # noqa: ANN001
    plain = original_model(biased_onnx)
    defended = make_explainable(plain, ["input"], objective="cross_entropy", defended_relus=True)
    relus = sum(node.op_type == "Relu" for node in plain.graph.node)
    references = [v.name for v in defended.graph.input if v.name.startswith(REFERENCE_PREFIX)]
    outputs = [v.name for v in defended.graph.output if v.name.startswith(RELU_OUTPUT_PREFIX)]
    assert len(references) == len(outputs) == relus == 17
    onnx.checker.check_model(defended)
    session = OnnxRuntimeSession(biased_onnx)
    result, activations = session.defended_input_gradients(images, np.array([[0], [1]]))
    np.testing.assert_allclose(result.logits, session.logits(images), rtol=1e-5, atol=1e-5)
    assert len(activations) == 17 and all(a.shape[0] == 2 and (a >= 0).all() for a in activations)
    with pytest.raises(InvalidInputError, match="17 defended Relus; got 2 references"):
        session.defended_input_gradients(images, np.array([[0], [1]]), activations[:2])


@pytest.mark.parametrize(("backend", "defense"), [("onnxruntime", True), ("onnxruntime", False), ("torch", True)])
def test_deletion_mask_flips_the_class(biased_explainers, biased_resnet, images, backend: str, defense: bool) -> None:  # noqa: ANN001
    explanation = biased_explainers[backend].explain(images, method="fgvis", game="delete", defense=defense, normalize=False)
    mask = explanation.extras["mask"]
    with torch.no_grad():
        original = biased_resnet(torch.from_numpy(images)).argmax(dim=1).numpy()
        deleted = biased_resnet(torch.from_numpy(mask * images)).argmax(dim=1).numpy()  # baseline 0
    np.testing.assert_array_equal(explanation.targets, original)
    assert explanation.extras["reached"].all()
    assert (deleted != original).all()
    np.testing.assert_array_equal(explanation.extras["perturbed_classes"], deleted)
    assert ((mask >= 0) & (mask <= 1)).all() and (mask < 1).any()
    np.testing.assert_allclose(explanation.maps, (1 - mask).mean(axis=1), rtol=1e-6)


def test_preservation_mask_keeps_the_class_and_is_sparse(biased_explainers, biased_resnet, images) -> None:  # noqa: ANN001
    explanation = biased_explainers["onnxruntime"].explain(images, method="fgvis", game="preserve", steps=120, normalize=False)
    mask = explanation.extras["mask"]
    with torch.no_grad():
        original = biased_resnet(torch.from_numpy(images)).argmax(dim=1).numpy()
        kept = biased_resnet(torch.from_numpy(mask * images)).argmax(dim=1).numpy()
    assert explanation.extras["reached"].all()
    np.testing.assert_array_equal(kept, original)
    assert mask.mean() < 0.3
    np.testing.assert_allclose(explanation.maps, mask.mean(axis=1), rtol=1e-6)


@pytest.mark.parametrize(("options", "message"), [
    ({"game": "hide"}, "game must be one of 'preserve', 'delete', got 'hide'"),
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"lr": 0}, "lr must be a finite number > 0"),
    ({"lambda": -1}, "lambda must be a finite number >= 0"),
    ({"defense": "yes"}, "defense must be True or False"),
    ({"baseline": np.zeros((64, 64))}, r"baseline must be .* \[C, H, W\], got a float64 array of shape \(64, 64\)"),
    ({"baseline": np.zeros((3, 32, 32))}, r"\[C, H, W\] = \[3, 64, 64\]"),
])
def test_bad_options_are_named(biased_explainers, images, options: dict, message: str) -> None:  # noqa: ANN001
    with pytest.raises(InvalidInputError, match=message):
        biased_explainers["onnxruntime"].explain(images, method="fgvis", **options)
