"""Map heads: CAM maps computed inside the ONNX graph, against the Python path and pytorch-grad-cam."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import SMALL_SIZE

from explainrt import Explainer, from_torch, kernels
from explainrt.errors import InvalidInputError, InvalidModelError
from explainrt.export import make_explainable
from explainrt.export.heads import add_map_heads, extreme_rows, grouped_rows, head_only_model, without_maps
from explainrt.export.spec import ExplainableSpec, original_model
from explainrt.kernels.cam_weights import CLOSED_FORMS

LOGIT_METHODS = [name for name, form in CLOSED_FORMS.items() if form.objective == "logit"]


@pytest.fixture(scope="module")
def two_layer_onnx(small_resnet):  # noqa: ANN001, ANN201
    """The small ResNet-18 explained at layer3 and layer4 (maps averaged over two layers)."""
    return from_torch(small_resnet, torch.zeros(1, 3, *SMALL_SIZE), [small_resnet.layer3, small_resnet.layer4])


def _run(model: onnx.ModelProto, images: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of ``model`` from plain ONNX Runtime (no explainrt code at run time)."""
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {session.get_inputs()[0].name: images, "explainrt.targets": targets})))


def test_heads_equal_python_path(two_layer_onnx, small_batch) -> None:  # noqa: ANN001
    """Every closed-form method, two targets per image, two target layers: head == Python path within 1e-5."""
    model = add_map_heads(copy.deepcopy(two_layer_onnx), LOGIT_METHODS)
    targets = np.array([[-1, 3], [2, -2], [-3, 0]], dtype=np.int64)
    outputs = _run(model, small_batch, targets)
    python = Explainer(two_layer_onnx, map_heads=False)
    for method in LOGIT_METHODS:
        maps = outputs[f"explainrt.maps.{method}"]
        assert maps.shape == (3, 2, *SMALL_SIZE) and maps.dtype == np.float32
        for k in range(2):
            expected = python.explain(small_batch, method=method, targets=targets[:, k])
            np.testing.assert_allclose(maps[:, k], expected.maps, atol=1e-5, err_msg=method)
            np.testing.assert_array_equal(outputs["explainrt.resolved_targets"][:, k], expected.targets)


def test_explainer_uses_heads(two_layer_onnx, small_batch) -> None:  # noqa: ANN001
    """The Explainer's head path (each method's head alone, run after the model) equals its Python path, Contrast-CAM included."""
    heads, python = Explainer(two_layer_onnx), Explainer(two_layer_onnx, map_heads=False)
    for method in CLOSED_FORMS:
        got, expected = heads.explain(small_batch, method=method), python.explain(small_batch, method=method)
        np.testing.assert_allclose(got.maps, expected.maps, atol=1e-5, err_msg=method)
        np.testing.assert_array_equal(got.targets, expected.targets)
        assert "method" not in got.timings and "method" in expected.timings  # the head ran, not the Python tail
    got = heads.explain(small_batch, method="contrast-cam", top_k=2)
    expected = python.explain(small_batch, method="contrast-cam", top_k=2)
    np.testing.assert_allclose(got.extras["contrast_maps"], expected.extras["contrast_maps"], atol=1e-5)
    np.testing.assert_array_equal(got.extras["contrast_classes"], expected.extras["contrast_classes"])
    raw_heads = heads.explain(small_batch, method="gradcam", normalize=False)  # raw maps: the Python path
    np.testing.assert_allclose(raw_heads.maps, python.explain(small_batch, method="gradcam", normalize=False).maps)
    assert "method" in raw_heads.timings


def _calls(explainer: Explainer) -> list[list[str]]:
    """Records the outputs of every ONNX Runtime call ``explainer``'s session makes (the calls still run)."""
    session, calls = explainer.session, []
    run_once = session._run_once

    def counted(runtime: object, outputs: list[str], feeds: dict) -> list:
        calls.append(list(outputs))
        return run_once(runtime, outputs, feeds)

    session._run_once = counted
    return calls


