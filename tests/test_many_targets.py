"""K targets per image through the front-ends: the CLI (``--target`` repeated), the HTTP server (V1 and V2
``parameters.targets`` as one list per instance, V2's ``explainrt.targets`` tensor [N, K]) and the Ray
batch job's workers. Each of the K maps must equal the one-target call's map; bad inputs are explainrt
errors (CLI exit status 2, HTTP 400). Small random-weight models with fixed seeds (tests/test_targets.py)."""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from explainrt import Explainer, Explanation
from explainrt.errors import InvalidInputError, InvalidTargetError
from explainrt.models import PreprocessingOverrides, load
from explainrt.targets import Box, Class, Region
from tests.test_targets import _image, _TinyDetector, _TinySegmenter, assert_equal_to_one_target_calls

SIZE = 32


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """seg.onnx (the tiny segmenter, explainable), two images and a mask image."""
    from explainrt.export.torch_export import from_torch

    folder = tmp_path_factory.mktemp("many")
    model = _TinySegmenter().eval()
    onnx.save(from_torch(model, torch.zeros(1, 3, SIZE, SIZE), [model.features]), folder / "seg.onnx")
    rng = np.random.default_rng(0)
    for name in ("one", "two"):
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[4:20, 8:28] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return folder


@pytest.fixture(scope="module")
def seg(files: Path) -> Explainer:
    return Explainer(load(str(files / "seg.onnx"), overrides=PreprocessingOverrides(input_size=(SIZE, SIZE))))


def _mask(files: Path) -> np.ndarray:
    return np.asarray(Image.open(files / "mask.png"), dtype=np.float32) / 255.0


