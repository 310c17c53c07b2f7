"""Explanation targets (explainrt.targets) on segmentation, detection, embedding and classifier outputs.

References: pytorch-grad-cam's SemanticSegmentationTarget (Region on DeepLabV3), torch.autograd of the
same objective (Box on an Ultralytics YOLOv8n exported to ONNX, Similarity on an embedding model,
Softmax / Difference / Weights on a classifier), and explainrt's own methods on a model whose output
is the objective itself (perturbation methods score every copy with the target's objective).
All models have random weights and fixed seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision

from explainrt import Explainer, Explanation
from explainrt.errors import InvalidInputError, InvalidTargetError
from explainrt.targets import Box, Class, Difference, Region, Similarity, Softmax, Sum, Weights, detector_layout

SEG_SIZE = 64
YOLO_SIZE = 160


class _Out(torch.nn.Module):
    """A segmentation model's "out" tensor (what pytorch-grad-cam's SemanticSegmentationTarget reads)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


@pytest.fixture(scope="module")
def deeplab() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=6, aux_loss=False).eval()


@pytest.fixture(scope="module")
def deeplab_explainer(deeplab: torch.nn.Module) -> Explainer:
    """The dict-output model exported to ONNX: "out" is explained without output= being given."""
    return Explainer(deeplab, target_layers=[deeplab.backbone["16"]], input_size=(SEG_SIZE, SEG_SIZE))


def _image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def assert_equal_to_one_target_calls(items: list[dict], explainer: Explainer, pictures: list[np.ndarray],
                                     objects: list[list[object]], each: Callable[[dict, Explanation, int], None] | None = None,
                                     ) -> None:
    """A server's V1 explanations of K targets per image (``objects[i][k]``): each target's index, score and map
    equal to the one-target call of column k; ``each(part, one, image)`` checks more per part."""
    for k in range(len(objects[0])):
        one = explainer.explain(pictures, targets=[row[k] for row in objects])
        for index, item in enumerate(items):
            part = item["targets"][k]
            assert part["target"]["index"] == int(one.targets[index])
            np.testing.assert_allclose(part["target"]["score"], one.logits[index, 0], rtol=1e-5)
            np.testing.assert_allclose(np.asarray(part["map"]), one.maps[index], atol=1e-4)
            if each is not None:
                each(part, one, index)


def test_region_gradcam_matches_pytorch_grad_cam(deeplab: torch.nn.Module, deeplab_explainer: Explainer) -> None:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    image = _image((1, 3, SEG_SIZE, SEG_SIZE))
    mask = np.zeros((SEG_SIZE, SEG_SIZE), np.float32)
    mask[10:40, 20:50] = 1.0
    with GradCAM(model=_Out(deeplab), target_layers=[deeplab.backbone["16"]]) as cam:
        reference = cam(torch.from_numpy(image), targets=[SemanticSegmentationTarget(3, mask)])
    ours = deeplab_explainer.explain(image, method="gradcam", targets=Region(3, mask))
    assert deeplab_explainer.spec.output_shape == (6, SEG_SIZE, SEG_SIZE)
    assert ours.targets.tolist() == [3]
    with torch.no_grad():
        out = deeplab(torch.from_numpy(image))["out"][0, 3].numpy()
    np.testing.assert_allclose(ours.logits[:, 0], [(out * mask).sum()], rtol=1e-4)
    np.testing.assert_allclose(ours.maps, reference, atol=2e-4)
    from explainrt import compat

    with compat.GradCAM(model=deeplab, target_layers=[deeplab.backbone["16"]]) as cam:  # pytorch-grad-cam's target
        dropped_in = cam(input_tensor=torch.from_numpy(image), targets=[SemanticSegmentationTarget(3, mask)])
    np.testing.assert_allclose(dropped_in, reference, atol=2e-4)


def test_region_score_is_the_masked_sum_of_its_class() -> None:
    """``Region.score`` reads its class's map alone: equal to the linear objective sum(gradient * y) that every
    target's score is, for a weighted mask on several outputs; a mask of the wrong size is refused."""
    from explainrt.targets import Target

    rng = np.random.default_rng(3)
    outputs = rng.normal(size=(3, 5, 6, 7)).astype(np.float32)
    region = Region(2, rng.random((6, 7)))
    expected = Target.score(region, outputs)
    assert np.abs(expected).min() > 1e-3
    np.testing.assert_allclose(region.score(outputs), expected, rtol=1e-6)
    np.testing.assert_allclose(region.score(outputs), [(region.mask * y[2]).sum() for y in outputs], rtol=1e-5)
    with pytest.raises(InvalidTargetError, match="Region mask has shape"):
        region.score(outputs[:, :, :5])


def test_region_weighted_mask_input_gradients_match_autograd(deeplab: torch.nn.Module,
                                                              deeplab_explainer: Explainer) -> None:
    """A weighted mask; Saliency's signed sum over channels is the input gradient summed over channels."""
    image = _image((1, 3, SEG_SIZE, SEG_SIZE), seed=1)
    mask = np.random.default_rng(2).uniform(size=(SEG_SIZE, SEG_SIZE)).astype(np.float32)
    x = torch.from_numpy(image).requires_grad_(True)
    (deeplab(x)["out"][0, 2] * torch.from_numpy(mask)).sum().backward()
    ours = deeplab_explainer.explain(image, method="saliency", targets=Region(2, mask), normalize=False, abs=False)
    reference = x.grad.numpy().sum(axis=1)
    assert np.abs(ours.maps - reference).max() <= 1e-4 * np.abs(reference).max()


def test_int_targets_on_a_segmentation_output_sum_the_class(deeplab: torch.nn.Module,
                                                            deeplab_explainer: Explainer) -> None:
    """Class k on [N, K, H, W] (the class-index fast path) is Region(k, all ones); -1 the top summed class."""
    image = _image((1, 3, SEG_SIZE, SEG_SIZE), seed=3)
    ones = np.ones((SEG_SIZE, SEG_SIZE), np.float32)
    fast = deeplab_explainer.explain(image, method="gradcam", targets=4, normalize=False)
    general = deeplab_explainer.explain(image, method="gradcam", targets=Region(4, ones), normalize=False)
    np.testing.assert_allclose(fast.maps, general.maps, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        summed = deeplab(torch.from_numpy(image))["out"].sum(dim=(2, 3))[0].numpy()
    top = deeplab_explainer.explain(image, method="eigencam")
    assert top.targets.tolist() == [int(summed.argmax())]


def test_perturbation_methods_score_copies_with_the_target(deeplab: torch.nn.Module) -> None:
    """RISE and Occlusion with a Region target equal the same methods on a model whose one output is the
    region's score (class 0), on the torch backend."""

    class RegionScore(torch.nn.Module):
        def __init__(self, mask: np.ndarray) -> None:
            super().__init__()
            self.model, self.mask = deeplab, torch.from_numpy(mask)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.model(x)["out"][:, 1] * self.mask).sum(dim=(1, 2))[:, None]

    image = _image((1, 3, SEG_SIZE, SEG_SIZE), seed=4)
    mask = np.zeros((SEG_SIZE, SEG_SIZE), np.float32)
    mask[30:60, 5:25] = 1.0
    ours = Explainer(deeplab, [deeplab.backbone["16"]], backend="torch", input_size=(SEG_SIZE, SEG_SIZE))
    reference = Explainer(RegionScore(mask), [deeplab.backbone["16"]], backend="torch",
                          input_size=(SEG_SIZE, SEG_SIZE))
    for method, options in (("occlusion", {"window": (16, 16)}), ("rise", {"n_masks": 16, "grid": 4})):
        got = ours.explain(image, method=method, targets=Region(1, mask), normalize=False, **options)
        want = reference.explain(image, method=method, targets=0, normalize=False, **options)
        if method == "rise":  # RISE weights masks by probability; one logit's softmax is 1: compare with the score
            want = reference.explain(image, method=method, targets=Weights(np.ones(1, np.float32)), normalize=False,
                                     **options)
        np.testing.assert_allclose(got.maps, want.maps, rtol=1e-4, atol=1e-4 * np.abs(want.maps).max())


# -- detection ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def yolo() -> torch.nn.Module:
    from PIL import Image
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import patches

    # importing ultralytics replaces PIL.Image.open for the whole process (an unreadable file then makes it try
    # to install pi-heif): later tests in this process (test_explainer's unreadable image) need Pillow's own
    Image.open = patches._image_open

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", verbose=False).eval()
    for module in model.modules():  # PyTorch's default init fades the signal over 22 blocks: class scores all 0.5
        if isinstance(module, torch.nn.Conv2d) and module.weight.requires_grad:
            torch.nn.init.normal_(module.weight, std=(2.7 / module.weight[0].numel()) ** 0.5)
    for module in model.modules():
        if type(module).__name__ == "Detect":
            module.export, module.format = True, "onnx"  # the raw head [N, 84, anchors], as exported
            for branch in module.cv3:  # untrained class biases (-11) saturate the sigmoid: no gradient to compare
                torch.nn.init.zeros_(branch[-1].bias)
    return model