def test_heads_join_the_models_own_call(two_layer_onnx, small_batch) -> None:  # noqa: ANN001
    """An Explainer on a model without heads puts Grad-CAM's head (by default; or the methods named by
    ``map_heads``) into its session's model: those maps come from ONE runtime call and equal the Python
    path's; other closed-form methods run their head alone after the model; the model the session
    reports stays as given (no heads)."""
    python = Explainer(two_layer_onnx, map_heads=False)
    default = Explainer(two_layer_onnx)
    assert default.session.main_maps == ("gradcam",) and not ExplainableSpec.from_model(default.session.model).maps
    assert python.session.main_maps == ()
    chosen = Explainer(two_layer_onnx, map_heads="GradCAM++, layercam")
    assert chosen.session.main_maps == ("gradcam++", "layercam")
    made = {id(default): _calls(default), id(chosen): _calls(chosen)}
    for explainer, method, calls in ((default, "gradcam", 1), (default, "layercam", 2), (chosen, "gradcam++", 1),
                                     (chosen, "layercam", 1), (chosen, "gradcam", 2)):
        made[id(explainer)].clear()
        got = explainer.explain(small_batch, method=method, targets=[1, -1, 4])
        assert len(made[id(explainer)]) == calls, (method, made[id(explainer)])
        assert f"explainrt.maps.{method}" in made[id(explainer)][-1]
        expected = python.explain(small_batch, method=method, targets=[1, -1, 4])
        np.testing.assert_allclose(got.maps, expected.maps, atol=1e-5, err_msg=method)
        np.testing.assert_array_equal(got.targets, expected.targets)
    with pytest.raises(InvalidInputError, match="'eigencam' has no map head"):
        Explainer(two_layer_onnx, map_heads=["eigencam"])
    with pytest.raises(InvalidInputError, match="map_heads must be True, False or method names"):
        Explainer(two_layer_onnx, map_heads=3)


def test_heads_the_model_cannot_take_stay_out_of_its_call(small_onnx, small_batch) -> None:  # noqa: ANN001
    """A maps-only model, one with float16 heads, or a head of another objective (Contrast-CAM on a logit
    model) gets no head added: those maps come from the model's own heads or the head alone, as before."""
    maps_only = add_map_heads(copy.deepcopy(small_onnx), ["layercam"], maps_only=True)
    assert Explainer(maps_only).session.main_maps == ("layercam",)
    half = add_map_heads(copy.deepcopy(small_onnx), ["layercam"], maps_dtype="float16")
    assert Explainer(half).session.main_maps == ()
    contrast = Explainer(small_onnx, map_heads=["gradcam", "contrast-cam"])
    assert contrast.session.main_maps == ("gradcam",)
    expected = Explainer(small_onnx, map_heads=False).explain(small_batch, method="contrast-cam")
    np.testing.assert_allclose(contrast.explain(small_batch, method="contrast-cam").maps, expected.maps, atol=1e-5)


def test_head_alone_holds_no_model_weights_and_equals_the_head_in_the_graph(two_layer_onnx, small_batch) -> None:  # noqa: ANN001
    """An Explainer runs a head the model lacks as a model of its own after the explainable model: it
    reads the image, activations and gradients, holds none of the model's weights (one whole copy of
    the model per method would cost the model's memory again for every method; only the resize's
    interpolation matrices), and gives the maps
    the head appended to the graph gives."""
    targets = np.array([[-1], [2], [0]], dtype=np.int64)
    outputs = _run(two_layer_onnx, small_batch, targets)
    inside = _run(add_map_heads(copy.deepcopy(two_layer_onnx), ["gradcam++"]), small_batch, targets)
    head = head_only_model(two_layer_onnx, "gradcam++")
    assert [i.name for i in head.graph.input] == ["input", *(f"explainrt.{kind}.{k}" for k in range(2)
                                                             for kind in ("activations", "gradients"))]
    grids = [outputs[f"explainrt.activations.{k}"].shape[2:] for k in range(2)]
    height, width = small_batch.shape[2:]
    resize_matrices = sum(height * h + w * width for h, w in grids)  # [H, h] and [w, W] per layer
    assert sum(int(np.prod(t.dims)) for t in head.graph.initializer) < 32 + resize_matrices
    session = onnxruntime.InferenceSession(head.SerializeToString(), providers=["CPUExecutionProvider"])
    maps = session.run(None, {i.name: outputs[i.name] if i.name in outputs else small_batch for i in session.get_inputs()})[0]
    np.testing.assert_allclose(maps, inside["explainrt.maps.gradcam++"], atol=1e-6)


