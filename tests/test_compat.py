"""explainrt.compat against the grad-cam package itself: every method on five torchvision models
(random weights) and on a tiny net, multi-layer averaging, top-class targets, test-time
augmentation, Ablation-CAM's ablation values, and clear errors for what compat does not support.

Score-CAM and Ablation-CAM run the model once per channel (pytorch-grad-cam runs the whole model for
both): on the five torchvision models their pytorch-grad-cam maps are stored references
(tests/references/make_references.py writes them, with a fingerprint of the model and images they
came from), while on the tiny nets every method is compared with pytorch-grad-cam live.
"""

from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import pytorch_grad_cam
import torch
import torchvision
from pytorch_grad_cam.ablation_layer import AblationLayer
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget as TheirTarget

from explainrt import compat
from explainrt.errors import InvalidInputError

TOL = 1e-3

# name -> (standard Grad-CAM target layers, input size, batch). vgg16's AdaptiveAvgPool2d((7, 7))
# exports only when the features are already 7x7, i.e. at 224.
MODELS = {
    "resnet50": (lambda m: [m.layer4[-1]], 64, 2),
    "vgg16": (lambda m: [m.features[-1]], 224, 1),
    "mobilenet_v3_large": (lambda m: [m.features[-1]], 64, 2),
    "convnext_tiny": (lambda m: [m.features[-1]], 64, 2),
    "densenet121": (lambda m: [m.features[-1]], 64, 2),  # last: the aug_smooth test reuses it
}

METHODS = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
    "eigengradcam": "EigenGradCAM",
    "scorecam": "ScoreCAM",
    "ablationcam": "AblationCAM",
}
OPT_IN = {("vgg16", method) for method in METHODS}
"""Run only with ``-m zoo``: VGG-16 exports only at 224 (its AdaptiveAvgPool2d(7)), a 550 MB export that
cost about a minute of this file's CI time, and Score-CAM alone is 512 VGG-16 passes (3 CPU-minutes).
The default run keeps what these cases cover: test_zoo_gradients.py checks the gradients and
activations of the same layer (``features``, whose last module this is) and one before the final
MaxPool against torch.autograd, and compat's code path does not depend on the model (the four other
models and the tiny nets run every method against pytorch-grad-cam live or from stored maps)."""
STORED = [(name, method) for name in ("resnet50", "vgg16", "mobilenet_v3_large", "convnext_tiny", "densenet121")
          for method in ("scorecam", "ablationcam")]
"""Cases whose pytorch-grad-cam maps are read from tests/references (one model pass per channel: up to
50 CPU-minutes each); the other parity cases run pytorch-grad-cam live."""
REFERENCES = Path(__file__).resolve().parent / "references" / "pytorch_grad_cam"


@dataclass(frozen=True)
class Zoo:
    name: str
    model: torch.nn.Module
    layers: list[torch.nn.Module]
    images: torch.Tensor
    classes: list[int]  # each image's most likely class: with random weights other classes often give flat maps
    cam: compat.BaseCAM  # exports once; the other methods share it through from_cam

    def ours(self) -> list[compat.ClassifierOutputTarget]:
        return [compat.ClassifierOutputTarget(c) for c in self.classes]

    def theirs(self) -> list[TheirTarget]:
        return [TheirTarget(c) for c in self.classes]


def _zoo(name: str, model: torch.nn.Module, layers: list[torch.nn.Module], images: torch.Tensor) -> Zoo:
    with torch.no_grad():
        classes = model(images).argmax(dim=1).tolist()
    return Zoo(name, model, layers, images, classes, compat.GradCAM(model=model, target_layers=layers))


@functools.lru_cache(maxsize=1)  # one model (and its export) alive at a time
def _build(name: str) -> Zoo:
    layers_of, size, batch = MODELS[name]
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    return _zoo(name, model, layers_of(model), torch.randn(batch, 3, size, size))


@pytest.fixture(scope="module")
def resnet50() -> Zoo:
    return _build("resnet50")  # the parity tests at the end start with resnet50 and reuse this export