def test_cli_repeated_target_writes_one_map_per_target(files: Path, seg: Explainer, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from explainrt.cli import main

    images = [str(files / "one.png"), str(files / "two.png")]
    given = [f"region:{files / 'mask.png'}:2", "class:1", "3"]
    code = main(["explain", *images, "--model", str(files / "seg.onnx"), "--input-size", "32", "32",
                 *[f"--target={text}" for text in given], "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    records = json.loads((tmp_path / "out" / "explanations.json").read_text())["images"]
    singles = [seg.explain(images, targets=target) for target in (Region(2, _mask(files)), Class(1), Class(3))]
    names = ["region-mask-2", "class-1", "3"]
    for index, (record, stem) in enumerate(zip(records, ("one", "two"), strict=True)):
        assert [part["target"] for part in record["targets"]] == given and "overlay" not in record
        for k, part in enumerate(record["targets"]):
            assert (part["overlay"], part["map"]) == (f"{stem}.gradcam.{names[k]}.png", f"{stem}.gradcam.{names[k]}.npy")
            assert part["index"] == [2, 1, 3][k]
            logits = singles[k].logits[index]  # a Class alone takes the class-index path: the output's class sum
            np.testing.assert_allclose(part["score"], logits[0] if k == 0 else logits[part["index"]].sum(), rtol=1e-5)
            np.testing.assert_allclose(np.load(tmp_path / "out" / part["map"]), singles[k].maps[index], atol=1e-5)
    drawn = np.asarray(Image.open(tmp_path / "out" / "one.gradcam.region-mask-2.png"))
    assert (drawn[4, 8:28] == 255).all()  # the region's outline on its own overlay
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["explanations.json"] + [f"{s}.gradcam.{n}.{e}" for s in ("one", "two") for n in names for e in ("png", "npy")])
    # class indices alone: probabilities, the class-index path; a rerun with one target replaces the set
    code = main(["explain", images[0], "--model", str(files / "seg.onnx"), "--input-size", "32", "32",
                 "--target", "1", "--target", "-1", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "out" / "explanations.json").read_text())["images"][0]
    expected = seg.explain(images[:1], targets=[[1, -1]])
    assert [part["index"] for part in record["targets"]] == expected.targets[0].tolist()
    for k, part in enumerate(record["targets"]):
        np.testing.assert_allclose(np.load(tmp_path / "out" / part["map"]), expected.maps[0, k], atol=1e-5)
        scores = expected.class_scores[0].astype(np.float64)  # the output [N, 4, H, W] summed per class
        probability = np.exp(scores - scores.max())[part["index"]] / np.exp(scores - scores.max()).sum()
        np.testing.assert_allclose(part["probability"], probability, rtol=1e-5)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "explanations.json", "one.gradcam.1.npy", "one.gradcam.1.png", "one.gradcam.top1.npy", "one.gradcam.top1.png"]


@pytest.mark.parametrize(("targets", "message"), [
    (["1", "1"], "'1' is given more than once"),
    (["1", "box:1,1,5,5:0"], "Box needs a raw detector output"),
    (["1", "class:9"], "class 9 is out of range"),
])
def test_cli_refuses_bad_target_lists(files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      targets: list[str], message: str) -> None:
    from explainrt.cli import main

    code = main(["explain", str(files / "one.png"), "--model", str(files / "seg.onnx"), "--input-size", "32", "32",
                 *[f"--target={text}" for text in targets], "--out", str(tmp_path / "out")])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _png_b64(picture: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_server_takes_a_list_of_targets_per_instance(files: Path, seg: Explainer) -> None:
    """V1 and V2 ``parameters.targets`` as one list of K per instance (objects, text forms and class indices),
    and V2's ``explainrt.targets`` [N, K]: maps [N, K, H, W] equal to the one-target calls; bad lists are 400s."""
    from fastapi.testclient import TestClient

    from explainrt.serve.app import create_app

    pictures = [np.asarray(Image.open(files / f"{name}.png")) for name in ("one", "two")]
    instances = [{"image": {"b64": _png_b64(picture)}} for picture in pictures]
    mask = _mask(files)
    region = {"kind": "region", "class": 2, "mask": mask.tolist()}
    rows = [[region, "class:1"], [3, region]]
    objects = [[Region(2, mask), Class(1)], [Class(3), Region(2, mask)]]
    detector = _TinyDetector("yolov8").eval()
    explainers = {"seg": seg, "det": Explainer(detector, [detector.features], input_size=(SIZE, SIZE))}
    with TestClient(create_app(explainers)) as client:
        response = client.post("/v1/models/seg:explain", json={"instances": instances, "parameters": {
            "targets": rows, "return": ["map", "overlay"], "caption": True}})
        assert response.status_code == 200, response.text

        def own_overlay(part: dict, one: Explanation, index: int) -> None:  # with its own caption
            overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(part["overlay"]["b64"]))))
            np.testing.assert_array_equal(overlay, one.overlays(captions=True)[index])

        assert_equal_to_one_target_calls(response.json()["explanations"], seg, pictures, objects, own_overlay)
        classes = client.post("/v1/models/seg:explain", json={"instances": instances, "parameters": {
            "targets": [[1, -1], [2, 0]], "return": "map"}})
        assert classes.status_code == 200, classes.text
        expected = seg.explain(pictures, targets=[[1, -1], [2, 0]])
        for index, item in enumerate(classes.json()["explanations"]):
            assert [part["target"]["index"] for part in item["targets"]] == expected.targets[index].tolist()
            for k, part in enumerate(item["targets"]):
                np.testing.assert_allclose(np.asarray(part["map"]), expected.maps[index, k], atol=1e-4)

        batch = _image((2, 3, SIZE, SIZE), seed=3)
        image_input = {"name": seg.spec.image_input, "shape": list(batch.shape), "datatype": "FP32",
                       "data": batch.ravel().tolist()}
        v2 = client.post("/v2/models/seg/infer", json={"inputs": [image_input], "parameters": {
            "method": "gradcam", "targets": rows}})
        assert v2.status_code == 200, v2.text
        outputs = {output["name"]: output for output in v2.json()["outputs"]}
        many = seg.explain(batch, targets=objects)
        assert outputs["explainrt.maps"]["shape"] == [2, 2, SIZE, SIZE]
        np.testing.assert_allclose(np.reshape(outputs["explainrt.maps"]["data"], many.maps.shape), many.maps, atol=1e-5)
        np.testing.assert_allclose(np.reshape(outputs["explainrt.objective"]["data"], (2, 2)), many.logits, rtol=1e-5)
        assert np.reshape(outputs["explainrt.resolved_targets"]["data"], (2, 2)).tolist() == many.targets.tolist()
        tensor = {"name": "explainrt.targets", "shape": [2, 2], "datatype": "INT64", "data": [1, -1, 2, 0]}
        v2 = client.post("/v2/models/seg/infer", json={
            "inputs": [image_input, tensor], "parameters": {"method": "gradcam"},
            "outputs": [{"name": "explainrt.maps", "parameters": {"format": "PNG"}}, {"name": "explainrt.resolved_targets"}]})
        assert v2.status_code == 200, v2.text
        outputs = {output["name"]: output for output in v2.json()["outputs"]}
        expected = seg.explain(batch, targets=[[1, -1], [2, 0]])
        assert outputs["explainrt.maps"]["shape"] == [2, 2]
        pngs = [np.asarray(Image.open(io.BytesIO(base64.b64decode(d)))) for d in outputs["explainrt.maps"]["data"]]
        np.testing.assert_allclose(np.reshape(pngs, expected.maps.shape) / 255, expected.maps, atol=1 / 255 + 1e-6)
        assert np.reshape(outputs["explainrt.resolved_targets"]["data"], (2, 2)).tolist() == expected.targets.tolist()

        refusals = [
            ("seg", [[1, 2], [3]], "all of one length K"),
            ("seg", [[1, 2], 3], "not both"),
            ("seg", [[1, 2]], "one list per instance (2)"),
            ("seg", [[1, 9], [1, 2]], "target class 9 is out of range"),
            ("seg", [["box:1,1,5,5:0", 1], ["box:1,1,5,5:0", 1]], "Box needs a raw detector output"),
            ("det", [[{"kind": "box", "xyxy": [1, 1, 40, 40], "class": 0}, 1]] * 2, "outside the 32x32 image"),
        ]
        for name, given, message in refusals:
            refused = client.post(f"/v1/models/{name}:explain", json={"instances": instances, "parameters": {
                "targets": given}})
            assert refused.status_code == 400 and message in refused.text, (given, refused.text)
        refused = client.post("/v2/models/seg/infer", json={"inputs": [image_input, {**tensor, "shape": [1, 4]}],
                                                            "parameters": {"method": "gradcam"}})
        assert refused.status_code == 400 and "[2, K] (K classes per image)" in refused.text