def grad_cam_reference(model: torch.nn.Module, layers: list, method: str, images: np.ndarray,
                        classes: np.ndarray, contrasts: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's maps; Counterfactual-CAM is Grad-CAM of -logit, Contrast-CAM Grad-CAM of CE(y, Q)."""
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cams = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM,
            "hirescam": pgc.HiResCAM, "layercam": pgc.LayerCAM, "counterfactual-cam": pgc.GradCAM,
            "contrast-cam": pgc.GradCAM}
    if method == "counterfactual-cam":
        targets = [lambda out, c=int(c): -out[c] for c in classes]
    elif method == "contrast-cam":
        targets = [lambda out, q=int(q): torch.nn.functional.cross_entropy(out[None], torch.tensor([q]))
                   for q in contrasts]
    else:
        targets = [ClassifierOutputTarget(int(c)) for c in classes]
    with cams[method](model=model, target_layers=layers) as cam:
        return cam(input_tensor=torch.from_numpy(images), targets=targets)


def test_heads_equal_pytorch_grad_cam(small_resnet, small_batch) -> None:  # noqa: ANN001
    """A torchvision ResNet-18 exported with map heads, run by onnxruntime.InferenceSession, matches pytorch-grad-cam."""
    layers = [small_resnet.layer3, small_resnet.layer4]
    explainable = from_torch(small_resnet, torch.zeros(1, 3, *SMALL_SIZE), layers)
    classes = np.array([3, 7, 1], dtype=np.int64)
    logit_model = add_map_heads(copy.deepcopy(explainable), LOGIT_METHODS, maps_only=True)
    outputs = _run(logit_model, small_batch, classes[:, None])
    assert {o.name for o in logit_model.graph.output} == {
        "logits", "explainrt.resolved_targets", *(f"explainrt.maps.{m}" for m in LOGIT_METHODS)}
    contrasts = np.array([5, 0, 9], dtype=np.int64)
    spec = ExplainableSpec.from_model(explainable)
    loss_model = make_explainable(original_model(explainable), list(spec.target_layers), objective="cross_entropy",
                                  maps=["contrast-cam"])
    outputs.update(_run(loss_model, small_batch, contrasts[:, None]))
    for method in CLOSED_FORMS:
        expected = grad_cam_reference(small_resnet, layers, method, small_batch, classes, contrasts)
        np.testing.assert_allclose(outputs[f"explainrt.maps.{method}"][:, 0], expected, atol=1e-3, err_msg=method)