def _tiny() -> torch.nn.Module:
    """Conv (negative outputs, 6 channels) -> conv -> ReLU (5 channels) -> pooled linear head."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.Conv2d(6, 5, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(5, 10),
    ).eval()


@pytest.fixture(scope="module")
def tiny() -> Zoo:
    """Two target layers of 6 (negative) and 5 (ReLU) channels, 3 images."""
    model = _tiny()
    return _zoo("tiny", model, [model[0], model[2]], torch.randn(3, 3, 16, 16))


class _DenseNetLike(torch.nn.Module):
    """Like torchvision's DenseNet: ``F.relu(features, inplace=True)`` modifies features[-1]'s output in place."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6))
        self.classifier = torch.nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.relu(self.features(x), inplace=True)
        return self.classifier(torch.nn.functional.adaptive_avg_pool2d(out, 1).flatten(1))


@pytest.fixture(scope="module")
def tiny_inplace() -> Zoo:
    torch.manual_seed(0)
    model = _DenseNetLike().eval()
    return _zoo("tiny_inplace", model, [model.features[-1]], torch.randn(2, 3, 8, 8))


@pytest.fixture(autouse=True)
def _quiet_progress_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("score_cam", "ablation_cam"):
        monkeypatch.setattr(f"pytorch_grad_cam.{module}.tqdm", SimpleNamespace(tqdm=lambda items, **_: items))


def _theirs(cls_name: str, zoo: Zoo, targets: list[Any] | None, layers: list[Any] | None = None,
            aug_smooth: bool = False, **options: Any) -> np.ndarray:
    cam = getattr(pytorch_grad_cam, cls_name)(model=zoo.model, target_layers=layers or zoo.layers, **options)
    return cam(input_tensor=zoo.images, targets=targets, aug_smooth=aug_smooth)


def fingerprint(zoo: Zoo) -> str:
    """SHA-256 of the model's parameters and buffers and of the images: what a stored reference was made from."""
    digest = hashlib.sha256()
    for key, value in zoo.model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().contiguous().numpy().tobytes())
    digest.update(zoo.images.numpy().tobytes())
    return digest.hexdigest()


def _stored(zoo: Zoo, method: str) -> np.ndarray:
    """pytorch-grad-cam's maps for ``zoo`` and ``method`` as make_references.py stored them."""
    path = REFERENCES / f"{zoo.name}-{method}.npz"
    regenerate = f"run python tests/references/make_references.py {zoo.name}"
    assert path.is_file(), f"no stored reference {path}: {regenerate}"
    with np.load(path) as stored:
        assert str(stored["fingerprint"]) == fingerprint(zoo), (
            f"{path} was made from other weights or images than this test builds: {regenerate}")
        return stored["maps"]


def _check(ours: np.ndarray, theirs: np.ndarray, what: str) -> str:
    """Max |difference| <= TOL; returns it with each reference map's spread (a flat pair proves little)."""
    assert ours.dtype == np.float32 and ours.shape == theirs.shape, (ours.dtype, ours.shape, theirs.shape)
    diff = np.abs(ours - theirs)
    ranges = [(round(float(m.min()), 4), round(float(m.max()), 4)) for m in theirs]
    assert diff.max() <= TOL, (f"{what}: max |diff| {diff.max():.3g} at {np.unravel_index(diff.argmax(), diff.shape)}; "
                               f"reference map ranges {ranges}, ours {[(float(m.min()), float(m.max())) for m in ours]}")
    spreads = " ".join(f"{float(m.max() - m.min()):.2f}" for m in theirs)
    return f"max|diff| {diff.max():.1e}  reference max-min per map {spreads:9s}"


def test_two_target_layers_are_averaged_like_pytorch_grad_cam(resnet50: Zoo) -> None:
    layers = [resnet50.model.layer3[-1], resnet50.model.layer4[-1]]
    with compat.GradCAM(model=resnet50.model, target_layers=layers) as cam:
        ours = cam(input_tensor=resnet50.images, targets=resnet50.ours())
    print("\nresnet50 gradcam [layer3[-1], layer4[-1]]", _check(ours, _theirs("GradCAM", resnet50, resnet50.theirs(), layers),
                                                              "resnet50 gradcam two layers"))


def test_no_targets_explains_the_top_class(resnet50: Zoo) -> None:
    ours = resnet50.cam(input_tensor=resnet50.images, targets=None)
    print("\nresnet50 gradcam targets=None", _check(ours, _theirs("GradCAM", resnet50, None), "targets=None"))


def test_negative_category_counts_from_the_end_like_torch_indexing(resnet50: Zoo) -> None:
    last = resnet50.cam(input_tensor=resnet50.images, targets=[compat.ClassifierOutputTarget(-1)] * 2)
    explicit = resnet50.cam(input_tensor=resnet50.images, targets=[compat.ClassifierOutputTarget(999)] * 2)
    np.testing.assert_array_equal(last, explicit)