def test_batch_worker_writes_one_map_and_row_per_target(files: Path, seg: Explainer, tmp_path: Path) -> None:
    """A Ray batch job's worker (run here without Ray) given K targets: per image and target its map, overlay
    and summary row, each map equal to the one-target call; bad targets are refused before Ray starts."""
    from explainrt.batch.job import (
        _IMAGES,
        _NAMES,
        SUMMARY_COLUMNS,
        ExplainWorker,
        explain_dataset,
    )

    mask = _mask(files)
    given = [Region(2, mask), 1, Class(3)]
    proto = load(str(files / "seg.onnx"), overrides=PreprocessingOverrides(input_size=(SIZE, SIZE)))
    worker = ExplainWorker(proto.explainable.SerializeToString(), proto.preprocessing.to_json(), "gradcam", given, {},
                           True, 4, False, str(tmp_path), str(files))
    paths = [files / "one.png", files / "two.png"]
    batch = {_IMAGES: np.array([p.read_bytes() for p in paths], dtype=object),
             _NAMES: np.array([str(p) for p in paths], dtype=object)}
    rows = worker(batch)
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized(), "the worker started Ray outside Ray"
    assert set(rows) == set(SUMMARY_COLUMNS) and len(rows["image"]) == 6
    assert rows["target"].tolist() == ["region:2", "class:1", "class:3"] * 2
    pictures = [str(p) for p in paths]
    for k, target in enumerate(given):
        one = seg.explain(pictures, targets=target)
        for index in range(2):
            row = 3 * index + k
            stem = ["one", "two"][index]
            assert rows["map"][row] == f"{stem}.gradcam.{['region-2', 'class-1', 'class-3'][k]}.npy"
            np.testing.assert_allclose(np.load(tmp_path / rows["map"][row]), one.maps[index], atol=1e-5)
            assert rows["explained_class"][row] == int(one.targets[index])
            # the K targets hold a Region: every row's score is its objective (a Class alone: its class's summed scores)
            score = one.logits[index, 0] if one.objective else one.class_scores[index, int(one.targets[index])]
            np.testing.assert_allclose(rows["score"][row], score, rtol=1e-5)
            assert (tmp_path / rows["overlay"][row]).is_file()
    with pytest.raises(InvalidTargetError, match="Box needs a raw detector output"):
        explain_dataset(files, tmp_path / "o", str(files / "seg.onnx"), preprocessing=proto.preprocessing,
                        target=[1, Box([1, 1, 5, 5], 0)])
    with pytest.raises(InvalidInputError, match="target class 7 is out of range"):
        explain_dataset(files, tmp_path / "o", str(files / "seg.onnx"), preprocessing=proto.preprocessing,
                        target=[1, 7])


