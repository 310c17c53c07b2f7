"""Vision transformers and channels-last layers: token and NHWC targets against pytorch-grad-cam.

Small random models of each family the README names (torchvision ViT and Swin, timm DeiT with one
and two prefix tokens, Hugging Face ViT, torchvision ConvNeXt): Grad-CAM maps must equal
pytorch-grad-cam's with the matching ``reshape_transform``, on ONNX Runtime (the reshape built
into the graph) and on the torch backend, with the layer named and chosen automatically.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from pytorch_grad_cam import GradCAM as ReferenceGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget as ReferenceTarget

from explainrt import Explainer, make_explainable
from explainrt.compat import ClassifierOutputTarget, GradCAM
from explainrt.errors import InvalidInputError, InvalidModelError, NoSpatialLayerError, UnknownLayerError
from explainrt.export.spec import ExplainableSpec


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter drawn from N(0, 0.2) with a fixed seed (torchvision's ViT starts its head at zero)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


def tokens_to_maps(height: int, width: int, prefix: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """pytorch-grad-cam's ViT recipe: drop the prefix tokens, tokens -> [N, D, h, w]."""
    def transform(tensor: torch.Tensor) -> torch.Tensor:
        grid = tensor[:, prefix:, :].reshape(tensor.size(0), height, width, tensor.size(2))
        return grid.transpose(2, 3).transpose(1, 2)
    return transform


def channels_last_to_maps(tensor: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's Swin recipe for [N, h, w, C] layers."""
    return tensor.permute(0, 3, 1, 2)


def torchvision_vit() -> torch.nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=10)


def timm_deit(distilled: bool) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import timm

        name = "deit_tiny_distilled_patch16_224" if distilled else "deit_tiny_patch16_224"
        return timm.create_model(name, pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=32,
                                 num_heads=2, num_classes=10)
    return build


def huggingface_vit() -> torch.nn.Module:
    import transformers

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=10)
    return transformers.ViTForImageClassification(config)


def torchvision_swin() -> torch.nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                           num_classes=10)


def torchvision_convnext() -> torch.nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10)


# name: (builder, the documented layer, its reshape_transform, input size, expected layout)
FAMILIES: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[Any], Any], Any, int, dict[str, Any]]] = {
    "torchvision-vit": (torchvision_vit, lambda m: m.encoder.layers[-1].ln_1, tokens_to_maps(4, 4, 1), 32,
                        {"kind": "tokens", "grid": [4, 4], "channels": 32, "prefix_tokens": 1}),
    "timm-deit": (timm_deit(False), lambda m: m.blocks[-1].norm1, tokens_to_maps(4, 4, 1), 32,
                  {"kind": "tokens", "grid": [4, 4], "channels": 32, "prefix_tokens": 1}),
    "timm-deit-distilled": (timm_deit(True), lambda m: m.blocks[-1].norm1, tokens_to_maps(4, 4, 2), 32,
                            {"kind": "tokens", "grid": [4, 4], "channels": 32, "prefix_tokens": 2}),
    "huggingface-vit": (huggingface_vit, lambda m: m.vit.layers[-1].layernorm_before, tokens_to_maps(4, 4, 1), 32,
                        {"kind": "tokens", "grid": [4, 4], "channels": 32, "prefix_tokens": 1}),
    "torchvision-swin": (torchvision_swin, lambda m: m.features[-1][-1].norm1, channels_last_to_maps, 64,
                         {"kind": "nhwc", "grid": [8, 8], "channels": 32, "prefix_tokens": 0}),
    "torchvision-convnext": (torchvision_convnext, lambda m: m.features[-1], None, 64,
                             {"kind": "nchw", "grid": [8, 8], "channels": 32, "prefix_tokens": 0}),
}