def test_unsupported_targets_and_options_are_clear_errors(resnet50: Zoo) -> None:
    cam, images = resnet50.cam, resnet50.images
    class ScoreTimesTwo(ClassifierOutputSoftmaxTarget):  # a subclass means something else: refused
        pass

    with pytest.raises(InvalidInputError, match="ScoreTimesTwo; explainrt.compat supports ClassifierOutputTarget"):
        cam(input_tensor=images, targets=[ScoreTimesTwo(3)] * 2)
    with pytest.raises(InvalidInputError, match="builtins.int"):
        cam(input_tensor=images, targets=[3, 7])
    with pytest.raises(InvalidInputError, match="give one target per image, or one for all"):
        cam(input_tensor=images[:1].repeat(3, 1, 1, 1), targets=[compat.ClassifierOutputTarget(3)] * 2)
    with pytest.raises(InvalidInputError, match="out of range"):
        cam(input_tensor=images, targets=[compat.ClassifierOutputTarget(1000)] * 2)
    with pytest.raises(InvalidInputError, match="eigen_smooth"):
        cam(input_tensor=images, targets=None, eigen_smooth=True)
    with pytest.raises(InvalidInputError, match="4-D"):
        cam(input_tensor=images[0], targets=None)
    with pytest.raises(InvalidInputError, match="reshape_transform must be a function, 'tokens' or 'nhwc'"):
        compat.GradCAM(model=resnet50.model, target_layers=resnet50.layers, reshape_transform="hwc")
    swapped = compat.GradCAM(model=resnet50.model, target_layers=resnet50.layers,
                             reshape_transform=lambda t: t.transpose(2, 3))  # not a layout: refused when first run
    with pytest.raises(InvalidInputError, match="reshape_transform turns target layer 0's output"):
        swapped(input_tensor=images, targets=None)
    with pytest.raises(InvalidInputError, match="target_layers"):
        compat.ScoreCAM(model=resnet50.model, target_layers=[])


def test_export_happens_once_per_input_size(monkeypatch: pytest.MonkeyPatch) -> None:
    built = []
    real = compat.Explainer

    def counting(*args: Any, **kwargs: Any) -> Any:
        built.append(kwargs["input_size"])
        return real(*args, **kwargs)

    monkeypatch.setattr(compat, "Explainer", counting)
    model = _tiny()
    images = torch.randn(2, 3, 16, 16)
    cam = compat.LayerCAM(model=model, target_layers=[model[2]])
    first = cam(input_tensor=images, targets=None)
    np.testing.assert_array_equal(cam(input_tensor=images, targets=None), first)
    compat.ScoreCAM.from_cam(cam)(input_tensor=images, targets=None)
    cam(input_tensor=images[:, :, :8], targets=None)
    assert built == [(16, 16), (8, 16)]


@pytest.mark.parametrize("method", list(METHODS))
def test_tiny_net_parity_with_two_layers_and_more_images_than_batch_size(tiny: Zoo, method: str) -> None:
    """batch_size 2 < 3 images: chunks of images and of channels; two layers with different channel counts."""
    ours = getattr(compat, METHODS[method]).from_cam(tiny.cam, batch_size=2)(input_tensor=tiny.images,
                                                                            targets=tiny.ours())
    options = {"batch_size": 2} if method == "ablationcam" else {}  # their ScoreCAM has no such argument
    _check(ours, _theirs(METHODS[method], tiny, tiny.theirs(), **options), f"tiny {method}")


@pytest.mark.parametrize("method", list(METHODS))
def test_layer_output_modified_in_place_is_read_as_pytorch_grad_cam_reads_it(tiny_inplace: Zoo, method: str) -> None:
    """pytorch-grad-cam weights the values after the in-place ReLU, with the gradients of the layer's own output."""
    ours = getattr(compat, METHODS[method]).from_cam(tiny_inplace.cam)(input_tensor=tiny_inplace.images,
                                                                      targets=tiny_inplace.ours())
    _check(ours, _theirs(METHODS[method], tiny_inplace, tiny_inplace.theirs()), f"in-place {method}")