@pytest.fixture(scope="module", params=["dynamo", "torchscript"])
def yolo_onnx(request: pytest.FixtureRequest, yolo: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The raw head exported with a dynamic batch by both of torch's exporters (the TorchScript one, which
    Ultralytics' own export uses, computes split sizes and reshapes from Shape: folded to constants)."""
    import warnings

    path = tmp_path_factory.mktemp("yolo") / "yolov8n.onnx"
    example = torch.rand(2, 3, YOLO_SIZE, YOLO_SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if request.param == "dynamo":
            program = torch.onnx.export(yolo, (example,), dynamo=True, opset_version=18, input_names=["images"],
                                        output_names=["output0"], dynamic_shapes=({0: torch.export.Dim("N", min=1)},))
            program.save(str(path))
        else:
            torch.onnx.export(yolo, (example,), str(path), dynamo=False, opset_version=17, input_names=["images"],
                              output_names=["output0"], dynamic_axes={"images": {0: "N"}, "output0": {0: "N"}})
    return path


def _yolo_box(output: np.ndarray, class_index: int) -> list[float]:
    """The box (xyxy, clipped to the image) of the prediction most confident in ``class_index``."""
    cx, cy, w, h = output[:4, int(np.argmax(output[4 + class_index]))]
    return np.clip([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 0, YOLO_SIZE).tolist()


def test_box_target_matches_autograd_on_yolov8(yolo: torch.nn.Module, yolo_onnx: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    image = _image((1, 3, YOLO_SIZE, YOLO_SIZE), seed=5) * 0.2 + 0.5
    explainer = Explainer(str(yolo_onnx), output="output0")
    assert explainer.spec.output_shape[0] == 84
    x = torch.from_numpy(image).requires_grad_(True)
    out = yolo(x)
    values = out[0].detach().numpy()
    box = _yolo_box(values, 7)
    boxes = torch.from_numpy(np.stack([values[0] - values[2] / 2, values[1] - values[3] / 2,
                                       values[0] + values[2] / 2, values[1] + values[3] / 2], axis=1))
    chosen = torchvision.ops.box_iou(boxes, torch.tensor([box], dtype=boxes.dtype))[:, 0] >= 0.3
    assert chosen.any()
    out[0, 4 + 7, torch.from_numpy(chosen.numpy())].sum().backward()
    reference = x.grad.numpy().sum(axis=1)
    calls = _Calls(explainer, monkeypatch)
    ours = explainer.explain(image, method="saliency", targets=Box(box, 7, iou=0.3), normalize=False, abs=False)
    assert calls.names == ["input_gradients"]  # the overlaps are decided in the graph: no forward pass first
    assert np.abs(ours.maps - reference).max() <= 1e-3 * np.abs(reference).max()
    np.testing.assert_allclose(ours.logits[0, 0], values[4 + 7, chosen.numpy()].sum(), rtol=1e-4)
    del calls.names[:]
    cam = explainer.explain(image, method="gradcam", targets=Box(box, 7, iou=0.3))
    assert calls.names == ["maps"]  # the map head of the box objective: one call
    assert cam.maps.shape == (1, YOLO_SIZE, YOLO_SIZE) and np.isfinite(cam.maps).all()
    python = Explainer(str(yolo_onnx), output="output0", map_heads=False)
    np.testing.assert_allclose(cam.maps, python.explain(image, method="gradcam", targets=Box(box, 7, iou=0.3)).maps,
                               atol=1e-5)
    with pytest.raises(InvalidTargetError, match="no prediction overlaps"):
        explainer.explain(image, method="gradcam", targets=Box([0, 0, 2, 2], 7, iou=0.9))
    with pytest.raises(InvalidTargetError, match="outside the 160x160 image"):
        explainer.explain(image, method="gradcam", targets=Box([10, 10, 170, 50], 7))
    with pytest.raises(InvalidTargetError, match="out of range for an output of 80 classes"):
        explainer.explain(image, method="gradcam", targets=Box(box, 80))
    rise = explainer.explain(image, method="rise", targets=Box(box, 7, iou=0.3), n_masks=8, grid=4)  # D-RISE-like
    assert np.isfinite(rise.maps).all() and rise.maps.max() == 1
    for targets in (0, None):  # a class index on a detector head would be a row summed over anchors
        with pytest.raises(InvalidTargetError, match="detector head"):
            explainer.explain(image, method="gradcam", targets=targets)
    eigen = explainer.explain(image, method="eigencam")  # its maps do not depend on a target: any output
    assert np.isclose(eigen.maps.max(), 1) and eigen.maps.std() > 0.01


@pytest.fixture(scope="module")
def yolo_neck_explainer(yolo: torch.nn.Module) -> Explainer:
    """The YOLOv8n at the P3 neck output (``model.15``), which every scale's gradient reaches."""
    import copy

    exported = copy.deepcopy(yolo)  # an export leaves traced tensors cached on the module (its anchors)
    return Explainer(exported, [exported.model[15]], input_size=(YOLO_SIZE, YOLO_SIZE))


def test_box_reverse_pass_skips_unmatched_scales(yolo: torch.nn.Module, yolo_neck_explainer: Explainer) -> None:
    """The maps-only model of a box objective runs each scale's reverse branch (P3, P4, P5 class branches,
    the neck behind P4 and P5) inside an If on whether a box matched a prediction of that scale, else zeros:
    the same maps, objectives and matches as the model without them, for boxes matched on one scale only and
    on several, K = 1 and 2 boxes per image (the values are checked against autograd above)."""
    import onnxruntime as ort

    from explainrt.export.spec import BOXES_INPUT
    from explainrt.export.variants import variant_model

    explainer = yolo_neck_explainer
    made = {skip: variant_model(explainer.session.model, explainer.spec, "boxes_yolov8", False, maps=["gradcam"],
                                maps_only=True, target_objective=True, zero_branches=skip) for skip in (True, False)}
    wrapped = _if_nodes(made[True].graph)
    assert len(wrapped) >= 3 and not any(n.op_type == "If" for n in made[False].graph.node)
    # the P4 and P5 class branches, which only the neck's branch reads, run inside it: skipped with it, their zeros
    # not made when no box matched P4 or P5
    outer = [n for n in made[True].graph.node if n.op_type == "If"]
    nested = [n for node in outer for a in node.attribute if a.name == "then_branch" for n in _if_nodes(a.g)]
    assert len(nested) == 2 and len(outer) + len(nested) == len(wrapped)
    inside = [n.op_type for node in wrapped for a in node.attribute if a.name == "then_branch" for n in a.g.node]
    assert inside.count("Conv") >= 8 and not any(n.op_type == "Conv" and n.name.startswith("explainrt/grad/")
                                                 for n in made[True].graph.node)
    # the seed (the box's class row times its matched predictions) is split by scale before the product is made:
    # each scale's part made from its own matches, no full-size product nor a copy of one; the P3 part, whose branch
    # runs on a window (below), is multiplied on the window's cells alone
    for windows, model in made.items():
        nodes = [*model.graph.node, *(n for node in _if_nodes(model.graph) for a in node.attribute for n in a.g.node)]
        made_by = {o: n for n in nodes for o in n.output}
        (split,) = [n for n in nodes if n.op_type == "Split" and len(n.output) == 3 and n.input[0] in made_by
                    and made_by[n.input[0]].name.startswith("explainrt/grad/seed/")]
        assert "explainrt/grad/seed/boxes" not in {n.name for n in nodes}
        readers = [[n.op_type for n in nodes if part in n.input] for part in split.output]
        assert readers == [["Reshape"] if windows else ["Mul"], ["Mul"], ["Mul"]], readers
    images = np.concatenate([_image((1, 3, YOLO_SIZE, YOLO_SIZE), seed=5), _image((1, 3, YOLO_SIZE, YOLO_SIZE), seed=6)])
    images = images * 0.2 + 0.5
    with torch.no_grad():
        values = yolo(torch.from_numpy(images)).numpy()  # [2, 84, 400 + 100 + 25]
    scales = [(0, 400), (400, 500), (500, 525)]

    corners = np.stack([values[:, 0] - values[:, 2] / 2, values[:, 1] - values[:, 3] / 2,
                        values[:, 0] + values[:, 2] / 2, values[:, 1] + values[:, 3] / 2], axis=1)  # [2, 4, anchors]
    within = (corners[:, :2] >= 0).all(axis=1) & (corners[:, 2:] <= YOLO_SIZE).all(axis=1)
    # per image and scale, the box of the scale's most confident prediction of class 7 that lies in the image
    rows = [[Box(corners[i, :, start + int(np.argmax(np.where(within[i, start:stop], values[i, 4 + 7, start:stop], -1)))],
                 7, iou=0.5) for start, stop in scales] for i in range(2)]
    matched = [[{s for s, (start, stop) in enumerate(scales) if box._overlapping(values[i])[start:stop].any()}
                for box in row] for i, row in enumerate(rows)]
    conditions = [n.input[0] for n in wrapped]  # also returned, to see which branches ran
    made[True].graph.output.extend(onnx.helper.make_tensor_value_info(c, onnx.TensorProto.BOOL, []) for c in conditions)
    producers = {o: n for n in made[True].graph.node for o in n.output}
    flags = sorted(o for o, n in producers.items() if n.name.startswith("explainrt/zero_branches/flags/Greater"))
    assert len(flags) == 3  # one per scale, in the anchors' order: P3, P4, P5

    def scales_of(condition: str) -> set[int]:  # the scales whose flags an If's condition ORs
        node = producers[condition]
        return {flags.index(condition)} if condition in flags else set().union(*map(scales_of, node.input))

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the same kernels, no fusions
    sessions = {skip: ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
                for skip, model in made.items()}
    ran = []
    for picks in ([0], [2], [1, 2], [0, 1]):  # per image, the boxes of these scales' most confident predictions
        boxes = np.array([[[*rows[i][p].box, 7, 0.5] for p in picks] for i in range(2)], np.float32)
        ran.append(set().union(*(matched[i][p] for i in range(2) for p in picks)))
        skipped = set(range(3)) - ran[-1]
        feeds = {explainer.spec.image_input: images, BOXES_INPUT: boxes}
        ours, reference = (sessions[skip].run(None, feeds) for skip in (True, False))
        for got, want, name in zip(ours, reference, ("logits", "matches", "maps")):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=f"{name}, picks {picks}, skipped {skipped}")
        assert reference[-1].std() > 0.01, picks
        executed = [bool(flag) for flag in ours[len(reference):]]
        assert executed == [bool(scales_of(c) & ran[-1]) for c in conditions], (picks, ran[-1], executed)
    assert any(len(r) == 1 for r in ran) and any(len(r) >= 2 for r in ran)  # scales left out (If took else), and not
    # the P3 class branch runs on the window of the 20x20 grid its matched cells reach (its inputs sliced): at the
    # grid's corners (the window clipped to it), at two far corners at once, and at one cell per image. The map
    # head alone reads its output gradient (the sums over the target layer's Conv taps): not padded back to the
    # grid, the head's tables are cut to the window instead
    windowed = [a.g for node in wrapped for a in node.attribute if a.name == "then_branch"
                and any(n.op_type == "Slice" and "/window/" in n.name for n in a.g.node)]
    assert len(windowed) == 1 and not any(n.op_type == "Pad" for n in windowed[0].node)
    assert sum(n.op_type == "Mul" and n.name.endswith("/product") for n in windowed[0].node) == 1
    cut_tables = [n for n in made[True].graph.node if n.op_type == "Slice" and n.name.startswith("explainrt/zero_branches/")
                  and any(producers.get(i) is None and i in {t.name for t in made[True].graph.initializer} for i in n.input[:1])]
    assert len(cut_tables) == 2  # the head's row and column tables
    assert len(windowed) < len(wrapped)  # the neck behind P4 and P5 (an upsampling, a Concat) runs whole
    for cells in ([0], [399], [0, 399], [21, 378]):  # each cell's own predicted box: an IoU of 1 with it
        boxes = np.array([[[*corners[i, :, cell], 7, 0.9] for cell in cells] for i in range(2)], np.float32)
        feeds = {explainer.spec.image_input: images, BOXES_INPUT: boxes}
        ours, reference = (sessions[skip].run(None, feeds) for skip in (True, False))
        assert (ours[1] > 0).all(), cells  # each box matched (at least the prediction it was made from)
        for got, want, name in zip(ours, reference, ("logits", "matches", "maps")):
            # a convolution over a window may sum in another order than over the grid: float32 rounding apart
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{name}, cells {cells}")
        assert reference[-1].std() > 0.01, cells
    # weighted boxes (a Box with linear targets, compat's sums of boxes) may weigh any prediction, through
    # YOLOv8's box decoding (reshapes that move the anchor axis): every scale runs, as without
    weighted = variant_model(explainer.session.model, explainer.spec, "weights_boxes_yolov8", False, maps=["gradcam"],
                             maps_only=True, target_objective=True, zero_branches=True)
    assert not any(n.op_type == "If" for n in weighted.graph.node)


def test_reverse_pass_takes_forward_shapes_from_the_image(yolo_neck_explainer: Explainer, tmp_path) -> None:  # noqa: ANN001
    """The reverse pass (its If branches too) reads no Shape of a forward tensor whose shape is static but for the
    batch: the image's batch joined to constants instead. ONNX Runtime keeps convolution outputs in a blocked layout
    (NCHWc): it then converts none of them back for a Shape alone (it did for 14, even in branches that do not run)."""
    import onnxruntime as ort

    from explainrt.export.variants import variant_model

    explainer = yolo_neck_explainer
    made = variant_model(explainer.session.model, explainer.spec, "boxes_yolov8", False, maps=["gradcam"],
                         maps_only=True, target_objective=True, zero_branches=True)
    forward = {o for n in made.graph.node if not n.name.startswith("explainrt/") for o in n.output}
    graphs = [made.graph, *(a.g for n in _if_nodes(made.graph) for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)]
    assert not [n.name for g in graphs for n in g.node if n.op_type == "Shape" and n.input[0] in forward]
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(made.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath)
    readers: dict[str, list[str]] = {}
    for g in [optimized.graph, *(a.g for n in _if_nodes(optimized.graph) for a in n.attribute
                                 if a.type == onnx.AttributeProto.GRAPH)]:
        for n in g.node:
            for name in n.input:
                readers.setdefault(name, []).append(n.op_type)
            for a in n.attribute:  # what a branch reads from the enclosing graph
                if a.type == onnx.AttributeProto.GRAPH:
                    for inner in a.g.node:
                        for name in inner.input:
                            readers.setdefault(name, []).append(inner.op_type)
    reorders = [n for n in optimized.graph.node if n.op_type == "ReorderOutput"]
    assert reorders  # the model does run in NCHWc: the check below checks something
    assert not [n.name for n in reorders if set(readers.get(n.output[0], [])) == {"Shape"}]


@pytest.mark.parametrize("batch", ["N", 2])
def test_forward_shapes_from_the_image_trust_only_what_the_batch_allows(batch: object) -> None:
    """A forward tensor's Shape becomes the image's batch and constants (a dynamic batch) or a constant (a static
    one, or the axes after the batch), from shapes inferred anew: a fixed first axis the graph records beside a
    dynamic batch (a stale trace-time shape) is not trusted. Run-time values equal the Shapes'."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from explainrt.export.forward_shapes import shapes_from_the_image

    graph = helper.make_graph(
        [helper.make_node("Relu", ["image"], ["relu"], name="relu"),
         helper.make_node("Sigmoid", ["image"], ["sigmoid"], name="sigmoid"),
         helper.make_node("Shape", ["relu"], ["relu_shape"], name="explainrt/shape/relu"),
         helper.make_node("Shape", ["sigmoid"], ["sigmoid_shape"], name="explainrt/shape/sigmoid", start=1)],
        "shapes", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, 4, 5])],
        [helper.make_tensor_value_info(name, TensorProto.INT64, None) for name in ("relu_shape", "sigmoid_shape")],
        value_info=[helper.make_tensor_value_info("relu", TensorProto.FLOAT, [1, 3, 4, 5]),  # stale where batch is N
                    helper.make_tensor_value_info("sigmoid", TensorProto.FLOAT, [batch, 3, 4, 5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert shapes_from_the_image(model, "image") == 2
    assert [n.op_type for n in model.graph.node if n.name in ("explainrt/shape/relu", "explainrt/shape/sigmoid")] \
        == ["Identity", "Identity"]
    readers = {n.output[0]: n.input[0] for n in model.graph.node}
    assert (readers["relu_shape"] in {t.name for t in model.graph.initializer}) == (batch == 2)  # N: from the image
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    relu_shape, sigmoid_shape = session.run(None, {"image": np.zeros((2, 3, 4, 5), np.float32)})
    assert relu_shape.tolist() == [2, 3, 4, 5] and sigmoid_shape.tolist() == [3, 4, 5]


def _if_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The If nodes of ``graph`` and of its If nodes' branches, outer ones first."""
    found = [n for n in graph.node if n.op_type == "If"]
    return found + [inner for node in found for a in node.attribute for inner in _if_nodes(a.g)]


@pytest.mark.parametrize(("kernel", "attributes", "radius"), [
    ((3, 3), {"pads": [1, 1, 1, 1]}, 1),
    ((1, 1), {}, 0),
    ((5, 3), {"pads": [2, 1, 2, 1], "strides": [1, 1], "dilations": [1, 1]}, 2),
    ((3, 3), {"pads": [1, 1, 1, 1], "strides": [2, 2]}, None),  # a stride moves the grid
    ((3, 3), {"pads": [1, 1, 1, 1], "dilations": [2, 2]}, None),
    ((3, 3), {"pads": [0, 0, 0, 0]}, None),  # "valid": the output grid is smaller
    ((3, 3), {"pads": [1, 1, 0, 0]}, None),
    ((2, 2), {"pads": [1, 1, 0, 0]}, None),  # an even kernel has no centre
    ((3, 3), {"auto_pad": "SAME_UPPER"}, None),
])
def test_window_reach_of_a_convolution(kernel: tuple[int, int], attributes: dict[str, object],
                                       radius: int | None) -> None:
    """How far a reverse-pass Conv spreads a cell's value, for the windowed branches: only "same" stride-1
    convolutions with constant weights run on a window; any other keeps its branch on the whole grid."""
    from explainrt.autodiff.builder import GraphBuilder
    from explainrt.autodiff.windows import _same_conv_radius

    weights = onnx.numpy_helper.from_array(np.ones((4, 4, *kernel), np.float32), "w")
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"], **attributes)
    graph = onnx.helper.make_graph([node], "conv", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [weights])
    builder = GraphBuilder(onnx.helper.make_model(graph))
    assert _same_conv_radius(builder, node) == radius
    computed = onnx.helper.make_node("Conv", ["x", "x"], ["y"], pads=[1, 1, 1, 1])  # weights not constant
    assert _same_conv_radius(builder, computed) is None


def test_box_branches_that_fail_onnx_checks_are_not_kept(yolo_neck_explainer: Explainer,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A wrapped model that ONNX's checks refuse (here a branch output declared int8, as the gradient of an
    int8 tensor would be if typed like it) is dropped with a warning: the model runs every scale, as before."""
    from explainrt.export import explainable
    from explainrt.export.variants import variant_model

    real = explainable.run_when_nonzero

    def mistyped(model: onnx.ModelProto, plan: object) -> int:
        count = real(model, plan)  # type: ignore[arg-type]
        branch = next(n for n in model.graph.node if n.op_type == "If")
        then = next(a.g for a in branch.attribute if a.name == "then_branch")
        then.output[0].type.tensor_type.elem_type = onnx.TensorProto.INT8
        return count

    monkeypatch.setattr(explainable, "run_when_nonzero", mistyped)
    explainer = yolo_neck_explainer
    with caplog.at_level("WARNING", logger="explainrt.export.explainable"):
        model = variant_model(explainer.session.model, explainer.spec, "boxes_yolov8", False, maps=["gradcam"],
                              maps_only=True, target_objective=True, zero_branches=True)
    assert not any(n.op_type == "If" for n in model.graph.node)
    assert "every scale's branch" in caplog.text and "failed ONNX's checks" in caplog.text


class _TinyDetector(torch.nn.Module):
    """[N, 3, 32, 32] -> a raw head of 64 predictions and 2 classes: YOLOv8's [N, 6, 64] or YOLOv5's [N, 64, 7]
    (cx, cy in the image, w, h up to 24 pixels, sigmoid scores)."""

    def __init__(self, layout: str) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.layout = layout
        self.features = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.head = torch.nn.Conv2d(8, 6 if layout == "yolov8" else 7, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = self.head(torch.relu(self.features(x))).flatten(2)  # [N, F, 64]
        fields = torch.cat([torch.sigmoid(raw[:, :2]) * 32, torch.sigmoid(raw[:, 2:4]) * 24, torch.sigmoid(raw[:, 4:])], 1)
        return fields if self.layout == "yolov8" else fields.transpose(1, 2)


def _boxes_of_top_predictions(values: np.ndarray, layout: str, iou: float) -> list[list[Box]]:
    """Per image of a ``_TinyDetector``'s outputs, two Boxes: of class 1 around its most confident prediction of the
    last class, of class 0 around that of the one before (clipped to the 32x32 image)."""
    rows = []
    for output in values:
        predictions = output if layout == "yolov5" else output.T  # [anchors, fields]
        picks = [int(np.argmax(predictions[:, -1])), int(np.argmax(predictions[:, -2]))]
        rows.append([Box(np.clip([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 0, 32), c, iou=iou, layout=layout)
                     for (cx, cy, w, h), c in zip(predictions[picks, :4], (1, 0))])
    return rows


@pytest.mark.parametrize("layout", ["yolov8", "yolov5"])
def test_box_objective_in_one_call_matches_autograd(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """K Box targets per image on both layouts, both backends: one runtime call (the overlaps decided in the
    graph, or by the torch session, on the same pass) equal to torch.autograd of each box's objective."""
    model = _TinyDetector(layout).eval()
    image = _image((2, 3, 32, 32), seed=14)
    x = torch.from_numpy(image).requires_grad_(True)
    out = model(x)
    values = out.detach().numpy()
    rows = _boxes_of_top_predictions(values, layout, iou=0.7)
    for backend in ("onnxruntime", "torch"):
        explainer = Explainer(model, [model.features], backend=backend, input_size=(32, 32))
        calls = _Calls(explainer, monkeypatch)
        ours = explainer.explain(image, method="saliency", targets=rows, normalize=False, abs=False)
        assert calls.names == ["input_gradients"], backend
        for i in range(2):
            for k in range(2):
                x.grad = None
                chosen = torch.from_numpy(rows[i][k]._overlapping(values[i].T if layout == "yolov5" else values[i]))
                assert 0 < int(chosen.sum()) < 64  # some predictions count, not all: the mask matters
                fields = out[i] if layout == "yolov5" else out[i].T
                score = fields[:, 5 + rows[i][k].index] * fields[:, 4] if layout == "yolov5" else fields[:, 4 + rows[i][k].index]
                score[chosen].sum().backward(retain_graph=True)
                reference = x.grad.numpy()[i].sum(axis=0)
                assert np.abs(ours.maps[i, k] - reference).max() <= 1e-4 * np.abs(reference).max(), (backend, i, k)
                np.testing.assert_allclose(ours.logits[i, k], float(score[chosen].sum()), rtol=1e-5)
        with pytest.raises(InvalidTargetError, match="no prediction overlaps"):
            explainer.explain(image, method="gradcam", targets=Box([0, 0, 0.5, 0.5], 1, iou=0.9, layout=layout))


def test_replaced_maps_only_session_is_freed() -> None:
    """A box objective's maps-only session rebuilt with one more method's head lets the old one go (with its copy of
    the weights): what the session remembers of each runtime session does not hold it."""
    import gc
    import weakref

    model = _TinyDetector("yolov8").eval()
    image = _image((1, 3, 32, 32), seed=14)
    with torch.no_grad():
        rows = _boxes_of_top_predictions(model(torch.from_numpy(image)).numpy(), "yolov8", iou=0.3)
    explainer = Explainer(model, [model.features], input_size=(32, 32))
    explainer.explain(image, method="gradcam", targets=rows)
    ((methods, first),) = explainer.session._objective_variants.values()  # type: ignore[attr-defined]
    assert methods == ("gradcam",)
    replaced = weakref.ref(first)
    del first
    explainer.explain(image, method="layercam", targets=rows)
    gc.collect()
    assert replaced() is None


class _RawClassScores(_TinyDetector):
    """The YOLOv8-layout ``_TinyDetector`` with raw class scores (no Sigmoid for the seed to pass)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = self.head(torch.relu(self.features(x))).flatten(2)
        return torch.cat([torch.sigmoid(raw[:, :2]) * 32, torch.sigmoid(raw[:, 2:4]) * 24, raw[:, 4:]], 1)


@pytest.mark.parametrize("layout", ["yolov8", "yolov5", "yolov8_raw"])
def test_box_objectives_are_computed_in_the_graph(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A box objective's model returns each box's objective (``explainrt.box_objectives`` [N, K], equal to
    ``Box.score`` on the same outputs; "yolov8_raw": class scores without a Sigmoid): the map head's and the input
    gradients' explanations of an image read their objectives from it, with no pass over the predictions in
    Python; in a batch whose images explain different boxes, each box is still scored on the other images too
    (``Box.score``), as every target's objective is."""
    import onnxruntime as ort

    from explainrt.export.spec import BOX_OBJECTIVES_OUTPUT, BOXES_INPUT
    from explainrt.export.variants import variant_model

    head = "yolov5" if layout == "yolov5" else "yolov8"
    model = (_RawClassScores("yolov8") if layout == "yolov8_raw" else _TinyDetector(layout)).eval()
    image = _image((2, 3, 32, 32), seed=14)
    with torch.no_grad():
        values = model(torch.from_numpy(image)).numpy()
    rows = _boxes_of_top_predictions(values, head, iou=0.3)
    expected = np.array([[box.score(values[i:i + 1])[0] for box in row] for i, row in enumerate(rows)])
    assert (np.abs(expected) > 1e-3).all()
    explainer = Explainer(model, [model.features], input_size=(32, 32))
    made = variant_model(explainer.session.model, explainer.spec, f"boxes_{head}", False, maps=["gradcam"],
                         maps_only=True, target_objective=True)
    boxes = np.array([[[*box.box, box.index, box.iou] for box in row] for row in rows], np.float32)
    session = ort.InferenceSession(made.SerializeToString(), providers=["CPUExecutionProvider"])
    (computed,) = session.run([BOX_OBJECTIVES_OUTPUT], {explainer.spec.image_input: image, BOXES_INPUT: boxes})
    np.testing.assert_allclose(computed, expected, rtol=1e-5)

    def no_python_pass(self: Box, outputs: np.ndarray) -> np.ndarray:
        raise AssertionError("the objectives were computed again in Python")

    with monkeypatch.context() as patched:
        patched.setattr(Box, "score", no_python_pass)
        for method in ("gradcam", "saliency"):
            for i in range(2):
                np.testing.assert_allclose(explainer.explain(image[i:i + 1], method=method, targets=[rows[i]]).logits,
                                           expected[i:i + 1], rtol=1e-5, err_msg=f"{method}, image {i}")
    for method in ("gradcam", "saliency"):
        np.testing.assert_allclose(explainer.explain(image, method=method, targets=rows).logits, expected, rtol=1e-5)
    # a class the output does not have: its seed is zero, and so is its objective (not its nearest row's)
    absent = boxes.copy()
    absent[:, :, 4] = [7, 99]
    (zeros, matches) = session.run([BOX_OBJECTIVES_OUTPUT, "explainrt.box_matches"],
                                   {explainer.spec.image_input: image, BOXES_INPUT: absent})
    assert (matches > 0).all() and not zeros.any()
    # float16: the objectives summed and returned in float32
    from onnxconverter_common import float16

    from explainrt.export.spec import original_model

    half = Explainer(float16.convert_float_to_float16(original_model(explainer.session.model), keep_io_types=True))
    explained = half.explain(image, targets=rows)
    assert explained.logits.dtype == np.float32
    np.testing.assert_allclose(explained.logits, expected, rtol=2e-2)


def test_boxes_on_copies_of_the_image_score_zero_on_the_image_they_must_match() -> None:
    """IG's interpolations and SmoothGrad's noisy copies may match no prediction: they score 0 (no error), and
    IG equals its integral computed with torch.autograd, each point's matches decided on its own forward pass.
    A Box the image itself does not match is refused by the perturbation methods too (not a blank map)."""
    from explainrt.methods.gradients import quadrature

    model = _TinyDetector("yolov8").eval()
    image = _image((1, 3, 32, 32), seed=21)
    with torch.no_grad():
        predictions = model(torch.from_numpy(image))[0].numpy().T
    cx, cy, w, h = predictions[int(np.argmax(predictions[:, 5]))][:4]
    box = Box(np.clip([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 0, 32), 1, iou=0.9, layout="yolov8")
    explainer = Explainer(model, [model.features], input_size=(32, 32))
    steps = 8
    ours = explainer.explain(image, method="integrated-gradients", targets=box, normalize=False, steps=steps)
    alphas, weights = quadrature("gausslegendre", steps)
    x = torch.from_numpy(image)
    path, matched = torch.zeros_like(x), []
    for alpha, weight in zip(alphas, weights):
        point = (float(alpha) * x).requires_grad_(True)
        out = model(point)[0]
        chosen = torch.from_numpy(box._overlapping(out.detach().numpy()))
        matched.append(bool(chosen.any()))
        out[5, chosen].sum().backward()
        path += float(weight) * point.grad
    assert not all(matched) and any(matched)  # the path crosses copies that match nothing
    reference = (x * path).sum(dim=1).numpy()
    assert np.abs(ours.maps - reference).max() <= 1e-4 * np.abs(reference).max()
    noisy = explainer.explain(image, method="smoothgrad", targets=box, normalize=False, noise=0.05, n_samples=6)
    std = 0.05 * (image.max() - image.min())
    copies = torch.from_numpy(image + std * np.random.default_rng(0).standard_normal((6, 3, 32, 32), dtype=np.float32))
    copies.requires_grad_(True)
    out = model(copies)
    chosen = torch.from_numpy(np.stack([box._overlapping(row) for row in out.detach().numpy()]))
    assert 0 < int(chosen.any(dim=1).sum()) < 6
    (out[:, 5] * chosen).sum().backward()
    reference = copies.grad.mean(dim=0).abs().sum(dim=0).numpy()
    assert np.abs(noisy.maps[0] - reference).max() <= 1e-4 * np.abs(reference).max()
    missed = Box([0, 0, 0.5, 0.5], 1, iou=0.9, layout="yolov8")
    for method in ("occlusion", "rise", "integrated-gradients", "smoothgrad"):
        with pytest.raises(InvalidTargetError, match="no prediction overlaps"):
            explainer.explain(image, method=method, targets=missed)
    # two images, each with a Box only it matches: the other image's Box is no error on it, and each map is the
    # one the image gets alone
    second = _image((1, 3, 32, 32), seed=23)
    with torch.no_grad():
        others = model(torch.from_numpy(second))[0].numpy().T
    cx, cy, w, h = others[16][:4]  # a prediction of the second image that the first has none like (IoU >= 0.9)
    own = Box(np.clip([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 0, 32), 0, iou=0.9, layout="yolov8")
    assert not box._overlapping(others.T).any() and not own._overlapping(predictions.T).any()
    both = np.concatenate([image, second])
    for method, options in (("occlusion", {"window": (8, 8), "stride": (8, 8)}), ("integrated-gradients", {"steps": 4})):
        pair = explainer.explain(both, method=method, targets=[box, own], normalize=False, **options)
        alone = explainer.explain(second, method=method, targets=own, normalize=False, **options)
        np.testing.assert_allclose(pair.maps[1], alone.maps[0], rtol=1e-4, atol=1e-6)


def test_box_gradient_skips_the_zero_box_rows() -> None:
    """YOLOv8's box rows get no cotangent: the reverse pass starts at the concatenated part holding the class
    rows and builds nothing for the parts before it; that part is a Sigmoid, seeded at its input (its derivative
    gathered on the boxes' classes: no rule of its own). The values are checked against torch.autograd in
    test_box_objective_in_one_call_matches_autograd."""
    from explainrt.export.explainable import make_explainable
    from explainrt.export.torch_export import LOGITS_OUTPUT, export_torch

    model = _TinyDetector("yolov8").eval()
    plain, taps = export_torch(model, torch.zeros(1, 3, 32, 32), [model.features])
    explainable = make_explainable(plain, taps, logits=LOGITS_OUTPUT, objective="boxes_yolov8")
    producers = {out: n for n in plain.graph.node for out in n.output}
    concat = producers[LOGITS_OUTPUT]
    assert concat.op_type == "Concat" and len(concat.input) == 3
    box_parts = {producers[x].name for x in concat.input[:2]}  # the Muls scaling cx, cy and w, h
    added = [n.name for n in explainable.graph.node if n.name.startswith("explainrt/grad/")]
    assert not [name for name in added if name.split("/")[2] in box_parts]
    sigmoid = producers[concat.input[2]]  # the class scores'
    assert sigmoid.op_type == "Sigmoid" and not [name for name in added if name.split("/")[2] == sigmoid.name]
    assert any(name.split("/")[2] == producers[sigmoid.input[0]].name for name in added)
    assert [n for n in explainable.graph.node if n.op_type == "GatherElements" and n.name.startswith("explainrt/grad/seed")]
    # fed straight to ONNX Runtime, a class the head does not have (5, -3 of its 2) matches predictions and seeds
    # nothing: the gather reads a clamped row that the class's one-hot row then zeroes
    import onnxruntime as ort

    from explainrt.export.spec import BOX_MATCHES_OUTPUT, BOXES_INPUT, gradients_output

    session = ort.InferenceSession(explainable.SerializeToString())
    boxes = np.array([[[0, 0, 32, 32, c, 1e-4] for c in (1, 5, -3)]], np.float32)
    gradients, matches = session.run([gradients_output(0), BOX_MATCHES_OUTPUT],
                                     {session.get_inputs()[0].name: _image((1, 3, 32, 32), seed=14), BOXES_INPUT: boxes})
    assert matches.tolist() == [[64, 64, 64]]
    assert np.abs(gradients[:, 0]).max() > 1e-3 and not gradients[:, 1:].any()


def test_box_yolov5_layout_is_objectness_times_class() -> None:
    """YOLOv5's [anchors, 5 + classes]: the objective's gradient is that of objectness x class score."""
    rng = np.random.default_rng(0)
    output = np.concatenate([np.array([[20, 20, 10, 10], [21, 20, 10, 10], [60, 60, 8, 8]], np.float32),
                             rng.uniform(size=(3, 4)).astype(np.float32)], axis=1)  # 3 anchors, 2 classes
    target = Box([15, 15, 25, 25], 1, layout="yolov5")  # 3 anchors: too few to tell the layout from the shape
    target.check(output.shape, (100, 100))
    y = torch.from_numpy(output).requires_grad_(True)
    (y[:2, 4] * y[:2, 6]).sum().backward()
    np.testing.assert_allclose(target.gradient(output), y.grad.numpy(), rtol=1e-6)
    np.testing.assert_allclose(target.score(output[None]), [(output[:2, 4] * output[:2, 6]).sum()], rtol=1e-6)
    both = Sum([target, Box([55, 55, 65, 65], 0, layout="yolov5")])  # compat's FasterRCNNBoxScoreTarget, per box
    np.testing.assert_allclose(both.score(output[None]), [(output[:2, 4] * output[:2, 6]).sum() + output[2, 4] * output[2, 5]],
                               rtol=1e-6)


# -- embeddings and classifiers ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedder() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=16).eval()
    return model


@pytest.fixture(scope="module")
def embedder_explainer(embedder: torch.nn.Module) -> Explainer:
    """The embedding model (an [N, 16] output) exported to ONNX once for this module."""
    return Explainer(embedder, [embedder.layer4], input_size=(64, 64))


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_similarity_matches_autograd(embedder: torch.nn.Module, embedder_explainer: Explainer, backend: str) -> None:
    image = _image((2, 3, 64, 64), seed=6)
    concept = np.random.default_rng(7).normal(size=16).astype(np.float32)
    x = torch.from_numpy(image).requires_grad_(True)
    (embedder(x) @ torch.from_numpy(concept)).sum().backward()
    explainer = embedder_explainer if backend == "onnxruntime" else Explainer(embedder, [embedder.layer4],
                                                                              backend=backend, input_size=(64, 64))
    ours = explainer.explain(image, method="saliency", targets=Similarity(concept), normalize=False, abs=False)
    reference = x.grad.numpy().sum(axis=1)
    assert np.abs(ours.maps - reference).max() <= 1e-4 * np.abs(reference).max()
    with torch.no_grad():
        np.testing.assert_allclose(ours.logits[:, 0], (embedder(torch.from_numpy(image)) @ torch.from_numpy(concept))
                                   .numpy(), rtol=1e-4)
    with pytest.raises(InvalidTargetError, match="needs an embedding output"):
        explainer.explain(image, targets=Similarity(concept[:8]))


@pytest.mark.parametrize(("target", "objective"), [
    (Softmax(3), lambda y: torch.softmax(y, dim=1)[:, 3]),
    (Difference(3, 5), lambda y: y[:, 3] - y[:, 5]),
    (Weights(np.linspace(-1, 1, 16, dtype=np.float32)), lambda y: y @ torch.linspace(-1, 1, 16)),
])
def test_classifier_targets_match_autograd(embedder: torch.nn.Module, embedder_explainer: Explainer, target: object,
                                          objective: object) -> None:
    """Per image targets (one list); input gradients (IG's integrand at the image) and Grad-CAM."""
    image = _image((2, 3, 64, 64), seed=8)
    x = torch.from_numpy(image).requires_grad_(True)
    objective(embedder(x)).sum().backward()  # type: ignore[operator]
    explainer = embedder_explainer
    ours = explainer.explain(image, method="saliency", targets=[target, target], normalize=False, abs=False)
    reference = x.grad.numpy().sum(axis=1)
    assert np.abs(ours.maps - reference).max() <= 1e-4 * np.abs(reference).max()
    with torch.no_grad():
        np.testing.assert_allclose(ours.logits[:, 0], objective(embedder(torch.from_numpy(image))).numpy(),  # type: ignore[operator]
                                   rtol=1e-4, atol=1e-6)


def test_mixed_targets_and_class_fast_path(embedder_explainer: Explainer) -> None:
    """Class objects alone take the class-index path; mixed with others, each image gets its own objective."""
    image = _image((2, 3, 64, 64), seed=9)
    explainer = embedder_explainer
    fast = explainer.explain(image, method="gradcam", targets=[Class(2), Class(-1)], normalize=False)
    assert fast.logits.shape == (2, 16)
    mixed = explainer.explain(image, method="gradcam", targets=[Class(2), Difference(1, 0)], normalize=False)
    np.testing.assert_allclose(mixed.maps[0], fast.maps[0], rtol=1e-4, atol=1e-6)
    assert mixed.targets.tolist() == [2, 1]
    ranked = explainer.explain(image, method="gradcam", targets=[Softmax(-2), Difference(-1, -2)], normalize=False)
    order = np.argsort(-explainer.predict(image), axis=1)
    assert ranked.targets.tolist() == [order[0, 1], order[1, 0]]  # the classes the ranks name, not the ranks
    # objectives, not class scores: no top classes from them (Explainer.predict has the model's scores)
    with pytest.raises(InvalidTargetError, match="objectives"):
        mixed.top_k(2)
    assert [line.split(" | ")[0] for line in mixed.captions()] == [f"class 2 score {mixed.logits[0, 0]:.3g}",
                                                                  f"class 1 score {mixed.logits[1, 0]:.3g}"]


class _Calls:
    """Counts the runtime calls an explainer's session gets (forward passes and gradient runs)."""

    def __init__(self, explainer: Explainer, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: list[str] = []
        for name in ("run", "input_gradients", "logits", "maps"):
            if not hasattr(explainer.session, name):  # maps: sessions with map heads only
                continue
            original = getattr(explainer.session, name)

            def counted(*args: object, _name: str = name, _original: object = original, **kwargs: object) -> object:
                self.names.append(_name)
                return _original(*args, **kwargs)  # type: ignore[operator]

            monkeypatch.setattr(explainer.session, name, counted)


def test_k_targets_per_image_equal_one_at_a_time_in_one_runtime_call(
        embedder: torch.nn.Module, embedder_explainer: Explainer, monkeypatch: pytest.MonkeyPatch) -> None:
    """targets = K objects per image: maps [N, K, H, W] from one runtime call equal to K one-target calls,
    and Saliency's signed maps equal torch.autograd's input gradient of each objective."""
    image = _image((2, 3, 64, 64), seed=11)
    weights = np.linspace(-1, 1, 16, dtype=np.float32)
    rows = [[Class(1), Difference(3, 5), Similarity(weights)], [Weights(weights), Class(4), Difference(0, 2)]]
    objectives = [[lambda y: y[1], lambda y: y[3] - y[5], lambda y: y @ torch.from_numpy(weights)],
                  [lambda y: y @ torch.from_numpy(weights), lambda y: y[4], lambda y: y[0] - y[2]]]
    explainer = embedder_explainer
    calls = _Calls(explainer, monkeypatch)
    many = explainer.explain(image, method="gradcam", targets=rows, normalize=False)
    assert calls.names == ["run"]  # all K linear targets of the batch: one call, no forward pass first
    assert many.maps.shape == (2, 3, 64, 64) and many.logits.shape == (2, 3)
    assert many.targets.tolist() == [[1, 3, -1], [-1, 4, 0]]
    for k in range(3):
        one = explainer.explain(image, method="gradcam", targets=[row[k] for row in rows], normalize=False)
        np.testing.assert_allclose(many.maps[:, k], one.maps, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(many.logits[:, k], one.logits[:, 0], rtol=1e-6)
    del calls.names[:]
    saliency = explainer.explain(image, method="saliency", targets=rows, normalize=False, abs=False)
    assert calls.names == ["input_gradients"]
    for i in range(2):
        for k in range(3):
            x = torch.from_numpy(image[i:i + 1]).requires_grad_(True)
            objectives[i][k](embedder(x)[0]).backward()
            reference = x.grad.numpy().sum(axis=1)[0]
            assert np.abs(saliency.maps[i, k] - reference).max() <= 1e-4 * np.abs(reference).max()
            with torch.no_grad():
                np.testing.assert_allclose(saliency.logits[i, k], objectives[i][k](embedder(torch.from_numpy(image[i:i + 1]))[0]),
                                           rtol=1e-4, atol=1e-6)
    shown = explainer.explain(image, method="gradcam", targets=rows)  # each map normalised on its own
    for k in range(3):
        one = explainer.explain(image, method="gradcam", targets=[row[k] for row in rows])
        np.testing.assert_allclose(shown.maps[:, k], one.maps, atol=1e-6)
    blank = [f"target(s) {k} is all zero" if not many.maps[i, k].max() > 0 else None for i in range(2) for k in range(3)]
    assert [note is not None for note in shown.notes] == [any(blank[3 * i:3 * i + 3]) for i in range(2)]


def test_k_class_indices_per_image(embedder_explainer: Explainer, monkeypatch: pytest.MonkeyPatch) -> None:
    """[N, K] ints: map heads and the Python path in one call, perturbation methods one call per column;
    each equal to the one-column call. Softmax K per image uses the probability seed."""
    image = _image((2, 3, 64, 64), seed=12)
    explainer = embedder_explainer
    ranks = [[1, 5, -1], [2, 3, -2]]
    for heads in (True, False):
        monkeypatch.setattr(explainer, "map_heads", heads)
        calls = _Calls(explainer, monkeypatch)
        many = explainer.explain(image, method="gradcam++", targets=ranks)
        # one session call for all K (maps() runs the model, then the method's head alone, inside it)
        assert calls.names[0] == ("maps" if heads else "run") and calls.names.count(calls.names[0]) == 1
        assert many.maps.shape == (2, 3, 64, 64)
        for k in range(3):
            one = explainer.explain(image, method="gradcam++", targets=[row[k] for row in ranks])
            np.testing.assert_allclose(many.maps[:, k], one.maps, atol=1e-5)
            assert many.targets[:, k].tolist() == one.targets.tolist()
    occluded = explainer.explain(image, method="occlusion", targets=ranks, window=16, stride=16)
    for k in range(3):
        one = explainer.explain(image, method="occlusion", targets=[row[k] for row in ranks], window=16, stride=16)
        np.testing.assert_allclose(occluded.maps[:, k], one.maps, atol=1e-6)
    probabilities = explainer.explain(image, method="saliency", targets=[[Softmax(1), Softmax(2)]] * 2,
                                      normalize=False)
    for k, index in enumerate((1, 2)):
        one = explainer.explain(image, method="saliency", targets=Softmax(index), normalize=False)
        np.testing.assert_allclose(probabilities.maps[:, k], one.maps, rtol=1e-5, atol=1e-9)
    pictures = list(np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8))
    drawn = explainer.explain(pictures, method="gradcam", targets=[[1, 5], [2, 3]])
    overlays, captions = drawn.overlays(), drawn.captions()
    assert drawn.overlays(captions=True).shape == overlays.shape
    assert overlays.shape[:2] == (2, 2) and overlays.shape[-1] == 3 and overlays.dtype == np.uint8
    assert len(captions) == 4 and [text.split()[:2] for text in captions][1] == ["class", "5"]
    single = explainer.explain(pictures[0], method="gradcam", targets=5).overlays()
    np.testing.assert_array_equal(overlays[0, 1], single[0])


def test_k_targets_errors(embedder_explainer: Explainer) -> None:
    image = _image((2, 3, 64, 64), seed=13)
    explainer = embedder_explainer
    with pytest.raises(InvalidTargetError, match="same number K >= 1 of targets"):
        explainer.explain(image, targets=[[Class(1), Class(2)], [Difference(1, 0)]])
    with pytest.raises(InvalidTargetError, match="same number K >= 1 of targets"):
        explainer.explain(image, targets=[[Difference(1, 0)], []])
    with pytest.raises(InvalidTargetError, match="not both"):
        explainer.explain(image, targets=[[Difference(1, 0)], Class(2)])
    with pytest.raises(InvalidTargetError, match="one sequence of K targets per image"):
        explainer.explain(image, targets=[[Difference(1, 0), Class(2)]])
    with pytest.raises(InvalidTargetError, match="Softmax targets cannot be mixed with linear targets"):
        explainer.explain(image, targets=[[Softmax(1), Class(2)], [Difference(1, 0), Class(2)]])
    with pytest.raises(InvalidInputError, match="equal-length rows of K ints"):
        explainer.explain(image, targets=[[1, 2], [3]])
    with pytest.raises(InvalidTargetError, match="explains classes"):
        explainer.explain(image, method="contrast-cam", targets=[[Difference(1, 0)], [Class(1)]])


def test_compat_softmax_target_matches_pytorch_grad_cam(embedder: torch.nn.Module) -> None:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget

    from explainrt import compat

    image = torch.from_numpy(_image((2, 3, 64, 64), seed=10))
    targets = [ClassifierOutputSoftmaxTarget(3), ClassifierOutputTarget(5)]
    with GradCAM(model=embedder, target_layers=[embedder.layer4]) as cam:
        reference = cam(input_tensor=image, targets=targets)
    with compat.GradCAM(model=embedder, target_layers=[embedder.layer4]) as cam:  # a probability and a logit
        ours = cam(input_tensor=image, targets=targets)
    np.testing.assert_allclose(ours, reference, atol=2e-4)


@pytest.mark.parametrize("method", ["GradCAM", "ScoreCAM"])
def test_compat_binary_and_raw_scores_targets_match_pytorch_grad_cam(method: str) -> None:
    """BinaryClassifierOutputTarget (category 1: +logit, else -logit) and RawScoresOutputTarget (the output
    itself) on a one-logit classifier, pytorch-grad-cam's target objects in both libraries: Grad-CAM
    (gradients) and Score-CAM (each masked copy scored with the target)."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget, RawScoresOutputTarget

    from explainrt import compat

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 1)).eval()
    image = torch.from_numpy(_image((2, 3, 32, 32), seed=18))
    for targets in ([BinaryClassifierOutputTarget(1), BinaryClassifierOutputTarget(0)], [RawScoresOutputTarget()] * 2):
        with getattr(pytorch_grad_cam, method)(model=model, target_layers=[model[2]]) as cam:
            reference = cam(input_tensor=image, targets=targets)
        with getattr(compat, method)(model=model, target_layers=[model[2]]) as cam:
            ours = cam(input_tensor=image, targets=targets)
        assert reference.std(axis=(1, 2)).min() > 0.05  # maps that vary: the comparison says something
        np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_compat_faster_rcnn_box_score_target_is_the_sum_of_its_boxes() -> None:
    """compat's FasterRCNNBoxScoreTarget on a raw head: per box and label the overlapping predictions' scores
    summed, the maps those of explainrt's Sum of Boxes; a target without boxes is refused."""
    from explainrt import compat

    model = _TinyDetector("yolov8").eval()
    image = _image((1, 3, 32, 32), seed=23)
    with torch.no_grad():
        predictions = model(torch.from_numpy(image))[0].numpy().T
    picks = [int(np.argmax(predictions[:, 5])), int(np.argmax(predictions[:, 4]))]
    boxes = np.array([np.clip([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 0, 32)
                      for cx, cy, w, h in predictions[picks, :4]])
    target = compat.FasterRCNNBoxScoreTarget(labels=[1, 0], bounding_boxes=boxes, iou_threshold=0.7)
    with compat.GradCAM(model=model, target_layers=[model.features]) as cam:
        ours = cam(input_tensor=torch.from_numpy(image), targets=[target])
    summed = Sum([Box(boxes[0], 1, iou=0.7), Box(boxes[1], 0, iou=0.7)])
    direct = Explainer(model, [model.features], input_size=(32, 32)).explain(image, targets=summed)
    assert direct.maps.std() > 0.05
    np.testing.assert_allclose(ours, direct.maps, atol=1e-5)
    with compat.GradCAM(model=model, target_layers=[model.features]) as cam:
        with pytest.raises(InvalidInputError, match="has no bounding boxes"):
            cam(input_tensor=torch.from_numpy(image), targets=[compat.FasterRCNNBoxScoreTarget([], np.zeros((0, 4)))])


# -- command line ------------------------------------------------------------------------------------
class _TinySegmenter(torch.nn.Module):
    """[N, 3, 32, 32] -> {"out": [N, 4, 32, 32]}: a strided conv, a 1x1 classifier, bilinear upsampling."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.classifier = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        scores = self.classifier(torch.relu(self.features(x)))
        return {"out": torch.nn.functional.interpolate(scores, size=x.shape[2:], mode="bilinear", align_corners=False)}


def test_cli_region_and_box_targets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import onnx
    from PIL import Image

    from explainrt.cli import main
    from explainrt.export.torch_export import from_torch
    from explainrt.targets import parse

    model = _TinySegmenter().eval()
    onnx.save(from_torch(model, torch.zeros(1, 3, 32, 32), [model.features]), tmp_path / "seg.onnx")
    picture = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "image.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[4:20, 8:28] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    code = main(["explain", str(tmp_path / "image.png"), "--model", str(tmp_path / "seg.onnx"), "--input-size", "32",
                 "32", "--target", f"region:{tmp_path / 'mask.png'}:2", "--no-caption", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "out" / "explanations.json").read_text())["images"][0]
    from explainrt.models import PreprocessingOverrides, load

    explainer = Explainer(load(str(tmp_path / "seg.onnx"), overrides=PreprocessingOverrides(input_size=(32, 32))))
    expected = explainer.explain(str(tmp_path / "image.png"), targets=Region(2, mask / 255.0))
    assert record["target"]["index"] == 2
    np.testing.assert_allclose(record["target"]["score"], expected.logits[0, 0], rtol=1e-5)
    drawn = np.asarray(Image.open(tmp_path / "out" / record["overlay"]))
    assert (drawn[4, 8:28] == 255).all() and (drawn[4:20, 27] == 255).all()  # the region's outline, in white
    _server_takes_targets_as_json(explainer, picture, mask / 255.0)
    box = parse("box:1,2,30,40:3:0.4")
    assert (box.box.tolist(), box.index, box.iou) == ([1, 2, 30, 40], 3, 0.4)
    assert parse("class:281").index == 281  # type: ignore[attr-defined]
    with pytest.raises(InvalidTargetError, match="is not one of class:K"):
        parse("region:mask.png")
    with pytest.raises(InvalidTargetError, match="cannot read target"):
        parse(f"region:{tmp_path / 'missing.png'}:1")


def test_cli_box_target_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--target box:x1,y1,x2,y2:class:iou on an exported detector head: the objective the Explainer gives for
    that Box, and the box outline drawn in white on the overlay."""
    import json

    from PIL import Image

    from explainrt.cli import main
    from explainrt.export.torch_export import from_torch
    from explainrt.models import PreprocessingOverrides, load

    model = _TinyDetector("yolov8").eval()
    onnx.save(from_torch(model, torch.zeros(1, 3, 32, 32), [model.features]), tmp_path / "det.onnx")
    picture = np.random.default_rng(2).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "image.png")
    explainer = Explainer(load(str(tmp_path / "det.onnx"), overrides=PreprocessingOverrides(input_size=(32, 32))))
    batch, _ = explainer.prepare(str(tmp_path / "image.png"))
    with torch.no_grad():
        predictions = model(torch.from_numpy(batch))[0].numpy().T
    cx, cy, w, h = predictions[int(np.argmax(predictions[:, 5]))][:4]
    x1, y1, x2, y2 = (int(v) for v in np.clip(np.round([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]), 0, 32))
    code = main(["explain", str(tmp_path / "image.png"), "--model", str(tmp_path / "det.onnx"), "--input-size", "32",
                 "32", "--target", f"box:{x1},{y1},{x2},{y2}:1:0.3", "--no-caption", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "out" / "explanations.json").read_text())["images"][0]
    expected = explainer.explain(str(tmp_path / "image.png"), targets=Box([x1, y1, x2, y2], 1, iou=0.3))
    assert record["target"]["index"] == 1 and expected.logits[0, 0] > 0
    np.testing.assert_allclose(record["target"]["score"], expected.logits[0, 0], rtol=1e-5)
    drawn = np.asarray(Image.open(tmp_path / "out" / record["overlay"]))
    right, bottom = min(x2, 31), min(y2, 31)
    assert (drawn[y1, x1:right + 1] == 255).all() and (drawn[y1:bottom + 1, right] == 255).all()  # the box, in white


def _server_takes_targets_as_json(explainer: Explainer, picture: np.ndarray, mask: np.ndarray) -> None:
    """POST /v1/models/NAME:explain with a region target as JSON: the map the in-process call gives."""
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from explainrt.serve.app import create_app

    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    instances = [{"image": {"b64": base64.b64encode(buffer.getvalue()).decode("ascii")}}]
    target = {"kind": "region", "class": 2, "mask": mask.tolist()}
    with TestClient(create_app({"seg": explainer})) as client:
        response = client.post("/v1/models/seg:explain", json={"instances": instances, "parameters": {
            "method": "gradcam", "targets": target, "return": ["map"]}})
        assert response.status_code == 200, response.text
        refused = client.post("/v1/models/seg:explain", json={"instances": instances, "parameters": {
            "targets": "region:/etc/passwd:2"}})
        assert refused.status_code == 400 and "reads a file" in refused.text
    item = response.json()["explanations"][0]
    expected = explainer.explain(picture, targets=Region(2, mask))
    assert item["target"]["index"] == 2
    np.testing.assert_allclose(item["target"]["score"], expected.logits[0, 0], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(item["map"]), expected.maps[0], atol=1e-4)


def test_v2_takes_target_objects(embedder_explainer: Explainer) -> None:
    """POST /v2/models/NAME/infer with parameters.targets as in V1: region, box and similarity targets give
    the maps and objectives of the in-process call; bad targets are 400s naming the problem."""
    from fastapi.testclient import TestClient

    from explainrt.serve.app import create_app

    segmenter, detector = _TinySegmenter().eval(), _TinyDetector("yolov8").eval()
    explainers = {"seg": Explainer(segmenter, [segmenter.features], input_size=(32, 32)),
                  "det": Explainer(detector, [detector.features], input_size=(32, 32)), "emb": embedder_explainer}
    mask = np.zeros((32, 32), np.float32)
    mask[4:20, 8:28] = 1.0
    concept = np.random.default_rng(15).normal(size=16).astype(np.float32)
    small, large = _image((2, 3, 32, 32), seed=16), _image((2, 3, 64, 64), seed=17)
    with torch.no_grad():
        head = detector(torch.from_numpy(small[:1]))[0].numpy()
    box = _yolo_box(head, 1)
    cases = [("seg", small, {"kind": "region", "class": 2, "mask": mask.tolist()}, Region(2, mask)),
             ("det", small[:1], f"box:{','.join(map(str, box))}:1:0.4", Box(box, 1, iou=0.4)),
             ("emb", large, [{"kind": "similarity", "vector": concept.tolist()}, 3], [Similarity(concept), Class(3)])]

    def tensor(name: str, batch: np.ndarray) -> dict:
        return {"name": explainers[name].spec.image_input, "shape": list(batch.shape), "datatype": "FP32",
                "data": batch.ravel().tolist()}

    with TestClient(create_app(explainers)) as client:
        for name, batch, given, target in cases:
            response = client.post(f"/v2/models/{name}/infer", json={"inputs": [tensor(name, batch)], "parameters": {
                "method": "gradcam", "targets": given}})
            assert response.status_code == 200, response.text
            outputs = {output["name"]: output for output in response.json()["outputs"]}
            expected = explainers[name].explain(batch, method="gradcam", targets=target)
            np.testing.assert_allclose(np.reshape(outputs["explainrt.maps"]["data"], outputs["explainrt.maps"]["shape"]),
                                       expected.maps, atol=1e-5)
            np.testing.assert_allclose(outputs["explainrt.objective"]["data"], expected.logits[:, 0], rtol=1e-5)
            assert outputs["explainrt.resolved_targets"]["data"] == expected.targets.tolist()
            with torch.no_grad():  # the logits output stays the model's output, not the objective
                logits = explainers[name].predict(batch)
            np.testing.assert_allclose(np.reshape(outputs[explainers[name].spec.logits]["data"], logits.shape), logits,
                                       rtol=1e-4, atol=1e-5)
        refusals = [
            ({"kind": "region", "class": 2, "mask": np.ones((8, 8)).tolist()}, None, "mask has shape (8, 8)"),
            ({"kind": "hexagon"}, None, "unknown target kind 'hexagon'"),
            ("region:/etc/passwd:2", None, "reads a file"),
            (2, {"name": "explainrt.targets", "shape": [2], "datatype": "INT64", "data": [1, 2]}, "not both"),
            ({"kind": "class", "class": 1}, "layers", "differentiate class indices"),
        ]
        for given, extra, message in refusals:
            body: dict = {"inputs": [tensor("seg", small)], "parameters": {"method": "gradcam", "targets": given}}
            if extra == "layers":
                body["outputs"] = [{"name": "explainrt.gradients.0"}]
            elif extra is not None:
                body["inputs"].append(extra)
            refused = client.post("/v2/models/seg/infer", json=body)
            assert refused.status_code == 400 and message in refused.text, refused.text


# -- errors ------------------------------------------------------------------------------------------
class _GridHead(torch.nn.Module):
    """A YOLOv8-like raw head [N, 4 + 80, 21] for 32 x 32 images: fewer anchors (16 + 4 + 1 cells of its three
    grids) than fields, so the longer axis is not the anchors axis."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.features = torch.nn.Conv2d(3, 8, 3, stride=8, padding=1)  # [N, 8, 4, 4]
        self.head = torch.nn.Linear(8 * 16, 84 * 21)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fields = self.head(torch.relu(self.features(x)).flatten(1)).reshape(-1, 84, 21)
        return torch.cat([torch.sigmoid(fields[:, :4]) * 32, torch.sigmoid(fields[:, 4:])], 1)


def test_box_layout_is_told_from_the_shape_and_the_image_size() -> None:
    """An axis as long as YOLO's predictions for the image size is the anchors axis (even the shorter one); a
    shape both layouts read alike must be named; elsewhere the longer axis holds the anchors."""
    assert detector_layout((84, 8400), None, (640, 640)) == "yolov8"
    assert detector_layout((25200, 85), None, (640, 640)) == "yolov5"
    assert detector_layout((84, 21), None, (32, 32)) == "yolov8"
    assert detector_layout((63, 85), None, (32, 32)) == "yolov5"
    assert detector_layout((6, 64), None, (32, 32)) == "yolov8"  # no YOLO grid at this size: the longer axis
    for shape, size in [((84, 84), (64, 64)), ((50, 50), None), ((21, 63), (32, 32))]:
        with pytest.raises(InvalidTargetError, match="name it"):
            detector_layout(shape, None, size)
    assert detector_layout((84, 84), "yolov5", (64, 64)) == "yolov5"
    box = Box([1, 1, 20, 20], 0)
    assert box.bound((84, 21), (32, 32)).layout == "yolov8" and box.layout is None  # the user's Box unchanged
    model = _GridHead().eval()
    image = _image((1, 3, 32, 32), seed=5)
    with torch.no_grad():
        predictions = model(torch.from_numpy(image))[0].numpy().T  # [anchors, fields]
    cx, cy, w, h = predictions[0, :4]
    target = Box(np.clip([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 0, 32), 7, iou=0.5)
    explanation = Explainer(model, [model.features], input_size=(32, 32)).explain(image, targets=target)
    chosen = Box(target.box, 7, iou=0.5, layout="yolov8")._overlapping(predictions.T)
    assert chosen[0]
    np.testing.assert_allclose(explanation.logits[0, 0], predictions[chosen, 4 + 7].sum(), rtol=1e-5)


def test_target_errors(deeplab_explainer: Explainer, embedder_explainer: Explainer) -> None:
    image = _image((1, 3, SEG_SIZE, SEG_SIZE))
    with pytest.raises(InvalidTargetError, match=r"mask has shape \(32, 32\); the output's maps are \(64, 64\)"):
        deeplab_explainer.explain(image, targets=Region(1, np.ones((32, 32))))
    with pytest.raises(InvalidTargetError, match="class 6 is out of range for an output of 6 classes"):
        deeplab_explainer.explain(image, targets=Region(6, np.ones((SEG_SIZE, SEG_SIZE))))
    with pytest.raises(InvalidTargetError, match="Box needs a raw detector output"):
        deeplab_explainer.explain(image, targets=Box([1, 1, 5, 5], 0))
    with pytest.raises(InvalidTargetError, match="Softmax needs an output"):
        deeplab_explainer.explain(image, targets=Softmax(1))
    classifier = embedder_explainer
    small = _image((1, 3, 64, 64))
    with pytest.raises(InvalidTargetError, match="Region needs an output"):
        classifier.explain(small, targets=Region(1, np.ones((64, 64))))
    with pytest.raises(InvalidTargetError, match="class p 16 is out of range"):
        classifier.explain(small, targets=Difference(16, 0))
    with pytest.raises(InvalidTargetError, match="explains classes"):
        classifier.explain(small, method="contrast-cam", targets=Difference(1, 0))
    with pytest.raises(InvalidTargetError, match="one per image"):
        classifier.explain(small, targets=[Softmax(1), Softmax(2)])
    with pytest.raises(InvalidTargetError, match="x2 > x1"):
        Box([5, 5, 1, 1], 0)
    with pytest.raises(InvalidTargetError, match="layout must be one of"):
        Box([1, 1, 5, 5], 0, layout="detr")
    for make, match in [(lambda: Region(1, [[1, 2], [3]]), "Region mask must be an array of numbers"),
                        (lambda: Region(1, "mask.png"), "Region mask must be numbers"),
                        (lambda: Weights([[1], [1, 2]]), "Weights must be an array of numbers"),
                        (lambda: Similarity(["a", "b"]), "Similarity vector must be an array of numbers"),
                        (lambda: Box("1,2,3,4", 0), "Box xyxy must be numbers")]:
        with pytest.raises(InvalidTargetError, match=match):
            make()
    assert Box([1, 1, 5, 5], 0, iou=np.float32(0.5)).iou == 0.5


def test_target_maps_from_map_heads_equal_the_python_path(embedder_explainer: Explainer, deeplab_explainer: Explainer,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A closed-form CAM method with target objects runs its map head on the targets' objective, one call per
    objective kind (Softmax images and linear-target images: two, rows put back in order), and gives the Python
    path's maps, objectives and targets: Similarity, Difference and Softmax on an embedder, Region on a segmenter."""
    image = _image((2, 3, 64, 64), seed=21)
    concept = np.random.default_rng(22).normal(size=16).astype(np.float32)
    rows = [[Softmax(1), Softmax(4)], [Similarity(concept), Difference(2, 5)]]
    mask = np.zeros((SEG_SIZE, SEG_SIZE), np.float32)
    mask[8:40, 16:48] = 1.0
    picture = _image((1, 3, SEG_SIZE, SEG_SIZE), seed=23)
    for explainer, images, targets, calls_wanted in ((embedder_explainer, image, rows, 2),
                                                     (deeplab_explainer, picture, Region(3, mask), 1)):
        for method in ("gradcam", "gradcam++", "layercam", "counterfactual-cam"):
            monkeypatch.setattr(explainer, "map_heads", False)
            python = explainer.explain(images, method=method, targets=targets)
            monkeypatch.setattr(explainer, "map_heads", True)
            calls = _Calls(explainer, monkeypatch)
            heads = explainer.explain(images, method=method, targets=targets)
            monkeypatch.undo()
            assert calls.names == ["maps"] * calls_wanted, method
            np.testing.assert_allclose(heads.maps, python.maps, atol=1e-5, err_msg=method)
            np.testing.assert_allclose(heads.logits, python.logits, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(heads.targets, python.targets)
            assert "method" not in heads.timings and "method" in python.timings
        # one maps-only model (one copy of the weights) per objective kind, holding the four methods' heads
        variants = explainer.session._objective_variants
        assert len(variants) == calls_wanted and all(methods == ("gradcam", "gradcam++", "layercam", "counterfactual-cam")
                                                     for methods, _ in variants.values())