class _Logits(torch.nn.Module):
    """The logits of a model that returns a Hugging Face ModelOutput (pytorch-grad-cam needs a tensor)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        output = self.model(images)
        return output.logits if hasattr(output, "logits") else output


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> dict[str, Any]:
    build, layer, transform, size, layout = FAMILIES[request.param]
    torch.manual_seed(0)
    model = randomized(build())
    images = np.random.default_rng(1).standard_normal((2, 3, size, size)).astype(np.float32)
    with ReferenceGradCAM(model=_Logits(model), target_layers=[layer(model)], reshape_transform=transform) as cam:
        reference = cam(input_tensor=torch.from_numpy(images), targets=[ReferenceTarget(1), ReferenceTarget(7)])
    return {"name": request.param, "model": model, "layer": layer(model), "transform": transform, "size": size,
            "layout": layout, "images": images, "reference": reference}


def test_grad_cam_equals_pytorch_grad_cam_with_its_reshape_transform(family: dict[str, Any]) -> None:
    size = (family["size"], family["size"])
    assert family["reference"].std() > 0.05  # maps that vary: an all-zero pair would match trivially
    for backend in ("onnxruntime", "torch"):
        explainer = Explainer(family["model"], [family["layer"]], backend=backend, input_size=size)
        assert explainer.spec.layouts == (family["layout"],)
        maps = explainer.explain(family["images"], targets=[1, 7]).maps
        np.testing.assert_allclose(maps, family["reference"], atol=1e-4, err_msg=f"{family['name']} on {backend}")


def test_saliency_equals_torch_autograd(family: dict[str, Any]) -> None:
    """The input gradient through every family's whole graph (Swin's patch merging: Slice with step 2, its
    shifted windows, ViT attention) equals torch.autograd's for one target per image."""
    explainer = Explainer(family["model"], [family["layer"]], input_size=(family["size"], family["size"]))
    ours = explainer.explain(family["images"], method="saliency", targets=[1, 7], normalize=False, abs=False).maps
    x = torch.from_numpy(family["images"]).requires_grad_(True)
    _Logits(family["model"])(x)[[0, 1], [1, 7]].sum().backward()
    expected = x.grad.numpy().sum(axis=1)
    assert np.abs(expected).max() > 0
    assert np.abs(ours - expected).max() <= 1e-4 * np.abs(expected).max(), family["name"]


def test_the_automatic_layer_is_the_documented_one(family: dict[str, Any]) -> None:
    explainer = Explainer(family["model"], input_size=(family["size"], family["size"]))
    assert explainer.spec.layouts[0]["kind"] == family["layout"]["kind"]
    maps = explainer.explain(family["images"], targets=[1, 7]).maps
    np.testing.assert_allclose(maps, family["reference"], atol=1e-4)


def test_compat_recognises_the_reshape_transform(family: dict[str, Any]) -> None:
    with GradCAM(model=family["model"], target_layers=[family["layer"]],
                 reshape_transform=family["transform"]) as cam:
        maps = cam(input_tensor=torch.from_numpy(family["images"]),
                   targets=[ClassifierOutputTarget(1), ClassifierOutputTarget(7)])
    np.testing.assert_allclose(maps, family["reference"], atol=1e-4)


def test_every_cam_method_agrees_between_the_graph_and_torch_on_token_layers() -> None:
    """Ablation-CAM's head takes [N, C, h, w] back to tokens (keeping the model's own CLS token)."""
    model = randomized(torchvision_vit())
    images = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    layer = [model.encoder.layers[-1].ln_1]
    onnx_explainer = Explainer(model, layer, input_size=(32, 32))
    torch_explainer = Explainer(model, layer, backend="torch", input_size=(32, 32))
    run = onnx_explainer.session.run(images, np.array([[1], [7]]))
    np.testing.assert_allclose(onnx_explainer.session.head(0, run.activations[0], images), run.logits, atol=1e-5)
    for method in ("ablationcam", "scorecam", "gradcam++", "xgradcam", "layercam", "eigencam"):
        ours = onnx_explainer.explain(images, method=method, targets=[1, 7]).maps
        reference = torch_explainer.explain(images, method=method, targets=[1, 7]).maps
        assert ours.std() > 0.01, method
        np.testing.assert_allclose(ours, reference, atol=1e-4, err_msg=method)