@pytest.mark.parametrize("layout", ["yolov8", "yolov5"])
def test_boxes_mixed_with_other_targets_and_summed_in_one_call(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Box beside a Weights target, a Sum of two Boxes, and a Sum of a Box and Weights, on both layouts and
    backends: one runtime call (the weighted box objective), each map equal to torch.autograd's input gradient
    of its objective and each score to the objective; a summed box no prediction overlaps is refused."""
    from tests.test_targets import _Calls

    model = _TinyDetector(layout).eval()
    image = _image((2, 3, SIZE, SIZE), seed=21)
    x = torch.from_numpy(image).requires_grad_(True)
    out = model(x)
    values = out.detach().numpy()
    rng = np.random.default_rng(22)
    weights = [rng.normal(size=values.shape[1:]).astype(np.float32) for _ in range(2)]

    def boxes_of(i: int) -> list[Box]:
        predictions = values[i] if layout == "yolov5" else values[i].T  # [anchors, fields]
        picks = [int(np.argmax(predictions[:, -1])), int(np.argmax(predictions[:, -2]))]
        return [Box(np.clip([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 0, SIZE), c, iou=0.7, layout=layout)
                for (cx, cy, w, h), c in zip(predictions[picks, :4], (1, 0))]

    from explainrt.targets import Sum, Weights

    first, second = boxes_of(0), boxes_of(1)
    rows = [[first[0], Weights(weights[0]), Sum([first[0], first[1]])],
            [Sum([second[1], Weights(weights[1])]), second[0], Weights(weights[1])]]

    def objective(target: object, i: int) -> torch.Tensor:
        """The target's objective of image i's output, in torch (the overlaps decided on these values)."""
        if isinstance(target, Sum):
            return sum(objective(part, i) for part in target.parts)  # type: ignore[return-value]
        if isinstance(target, Weights):
            return (out[i] * torch.from_numpy(target.weights)).sum()
        assert isinstance(target, Box)
        chosen = torch.from_numpy(target._overlapping(values[i].T if layout == "yolov5" else values[i]))
        assert 0 < int(chosen.sum()) < 64  # some predictions count, not all: the mask matters
        fields = out[i] if layout == "yolov5" else out[i].T
        score = fields[:, 5 + target.index] * fields[:, 4] if layout == "yolov5" else fields[:, 4 + target.index]
        return score[chosen].sum()

    for backend in ("onnxruntime", "torch"):
        explainer = Explainer(model, [model.features], backend=backend, input_size=(SIZE, SIZE))
        calls = _Calls(explainer, monkeypatch)
        ours = explainer.explain(image, method="saliency", targets=rows, normalize=False, abs=False)
        assert calls.names == ["input_gradients"], backend  # no forward pass first
        for i in range(2):
            for k in range(3):
                x.grad = None
                value = objective(rows[i][k], i)
                value.backward(retain_graph=True)
                reference = x.grad.numpy()[i].sum(axis=0)
                assert np.abs(ours.maps[i, k] - reference).max() <= 1e-4 * np.abs(reference).max(), (backend, i, k)
                np.testing.assert_allclose(ours.logits[i, k], float(value), rtol=1e-5)
        del calls.names[:]
        cams = explainer.explain(image, method="gradcam", targets=rows, normalize=False)
        assert calls.names == ["run"], backend
        for k in range(3):
            one = explainer.explain(image, method="gradcam", targets=[row[k] for row in rows], normalize=False)
            np.testing.assert_allclose(cams.maps[:, k], one.maps, rtol=1e-4, atol=1e-6)
        with pytest.raises(InvalidTargetError, match="no prediction overlaps"):
            explainer.explain(image[:1], method="gradcam",
                              targets=Sum([first[0], Box([0, 0, 0.5, 0.5], 1, iou=0.9, layout=layout)]))
        del calls.names[:]
        shown = explainer.explain(image, method="gradcam", targets=rows)  # normalised: ONNX Runtime's map head
        assert calls.names == (["maps"] if backend == "onnxruntime" else ["run"]), backend
        monkeypatch.setattr(explainer, "map_heads", False)
        python = explainer.explain(image, method="gradcam", targets=rows)
        np.testing.assert_allclose(shown.maps, python.maps, atol=1e-5)
        np.testing.assert_allclose(shown.logits, python.logits, rtol=1e-5, atol=1e-6)


def test_cli_batch_takes_repeated_targets_and_refuses_bad_ones_before_ray(
        files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from explainrt.cli import main

    common = ["batch", str(files), "--out", str(tmp_path / "out"), "--model", str(files / "seg.onnx"),
              "--input-size", "32", "32"]
    assert main([*common, "--target", "1", "--target", "box:1,1,5,5:0"]) == 2
    assert "Box needs a raw detector output" in capsys.readouterr().err
    assert main([*common, "--target", "1", "--target=-9"]) == 2
    assert "target class -9 is out of range" in capsys.readouterr().err


def _conforms(shape: list[int], declared: list[int]) -> bool:
    """Whether an answer's tensor shape is one its metadata declares (-1: any size)."""
    return len(shape) == len(declared) and all(d in (-1, s) for s, d in zip(shape, declared, strict=True))


def test_v2_metadata_declares_the_shapes_answers_have(seg: Explainer) -> None:
    """GET /v2/models/NAME declares every output as a one-target answer has it and, in parameter
    ``k_target_shapes``, the K axis of those that gain one with K targets per instance; each answer's shape
    (one target, K targets as parameters.targets lists (as JSON text, the protocol's scalar parameters) and as
    input explainrt.targets [N, K], layer outputs) is the declared one."""
    from fastapi.testclient import TestClient

    from explainrt.serve.app import create_app

    batch = _image((2, 3, SIZE, SIZE), seed=5)
    image = {"name": seg.spec.image_input, "shape": list(batch.shape), "datatype": "FP32", "data": batch.ravel().tolist()}
    k_tensor = {"name": "explainrt.targets", "shape": [2, 3], "datatype": "INT64", "data": [1, -1, 2, 0, 3, 1]}
    every = [{"name": name} for name in (seg.spec.logits, "explainrt.maps", "explainrt.resolved_targets",
                                         "explainrt.activations.0", "explainrt.gradients.0")]
    with TestClient(create_app({"seg": seg})) as client:
        metadata = client.get("/v2/models/seg").json()
        declared = {tensor["name"]: tensor["shape"] for tensor in metadata["outputs"]}
        with_k = metadata["parameters"]["k_target_shapes"]
        assert declared["explainrt.maps"] == [-1, SIZE, SIZE] and with_k["explainrt.maps"] == [-1, -1, SIZE, SIZE]
        assert with_k["explainrt.objective"] == [-1, -1] and declared["explainrt.gradients.0"] == [-1] * 5
        assert {tensor["name"]: tensor["shape"] for tensor in metadata["inputs"]}["explainrt.targets"] == [-1]
        assert with_k["explainrt.targets"] == [-1, -1]
        region = {"kind": "region", "class": 2, "mask": np.ones((SIZE, SIZE)).tolist()}
        requests = [  # (body, K per instance)
            ({"inputs": [image], "parameters": {"method": "gradcam", "targets": region}}, 1),
            ({"inputs": [image], "parameters": {"method": "gradcam", "targets": json.dumps([[region, 1]] * 2)}}, 2),
            ({"inputs": [image, k_tensor], "parameters": {"method": "gradcam"}, "outputs": every}, 3),
            ({"inputs": [image], "outputs": every}, 1),
        ]
        for body, k in requests:
            response = client.post("/v2/models/seg/infer", json=body)
            assert response.status_code == 200, response.text
            for output in response.json()["outputs"]:
                name = output["name"]
                expected = with_k[name] if k > 1 and name in with_k else declared[name]
                assert _conforms(output["shape"], expected), (name, output["shape"], expected)
                if name == "explainrt.gradients.0":
                    assert output["shape"][1] == k  # K targets per instance: the gradients' K axis