@pytest.mark.parametrize(("channels", "batch_size", "lowest"), [(10, 4, -3.7), (10, 32, 0.25), (7, 3, 0.0)])
def test_ablation_values_are_what_pytorch_grad_cam_writes(channels: int, batch_size: int, lowest: float) -> None:
    """Their AblationLayer re-reads torch.min after every write: the value falls with the copy's position."""
    rng = np.random.default_rng(0)
    activations = (lowest + rng.random((1, channels, 3, 3)) * 5).astype(np.float32)
    activations[0, 0, 0, 0] = lowest
    layer = AblationLayer()
    layer.activations_to_be_ablated(activations[0])
    theirs = []
    for start in range(0, channels, batch_size):
        count = min(batch_size, channels - start)
        layer.set_next_batch(0, torch.from_numpy(activations), count)
        ablated = layer(None)
        theirs += [ablated[i, layer.indices[i], 0, 0].item() for i in range(count)]
        layer.indices = layer.indices[count:]
    ours = compat.pytorch_grad_cam_ablation_values(activations, batch_size)
    np.testing.assert_array_equal(ours[0], np.float32(theirs))
    if lowest != 0:
        assert len(set(ours[0].tolist())) == min(batch_size, channels)


def test_batch_size_defaults_follow_pytorch_grad_cam() -> None:
    model = _tiny()
    assert compat.ScoreCAM(model, [model[2]]).batch_size == 16
    assert compat.AblationCAM(model, [model[2]]).batch_size == 32
    assert compat.AblationCAM(model, [model[2]], batch_size=8).batch_size == 8


PARITY_CASES = [
    pytest.param(name, method, id=f"{name}-{method}",
                 marks=[pytest.mark.zoo] if (name, method) in OPT_IN else [])
    for name in MODELS
    for method in METHODS
]


@pytest.mark.parametrize(("name", "method"), PARITY_CASES)
def test_parity_with_pytorch_grad_cam(name: str, method: str) -> None:
    zoo = _build(name)
    cls_name = METHODS[method]
    tick = time.perf_counter()
    ours = getattr(compat, cls_name).from_cam(zoo.cam)(input_tensor=zoo.images, targets=zoo.ours())
    mid = time.perf_counter()
    theirs = _stored(zoo, method) if (name, method) in STORED else _theirs(cls_name, zoo, zoo.theirs())
    done = time.perf_counter()
    print(f"\n{name:18s} {method:12s} {_check(ours, theirs, f'{name} {method}')}  "
          f"explainrt {mid - tick:5.1f}s  pytorch-grad-cam {done - mid:5.1f}s"
          f"{' (stored)' if (name, method) in STORED else ''}", end="")
    if method == "ablationcam":
        # Where a layer's minimum is not 0, pytorch-grad-cam's ablation value falls with the copy's position
        # in its batch. The engine's default (one value, min - 1e7) gives other maps where the head passes
        # that value on (mobilenet_v3_large's Linear-Hardswish-Linear); a ReLU or a LayerNorm hides it.
        explainer = zoo.cam.explainer(*zoo.images.shape[2:])
        images = zoo.images.numpy()
        lowest = explainer.session.run(images, np.array(zoo.classes)[:, None]).activations[0].min(axis=(1, 2, 3))
        constant = np.abs(explainer.explain(images, method="ablationcam", targets=zoo.classes).maps - theirs).max()
        print(f"; layer minimum {lowest}; with one constant ablation value max|diff| {constant:.1e}", end="")
        if name == "mobilenet_v3_large":
            assert (lowest < 0).all() and constant > TOL


def test_aug_smooth_and_their_targets_match_pytorch_grad_cam() -> None:
    zoo = _build("densenet121")  # its averaged maps vary most; features[-1] is also modified in place
    ours = zoo.cam(input_tensor=zoo.images, targets=zoo.theirs(), aug_smooth=True)
    print("\ndensenet121 gradcam aug_smooth", _check(ours, _theirs("GradCAM", zoo, zoo.theirs(), aug_smooth=True),
                                                    "aug_smooth"))


def test_one_target_explains_that_class_in_every_image(resnet50: Zoo) -> None:
    one = resnet50.cam(input_tensor=resnet50.images, targets=[compat.ClassifierOutputTarget(281)])
    each = resnet50.cam(input_tensor=resnet50.images, targets=[compat.ClassifierOutputTarget(281)] * 2)
    assert one.shape[0] == 2 and one[1].max() > 0  # pytorch-grad-cam's zip would leave image 1 all zero
    np.testing.assert_array_equal(one, each)