def test_compat_takes_a_declared_layout_and_refuses_what_it_cannot_build() -> None:
    model = randomized(torchvision_vit())
    images = torch.from_numpy(np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32))
    layer = [model.encoder.layers[-1].ln_1]
    targets = [ClassifierOutputTarget(1), ClassifierOutputTarget(7)]
    with GradCAM(model=model, target_layers=layer, reshape_transform=tokens_to_maps(4, 4, 1)) as cam:
        expected = cam(input_tensor=images, targets=targets)
    with GradCAM(model=model, target_layers=layer, reshape_transform="tokens") as cam:
        np.testing.assert_allclose(cam(input_tensor=images, targets=targets), expected, atol=1e-6)

    def mirrored(tensor: torch.Tensor) -> torch.Tensor:  # a reshape the graph cannot express as a layout
        return tokens_to_maps(4, 4, 1)(tensor).flip(-1)

    with pytest.raises(InvalidInputError, match="reshape_transform turns target layer 0's output"):
        GradCAM(model=model, target_layers=layer, reshape_transform=mirrored)(input_tensor=images, targets=targets)


class _DictOutput(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 5)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = torch.relu(self.features(images))
        logits = self.head(features.mean(dim=(2, 3)))
        return {"aux": -logits, "logits": logits}


def test_model_outputs_beyond_one_tensor() -> None:
    model = randomized(_DictOutput())
    images = np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32)
    by_default = Explainer(model, input_size=(8, 8))
    chosen = Explainer(model, input_size=(8, 8), output="aux")
    with torch.no_grad():
        outputs = model(torch.from_numpy(images))
    np.testing.assert_allclose(by_default.predict(images), outputs["logits"].numpy(), atol=1e-5)
    np.testing.assert_allclose(chosen.predict(images), outputs["aux"].numpy(), atol=1e-5)
    torch_backend = Explainer(model, [model.features], backend="torch", input_size=(8, 8), output="aux")
    np.testing.assert_allclose(torch_backend.predict(images), outputs["aux"].numpy(), atol=1e-5)
    with pytest.raises(InvalidModelError, match="has no 'missing'"):
        Explainer(model, input_size=(8, 8), output="missing")