def test_dtypes_and_maps_only(small_onnx, small_batch) -> None:  # noqa: ANN001
    """float16 and uint8 (round(255 * map)) outputs; maps_only drops activations and gradients."""
    targets = np.full((3, 1), -1, dtype=np.int64)
    full = _run(add_map_heads(copy.deepcopy(small_onnx), ["gradcam"]), small_batch, targets)
    assert {"explainrt.activations.0", "explainrt.gradients.0"} <= set(full)
    reference = full["explainrt.maps.gradcam"]
    half = add_map_heads(copy.deepcopy(small_onnx), "gradcam,layercam", maps_only=True, maps_dtype="float16")
    as_half = _run(half, small_batch, targets)
    assert set(as_half) == {"logits", "explainrt.resolved_targets", "explainrt.maps.gradcam", "explainrt.maps.layercam"}
    assert as_half["explainrt.maps.gradcam"].dtype == np.float16
    np.testing.assert_allclose(as_half["explainrt.maps.gradcam"], reference, atol=1e-3)
    as_bytes = _run(add_map_heads(copy.deepcopy(small_onnx), ["gradcam"], maps_dtype="uint8"), small_batch, targets)
    assert as_bytes["explainrt.maps.gradcam"].dtype == np.uint8
    np.testing.assert_array_equal(as_bytes["explainrt.maps.gradcam"], np.round(reference * 255).astype(np.uint8))
    stored = ExplainableSpec.from_model(half)
    assert (stored.maps, stored.maps_dtype, stored.maps_only) == (("gradcam", "layercam"), "float16", True)
    # a maps-only model still explains with every method: the session rebuilds activations and gradients
    explainer = Explainer(half)
    got = explainer.explain(small_batch, method="gradcam++")
    expected = Explainer(small_onnx, map_heads=False).explain(small_batch, method="gradcam++")
    np.testing.assert_allclose(got.maps, expected.maps, atol=1e-5)
    stripped = without_maps(add_map_heads(copy.deepcopy(small_onnx), ["gradcam"]))
    assert not any(o.name.startswith("explainrt.maps.") for o in stripped.graph.output)


def test_bad_map_options(small_onnx) -> None:  # noqa: ANN001
    """Unknown methods, methods with no closed form, a wrong objective and bad flags get clear errors."""
    with pytest.raises(InvalidInputError, match="no map head for 'nosuch'.*gradcam"):
        add_map_heads(copy.deepcopy(small_onnx), ["nosuch"])
    with pytest.raises(InvalidInputError, match="'eigencam' has no map head.*no SVD operator"):
        add_map_heads(copy.deepcopy(small_onnx), ["eigencam"])
    with pytest.raises(InvalidInputError, match="'scorecam' has no map head"):
        add_map_heads(copy.deepcopy(small_onnx), "gradcam,scorecam")
    with pytest.raises(InvalidInputError, match="objective 'cross_entropy'.*differentiates 'logit'"):
        add_map_heads(copy.deepcopy(small_onnx), ["contrast-cam"])
    with pytest.raises(InvalidInputError, match="maps_dtype must be one of float32, float16, uint8"):
        add_map_heads(copy.deepcopy(small_onnx), ["gradcam"], maps_dtype="int8")
    for maps in (5, ["gradcam", 5]):
        with pytest.raises(InvalidInputError, match="maps must be method names"):
            add_map_heads(copy.deepcopy(small_onnx), maps)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="map methods repeat"):
        add_map_heads(copy.deepcopy(small_onnx), ["gradcam", "GradCAM"])
    with pytest.raises(InvalidInputError, match="already has map heads for \\['gradcam'\\]"):
        add_map_heads(add_map_heads(copy.deepcopy(small_onnx), ["gradcam"]), ["gradcam"])
    maps_only = add_map_heads(copy.deepcopy(small_onnx), ["gradcam"], maps_only=True)
    with pytest.raises(InvalidModelError, match="exported maps-only"):
        add_map_heads(maps_only, ["layercam"])
    with pytest.raises(InvalidInputError, match="maps_only=True needs maps"):
        make_explainable(original_model(small_onnx), maps_only=True)
    # a target objects' objective takes a logit method's head only where the runtime asks for it (TargetSession)
    weighted = make_explainable(original_model(small_onnx), objective="weights")
    with pytest.raises(InvalidInputError, match="objective 'logit'.*differentiates 'weights'"):
        add_map_heads(copy.deepcopy(weighted), ["gradcam"])
    assert "gradcam" in ExplainableSpec.from_model(add_map_heads(weighted, ["gradcam"], target_objective=True)).maps