def _graph_with(shape: list[Any], consumer: str, conv: bool = True) -> onnx.ModelProto:
    """image [N, 3, 4, 4] -> (Conv to 4 channels) -> Reshape to ``shape`` -> ``consumer`` -> Flatten -> MatMul -> [N, 4]."""
    size = int(np.prod(shape[1:]))
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 4, 4])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])
    initializers = [helper.make_tensor("weight", TensorProto.FLOAT, [4, 3, 1, 1], np.ones(12, np.float32)),
                    helper.make_tensor("target_shape", TensorProto.INT64, [len(shape)],
                                       [0 if shape[0] == "N" else shape[0], *shape[1:]]),
                    helper.make_tensor("head", TensorProto.FLOAT, [size, 4], np.ones(size * 4, np.float32))]
    nodes = [helper.make_node("Conv", ["image", "weight"], ["conv"])] if conv else []
    nodes += [helper.make_node("Reshape", ["conv" if conv else "image", "target_shape"], ["layer"]),
              helper.make_node(consumer, ["layer"], ["after"]),
              helper.make_node("Flatten", ["after"], ["flat"]),
              helper.make_node("MatMul", ["flat", "head"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [image], [logits], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_a_layout_that_cannot_be_told_asks_for_layer_layout() -> None:
    ambiguous = _graph_with(["N", 4, 4, 4], "Relu")  # a 4x4 grid of 4 channels either way; Relu says nothing
    with pytest.raises(UnknownLayerError, match="give layer_layout='nchw' or 'nhwc'"):
        make_explainable(ambiguous, ["layer"])
    told = make_explainable(ambiguous, ["layer"], layer_layout="nhwc")
    assert ExplainableSpec.from_model(told).layouts[0]["kind"] == "nhwc"
    tokens = _graph_with(["N", 8, 8], "Relu")  # 8 tokens: 4 prefix + 2x2, or 7 prefix + 1x1, for a 4x4 image
    with pytest.raises(UnknownLayerError, match="candidates: 4 prefix \\+ 2x2, 7 prefix \\+ 1x1.*give token_grid"):
        make_explainable(tokens, ["layer"])
    with pytest.raises(UnknownLayerError, match="token_grid \\(4, 4\\) .* does not add up"):
        make_explainable(tokens, ["layer"], token_grid=(4, 4))
    spec = ExplainableSpec.from_model(make_explainable(tokens, ["layer"], token_grid=(2, 2)))
    assert spec.layouts[0] == {"kind": "tokens", "grid": [2, 2], "channels": 8, "prefix_tokens": 4}
    with pytest.raises(UnknownLayerError, match="layer_layout must be one of"):
        make_explainable(ambiguous, ["layer"], layer_layout="hwc")
    with pytest.raises(UnknownLayerError, match="has rank 4: tokens are"):
        make_explainable(ambiguous, ["layer"], layer_layout="tokens")


def test_token_and_channels_last_outputs_are_the_layer_reshaped() -> None:
    """The graph's reshape equals the reference transforms on the same tensor (values, not shapes)."""
    import onnxruntime as ort

    images = np.random.default_rng(5).standard_normal((2, 3, 4, 4)).astype(np.float32)
    for shape, layout, transform in ((["N", 8, 8], {"token_grid": (2, 2)}, tokens_to_maps(2, 2, 4)),
                                     (["N", 4, 4, 4], {"layer_layout": "nhwc"}, channels_last_to_maps)):
        plain = _graph_with(shape, "Relu")
        plain.graph.output.append(helper.make_tensor_value_info("layer", TensorProto.FLOAT, None))
        layer = ort.InferenceSession(plain.SerializeToString()).run(["layer"], {"image": images})[0]
        explainable = make_explainable(_graph_with(shape, "Relu"), ["layer"], **layout)
        session = ort.InferenceSession(explainable.SerializeToString())
        activations = session.run(["explainrt.activations.0"], {"image": images,
                                                                "explainrt.targets": np.array([[0], [1]])})[0]
        np.testing.assert_array_equal(activations, transform(torch.from_numpy(layer)).numpy())


def test_automatic_layer_refuses_unsound_tensors_with_the_candidates_named() -> None:
    pooled = _graph_with(["N", 1, 1, 48], "Relu", conv=False)  # 1 x 1 as NHWC, a 1 x 48 strip as NCHW
    with pytest.raises(NoSpatialLayerError, match="the last tensors looked at: 'layer' \\[.*'after'"):
        make_explainable(pooled, input_layout="nchw")  # no Conv reads the [N, 3, 4, 4] image: its layout is given
    with pytest.raises(UnknownLayerError, match="does not have the image batch on axis 0"):
        make_explainable(_graph_with([2, 4, 6], "Relu", conv=False), ["layer"], input_layout="nchw")


def test_a_token_model_given_no_input_size_is_exported_once_at_its_preprocessing_size(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Without input_size a module is exported with dynamic height and width where it takes other sizes; a
    ViT's token grid (and position embeddings) hold one size, and a Swin's target shape is unknown to shape
    inference at a dynamic size: both are told before exporting and exported once, at the preprocessing's
    size, to the maps of an export at that size given."""
    from explainrt.preprocessing import Preprocessing

    exports: list[Any] = []
    export = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: exports.append(kwargs["dynamic_shapes"][0])
                        or export(*args, **kwargs))
    torch.manual_seed(0)
    model = randomized(torchvision_vit())
    images = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    layer = model.encoder.layers[-1].ln_1
    with ReferenceGradCAM(model=model, target_layers=[layer], reshape_transform=tokens_to_maps(4, 4, 1)) as cam:
        reference = cam(input_tensor=torch.from_numpy(images), targets=[ReferenceTarget(1), ReferenceTarget(7)])
    with caplog.at_level(logging.INFO, logger="explainrt"):
        explainer = Explainer(model, [layer], preprocessing=Preprocessing((32, 32), None, (0.5,) * 3, (0.5,) * 3))
    assert [sorted(axes) for axes in exports] == [[0]]  # one export, only the batch dynamic
    assert "exporting at 32x32 only: the model refuses a 64x64 image (Wrong image height!" in caplog.text
    assert explainer.spec.layouts[0]["grid"] == [4, 4]
    maps = explainer.explain(images, targets=[1, 7]).maps
    np.testing.assert_allclose(maps, reference, atol=1e-4)
    sized = Explainer(model, [layer], input_size=(32, 32))
    np.testing.assert_array_equal(maps, sized.explain(images, targets=[1, 7]).maps)
    exports.clear()
    swin = randomized(torchvision_swin())
    images = np.random.default_rng(2).standard_normal((2, 3, 64, 64)).astype(np.float32)
    layer = swin.features[-1][-1].norm1
    with ReferenceGradCAM(model=swin, target_layers=[layer], reshape_transform=channels_last_to_maps) as cam:
        reference = cam(input_tensor=torch.from_numpy(images), targets=[ReferenceTarget(1), ReferenceTarget(7)])
    with caplog.at_level(logging.INFO, logger="explainrt"):
        explainer = Explainer(swin, [layer], preprocessing=Preprocessing((64, 64), None, (0.5,) * 3, (0.5,) * 3))
    assert [sorted(axes) for axes in exports] == [[0]]
    assert "exporting at 64x64 only: torchvision's Swin" in caplog.text
    np.testing.assert_allclose(explainer.explain(images, targets=[1, 7]).maps, reference, atol=1e-4)


class _Tokens(torch.nn.Module):
    """Patch tokens [N, T, D] of an image of any size: a LayerNorm on them, mean-pooled to logits."""

    def __init__(self) -> None:
        super().__init__()
        self.patches = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.patches(images).flatten(2).transpose(1, 2)).mean(1))


class _Flattening(torch.nn.Module):
    """A Linear on the flattened feature map: only the 8 x 8 image fits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)
        self.head = torch.nn.Linear(2 * 8 * 8, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(images)).flatten(1))


def test_a_fixed_size_is_told_from_one_forward_pass_at_another_size() -> None:
    """Refused at 40 x 40: fixed; token outputs: fixed unless a token grid is given; a CNN: not known (a dynamic
    export is tried). The probe leaves each module's training mode as it found it."""
    from explainrt.export.torch_export import fixed_size_reason

    example = torch.zeros(1, 3, 8, 8)
    tokens, flattening, cnn = _Tokens().train(), _Flattening(), torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3),
                                                                                      torch.nn.BatchNorm2d(2))
    assert fixed_size_reason(tokens, example, [tokens.norm]) == ("target layer 0 outputs tokens, whose grid a "
                                                                "dynamic image size leaves unknown")
    assert all(module.training for module in tokens.modules())
    assert fixed_size_reason(tokens, example, [tokens.patches]) is None
    assert fixed_size_reason(tokens, example, [tokens.norm], token_grid_given=True) is None
    assert fixed_size_reason(flattening, example, [flattening.conv]).startswith(
        "the model refuses a 40x40 image (mat1 and mat2 shapes cannot be multiplied")
    running = cnn[1].running_mean.clone()
    assert fixed_size_reason(cnn.train(), example, [cnn[0]]) is None
    torch.testing.assert_close(cnn[1].running_mean, running, rtol=0, atol=0)  # evaluated, not trained
    assert cnn.training


def test_a_model_that_refuses_the_export_size_says_why_in_one_plain_line() -> None:
    """A ViT built for 32 x 32 given input_size=(40, 40): the model's own size check, not torch.export's report
    with its terminal colour codes."""
    model = torchvision_vit()
    with pytest.raises(InvalidModelError) as caught:
        Explainer(model, [model.encoder.layers[-1].ln_1], input_size=(40, 40))
    message = str(caught.value)
    assert message.startswith("torch.onnx.export of the model on a 40x40 image failed: AssertionError: Wrong image "
                              "height! Expected 32 but got 40!")
    assert "\x1b" not in message and "\n" not in message