@pytest.mark.parametrize(("n_in", "n_out"), [(7, 224), (7, 7), (14, 224), (5, 37), (13, 6), (1, 9)])
def test_resize_matrices_equal_onnx_resize_and_the_python_path(n_in: int, n_out: int) -> None:
    """The static-size head resizes with two MatMuls: equal (1e-6) to ONNX Resize (linear, half_pixel)
    in ONNX Runtime, the op the head used before, and to the Python path's resize."""
    from onnx import TensorProto, helper

    from explainrt import kernels

    maps = np.random.default_rng(n_in * 100 + n_out).random((2, 3, n_in, n_in + 1), dtype=np.float32)
    out_hw = (n_out, n_out + 2)
    sizes = helper.make_tensor("sizes", TensorProto.INT64, [4], [2, 3, *out_hw])
    graph = helper.make_graph([helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear",
                                                coordinate_transformation_mode="half_pixel")], "resize",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(maps.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [sizes])
    resize = onnxruntime.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
                                          .SerializeToString(), providers=["CPUExecutionProvider"])
    expected = resize.run(None, {"x": maps})[0]
    got = kernels.resize_matrix(n_in, out_hw[0]) @ maps @ kernels.resize_matrix(n_in + 1, out_hw[1]).T
    np.testing.assert_allclose(got, expected, atol=1e-6)
    python_path = kernels.resize_bilinear(maps.reshape(-1, *maps.shape[2:]), out_hw).reshape(got.shape)
    np.testing.assert_allclose(got, python_path, atol=1e-6)


def test_static_head_resizes_without_shape_arithmetic_dynamic_sizes_keep_resize(small_resnet, small_batch) -> None:  # noqa: ANN001
    """At a fixed image size the head reads no shapes at run time (MatMuls with constant matrices); a model
    of dynamic height and width keeps the Resize to the image's run-time size, and both give the same maps
    (the Python path's: the other tests)."""
    static = from_torch(small_resnet, torch.zeros(1, 3, *SMALL_SIZE), [small_resnet.layer4], maps="gradcam")
    head_ops = [n.op_type for n in static.graph.node if n.name.startswith("explainrt/maps/")]
    # the channel sum, the resize's two MatMuls and the two of its extreme rows and columns (the final
    # normalisation is done on the small map); the pooled layer's gradient is read before its copy: no mean of it
    assert "Resize" not in head_ops and "Shape" not in head_ops and head_ops.count("MatMul") == 5
    assert "ReduceMean" not in head_ops
    dynamic = copy.deepcopy(original_model(static))
    for dim in dynamic.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "size"
    for value in [*dynamic.graph.value_info, *dynamic.graph.output[1:]]:
        value.type.tensor_type.ClearField("shape")
    dynamic = make_explainable(dynamic, [ExplainableSpec.from_model(static).target_layers[0]], maps="gradcam")
    assert "Resize" in [n.op_type for n in dynamic.graph.node if n.name.startswith("explainrt/maps/")]
    targets = np.array([[-1], [3], [0]], dtype=np.int64)
    np.testing.assert_allclose(_run(dynamic, small_batch, targets)["explainrt.maps.gradcam"],
                               _run(static, small_batch, targets)["explainrt.maps.gradcam"], atol=1e-6)


@pytest.mark.parametrize("n_in, n_out", [(7, 224), (14, 224), (1, 32), (5, 5), (9, 4), (20, 7), (2, 640)])
def test_a_resize_is_extreme_at_its_extreme_rows(n_in: int, n_out: int) -> None:
    """The head normalises a resized map from its values at ``extreme_rows`` x ``extreme_rows`` alone: their min
    and max are the whole resized map's, for any map, upsampling and downsampling alike."""
    rows, columns = kernels.resize_matrix(n_in, n_out), kernels.resize_matrix(n_in + 1, n_out + 3)
    keep_rows, keep_columns = extreme_rows(rows), extreme_rows(columns)
    assert keep_rows is not None and keep_columns is not None
    assert len(keep_rows) <= 2 * n_in + 2 and len(keep_columns) <= 2 * (n_in + 1) + 2  # a few per input
    maps = np.random.default_rng(n_in * 1000 + n_out).standard_normal((50, n_in, n_in + 1))
    full = rows @ maps @ columns.T
    extremes = rows[keep_rows] @ maps @ columns[keep_columns].T
    np.testing.assert_allclose(extremes.min(axis=(1, 2)), full.min(axis=(1, 2)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(extremes.max(axis=(1, 2)), full.max(axis=(1, 2)), rtol=1e-12, atol=1e-12)
    # a table that mixes three inputs in a row, or weights that do not sum to 1, has no such rows
    assert extreme_rows(np.full((4, 3), 1 / 3)) is None and extreme_rows(2 * rows) is None


def test_maps_only_model_drops_the_gradient_copy_and_ranks_only_what_targets_ask(small_resnet, small_batch) -> None:  # noqa: ANN001
    """What the Explainer's session runs for in-call heads: the maps-only copy has no activation or gradient
    outputs and no Expand of the pooled layer's gradient; ranking only max(-targets) classes resolves the
    same targets (ties included: the first index wins either way); its maps equal the full model's."""
    from explainrt.export.explainable import shallow_target_ranking
    from explainrt.export.heads import keep_maps_only

    full = from_torch(small_resnet, torch.zeros(1, 3, *SMALL_SIZE), [small_resnet.layer4], maps="gradcam")
    lean = shallow_target_ranking(keep_maps_only(copy.deepcopy(full), ["gradcam"]))
    assert [o.name for o in lean.graph.output if o.name.startswith("explainrt.")] == [
        "explainrt.resolved_targets", "explainrt.maps.gradcam"]
    assert not any(n.op_type == "Expand" for n in lean.graph.node if n.name.startswith("explainrt/"))
    assert ExplainableSpec.from_model(lean).maps_only
    for targets in (np.array([[-1], [3], [0]]), np.array([[-2, -1], [-5, 1], [2, -10]])):
        want, got = _run(full, small_batch, targets), _run(lean, small_batch, targets)
        np.testing.assert_array_equal(got["explainrt.resolved_targets"], want["explainrt.resolved_targets"])
        np.testing.assert_allclose(got["explainrt.maps.gradcam"], want["explainrt.maps.gradcam"], atol=1e-6)
    ranked = np.argsort(-_run(full, small_batch, np.array([[-1]] * 3))[full.graph.output[0].name], axis=1, kind="stable")
    np.testing.assert_array_equal(_run(lean, small_batch, np.array([[-4]] * 3))["explainrt.resolved_targets"][:, 0],
                                  ranked[:, 3])
    with pytest.raises(InvalidInputError, match="maps-only needs some of them"):
        keep_maps_only(copy.deepcopy(full), ["gradcam++"])


def test_heads_added_to_an_explainable_model_skip_the_pooled_gradient_too(small_resnet, small_batch) -> None:  # noqa: ANN001
    """What an Explainer's session runs: heads added to a model already made explainable, whose reverse pass reads
    forward shapes from the image (``shapes_from_the_image``). Its Grad-CAM head still reads the pooling's one value
    per channel (no Expand to the layer's positions, no Shape of a forward tensor), with the maps of a head made
    at export, for three images."""
    from explainrt.runtime.base import maps_session_model

    explainable = from_torch(small_resnet, torch.zeros(1, 3, *SMALL_SIZE), [small_resnet.layer4])
    at_export = from_torch(small_resnet, torch.zeros(1, 3, *SMALL_SIZE), [small_resnet.layer4], maps="gradcam")
    session_model = maps_session_model(explainable, ["gradcam"], ["gradcam"])
    added = [n for n in session_model.graph.node if n.name.startswith("explainrt/")]
    forward = {o for n in session_model.graph.node if not n.name.startswith("explainrt/") for o in n.output}
    assert not [n.name for n in added if n.op_type == "Expand"]
    assert not [n.name for n in added if n.op_type == "Shape" and n.input[0] in forward]
    # the gradient's size reads no batch: the seed count joined to [-1, C, 1, 1], the batch inferred by its Reshape
    assert [n.input[0] for n in added if n.op_type == "Shape"] == ["explainrt/grad/seed/Gather"]
    for model in (explainable, session_model):  # nothing built and left unread (the pass runs last at export)
        read = {name for n in model.graph.node for name in n.input} | {o.name for o in model.graph.output}
        assert not [n.name for n in model.graph.node if n.name.startswith("explainrt/")
                    and not any(o in read for o in n.output)]
    targets = np.array([[-1], [3], [-2]])
    want, got = _run(at_export, small_batch, targets), _run(session_model, small_batch, targets)
    np.testing.assert_array_equal(got["explainrt.resolved_targets"], want["explainrt.resolved_targets"])
    np.testing.assert_allclose(got["explainrt.maps.gradcam"], want["explainrt.maps.gradcam"], atol=1e-6)


@pytest.mark.parametrize("n_in, n_out", [(16, 64), (20, 640), (80, 640), (17, 34), (16, 16), (3, 96)])
def test_grouped_rows_equal_the_table(n_in: int, n_out: int) -> None:
    """An integer upscale's table as groups of output rows reading three input rows each: the same products as the
    whole table (float32), for any map; a downscale or a non-integer factor has no such form."""
    table = kernels.resize_matrix(n_in, n_out)
    grouped = grouped_rows(table)
    assert grouped is not None
    sources, weights = grouped
    assert sources.shape == (n_in, 3) and weights.shape == (n_in, n_out // n_in, 3)
    maps = np.random.default_rng(n_in + n_out).standard_normal((2, 3, n_in, 5)).astype(np.float32)
    by_groups = (weights @ maps[:, :, sources]).reshape(2, 3, n_out, 5)
    np.testing.assert_allclose(by_groups, table.astype(np.float32) @ maps, rtol=1e-6, atol=1e-6)
    assert grouped_rows(kernels.resize_matrix(20, 50)) is None and grouped_rows(kernels.resize_matrix(64, 16)) is None


class _FineGrid(torch.nn.Module):
    """A 32x24 target layer of a 64x48 image: its head resizes by groups of rows (``grouped_rows``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.layer = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, stride=2, padding=1), torch.nn.ReLU())
        self.fc = torch.nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer(x).mean((2, 3)))


def test_head_resizing_by_groups_of_rows_equals_python_path_and_pytorch_grad_cam() -> None:
    """Grad-CAM's head on a fine grid (32 rows, upscaled 2x) gathers three rows per group instead of the dense
    table: maps equal the Python path's and pytorch-grad-cam's."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    module = _FineGrid().eval()
    images = np.random.default_rng(6).standard_normal((2, 3, 64, 48)).astype(np.float32)
    model = from_torch(module, torch.zeros(1, 3, 64, 48), [module.layer], maps="gradcam")
    head = [n.op_type for n in model.graph.node if n.name.startswith("explainrt/maps/")]
    assert "Gather" in head and head.count("MatMul") == 5  # the channel sum, 2 for the extremes, 2 for the resize
    targets = np.array([[-1], [2]], dtype=np.int64)
    maps = _run(model, images, targets)["explainrt.maps.gradcam"][:, 0]
    expected = Explainer(without_maps(copy.deepcopy(model)), map_heads=False).explain(images, targets=targets[:, 0])
    np.testing.assert_allclose(maps, expected.maps, atol=1e-5)
    with GradCAM(model=module, target_layers=[module.layer]) as cam:
        reference = cam(input_tensor=torch.from_numpy(images),
                        targets=[ClassifierOutputTarget(int(t)) for t in expected.targets])
    np.testing.assert_allclose(maps, reference, atol=1e-5)
    assert (maps.max(axis=(1, 2)) > 0.99).all() and (maps.std(axis=(1, 2)) > 0.05).all()


class _ConvReaders(torch.nn.Module):
    """A layer read by a stride-1 Conv, a strided dilated Conv, a 1x1 Conv, a stride-3 Conv whose windows leave
    the last row and column out, a 1x1 Conv padded wider than its kernel reaches, a grouped Conv (the last),
    a Tanh and a global average pool."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.layer = torch.nn.ReLU()
        self.readers = torch.nn.ModuleList([
            torch.nn.Conv2d(8, 6, 3, padding=1), torch.nn.Conv2d(8, 6, 3, stride=2, padding=2, dilation=2),
            torch.nn.Conv2d(8, 4, 1), torch.nn.Conv2d(8, 4, 2, stride=3), torch.nn.Conv2d(8, 4, 1, padding=2),
            torch.nn.Conv2d(8, 8, 3, padding=1, groups=2)])
        self.fc = torch.nn.Linear(6 + 6 + 4 + 4 + 4 + 8 + 8 + 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer(self.stem(x))
        read = [reader(layer).relu() for reader in self.readers] + [layer.tanh(), layer]
        return self.fc(torch.cat([r.mean((2, 3)) for r in read], 1))


def test_gradcam_head_takes_the_mean_gradient_of_conv_readers_from_their_output_gradients(small_batch) -> None:  # noqa: ANN001
    """Grad-CAM needs only the layer gradient's mean over the positions; for the terms of its Conv readers
    (one group) the maps-only head computes it from the readers' output gradients (window sums times the
    weight) instead of their input-gradient Conv / ConvTranspose, which then leave the graph; the grouped
    Conv's and the Tanh's terms are averaged as they are. Maps equal the Python path (full gradients) and
    pytorch-grad-cam at strides 1, 2 and 3, dilation 2, 1x1 (also padded past its reach) and an odd image
    size."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from explainrt.export.heads import keep_maps_only

    module = _ConvReaders().eval()
    images = np.random.default_rng(4).standard_normal((3, 3, 21, 18)).astype(np.float32)
    model = from_torch(module, torch.zeros(1, 3, 21, 18), [module.layer])
    lean = keep_maps_only(add_map_heads(copy.deepcopy(model), ["gradcam"]), ["gradcam"])
    (layer,) = ExplainableSpec.from_model(model).target_layers
    readers = {n.name: n for n in model.graph.node if n.op_type == "Conv" and n.input[0] == layer}
    grouped = {name for name, n in readers.items() if any(a.name == "group" and a.i == 2 for a in n.attribute)}
    assert len(readers) == 6 and len(grouped) == 1

    def gradient_convolutions(graph: onnx.ModelProto) -> set[str]:
        """The readers whose input gradient a Conv / ConvTranspose of the gradient graph computes."""
        return {n.name.split("/")[2] for n in graph.graph.node
                if n.name.startswith("explainrt/grad/") and n.op_type in ("Conv", "ConvTranspose")} & set(readers)

    assert gradient_convolutions(model) == set(readers)
    assert gradient_convolutions(lean) == grouped
    targets = np.array([[-1, 2], [0, -2], [4, 1]], dtype=np.int64)
    maps = _run(lean, images, targets)["explainrt.maps.gradcam"]
    python = Explainer(model, map_heads=False)
    for k in range(2):
        expected = python.explain(images, targets=targets[:, k])
        np.testing.assert_allclose(maps[:, k], expected.maps, atol=1e-5)
        with GradCAM(model=module, target_layers=[module.layer]) as cam:
            reference = cam(input_tensor=torch.from_numpy(images),
                            targets=[ClassifierOutputTarget(int(t)) for t in expected.targets])
        np.testing.assert_allclose(maps[:, k], reference, atol=1e-5)
        assert (maps[:, k].max(axis=(1, 2)) > 0.99).all() and (maps[:, k].std(axis=(1, 2)) > 0.05).all()
