"""The image input's form: layout (``[N, C, H, W]`` or channels-last ``[N, H, W, C]``), element type, sizes.

Every method works on float32 ``[N, C, H, W]`` images. A model whose image input is channels-last
(tf2onnx/Keras exports), float16 (converted whole to fp16) or uint8 (preprocessing baked into the
graph) gets a small adapter in front: a float32 ``[N, C, H, W]`` input of the same name, transposed
and cast (integers: rounded and clipped first, so uint8 pixels pass unchanged) to the model's own
form. The adapter's nodes belong to the model from then on (the plain model keeps them), and the
model's own form is stored in the metadata under ``INPUT_FORM_KEY``, so the Explainer takes images
in that form and its messages name it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from explainrt.autodiff.builder import FLOAT_TYPES, Dim
from explainrt.errors import InvalidInputError, InvalidModelError
from explainrt.export.layouts import graph_votes

INPUT_FORM_KEY = "explainrt.input_form"
INPUT_LAYOUTS = ("nchw", "nhwc")
ADAPTER_SCOPE = "input_adapter/"
"""Prefix of the adapter's nodes (not ``explainrt/``: the plain model keeps them)."""

_INTEGER_RANGES = {TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127)}
_IMAGE_TYPES = FLOAT_TYPES | set(_INTEGER_RANGES)
_CHANNELS = (1, 2, 3, 4)
"""Channel counts an image input may have: what tells [N, C, H, W] from [N, H, W, C] by shape alone."""


@dataclass(frozen=True)
class InputForm:
    """The model's own image input: ``layout`` "nchw" or "nhwc", numpy ``dtype`` name, ``dims`` in that layout."""

    layout: str = "nchw"
    dtype: str = "float32"
    dims: tuple[Dim, ...] = ("N", None, None, None)

    @property
    def nchw(self) -> tuple[Dim, Dim, Dim, Dim]:
        """The dims as [N, C, H, W]."""
        n, *rest = self.dims
        c, h, w = (rest[2], rest[0], rest[1]) if self.layout == "nhwc" else rest
        return n, c, h, w

    @property
    def batch(self) -> int | None:
        """The static batch size, None where the batch is dynamic."""
        n = self.dims[0]
        return n if isinstance(n, int) and n > 0 else None

    @property
    def is_integer(self) -> bool:
        return np.dtype(self.dtype).kind in "iu"

    def shape(self) -> str:
        """The dims in the model's layout, dynamic ones by their axis letter: e.g. ``[N, H, W, 3]``."""
        names = ("N", "H", "W", "C") if self.layout == "nhwc" else ("N", "C", "H", "W")
        return f"[{', '.join(str(d) if isinstance(d, int) and d > 0 else name for d, name in zip(self.dims, names))}]"

    def describe(self) -> str:
        """E.g. ``[N, 224, 224, 3] float16 (channels-last)``."""
        return f"{self.shape()} {self.dtype}" + (" (channels-last)" if self.layout == "nhwc" else "")

    def to_json(self) -> str:
        return json.dumps({"layout": self.layout, "dtype": self.dtype, "dims": list(self.dims)})

    @classmethod
    def from_json(cls, text: str) -> InputForm:
        try:
            fields = json.loads(text)
            return cls(fields["layout"], fields["dtype"], tuple(fields["dims"]))
        except (ValueError, TypeError, KeyError) as error:
            raise InvalidModelError(f"corrupt {INPUT_FORM_KEY} metadata in the model: {error}") from error


def image_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The image input: the first graph input (not an initializer) of rank 4 and a float or 8-bit integer type."""
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        tensor = value.type.tensor_type
        if (value.name not in initializers and tensor.elem_type in _IMAGE_TYPES and tensor.HasField("shape")
                and len(tensor.shape.dim) == 4):
            return value
    raise InvalidModelError("the model has no image input of rank 4 ([N, C, H, W] or [N, H, W, C]) and a float or "
                            "uint8 type")


def input_form(model: onnx.ModelProto) -> InputForm:
    """The form stored by ``adapt`` (an explainable model), else the image input's form as it is."""
    stored = next((p.value for p in model.metadata_props if p.key == INPUT_FORM_KEY), None)
    if stored is not None:
        return InputForm.from_json(stored)
    value = image_input(model)
    return InputForm("nchw", _numpy_name(value.type.tensor_type.elem_type), _dims(value))


def adapt(model: onnx.ModelProto, layout: str | None = None) -> InputForm:
    """Put the float32 ``[N, C, H, W]`` adapter in front of ``model``'s image input where its form differs
    (in place), store the form, and return it. ``layout``: "nchw" or "nhwc"; None tells it from the graph
    (what consumes the input) and the sizes (which axis has a channel count), refusing to guess."""
    checked_layout(layout)
    value = image_input(model)
    elem_type = value.type.tensor_type.elem_type
    dims = _dims(value)
    stored = next((p for p in model.metadata_props if p.key == INPUT_FORM_KEY), None)
    if stored is not None:
        form = InputForm.from_json(stored.value)
        if elem_type == TensorProto.FLOAT and dims == form.nchw:  # adapted before: the adapter is in the graph
            if layout is not None and layout != form.layout:
                raise InvalidInputError(f"input_layout={layout!r}, but the model's input was read as "
                                        f"{form.describe()}")
            return form
        model.metadata_props.remove(stored)  # the model was changed since (e.g. converted to fp16)
    form = InputForm(layout or _told_layout(model.graph, value.name, dims), _numpy_name(elem_type), dims)
    if form.layout != "nchw" or elem_type != TensorProto.FLOAT:
        _insert_adapter(model, value, form, elem_type)
    model.metadata_props.add(key=INPUT_FORM_KEY, value=form.to_json())
    return form


def checked_layout(layout: str | None) -> str | None:
    """``layout`` if it is None or one of ``INPUT_LAYOUTS``, else an InvalidInputError naming them."""
    if layout is not None and layout not in INPUT_LAYOUTS:
        raise InvalidInputError(f"input_layout must be one of {INPUT_LAYOUTS}, got {layout!r}")
    return layout


def _told_layout(graph: onnx.GraphProto, name: str, dims: tuple[Dim, ...]) -> str:
    votes = graph_votes(graph, name)
    if len(votes) == 1:
        return votes.pop()
    fits = {kind for kind, axis in (("nchw", 1), ("nhwc", 3)) if dims[axis] in _CHANNELS}
    if not votes and len(fits) == 1:
        return fits.pop()
    if not votes and not fits and not isinstance(dims[3], int) and isinstance(dims[1], int):
        return "nchw"
    why = "the graph uses it both ways" if len(votes) > 1 else "neither the graph nor the sizes tell"
    raise InvalidModelError(f"the image input {name!r} of shape {list(dims)}: whether it is [N, C, H, W] or "
                            f"[N, H, W, C] cannot be told ({why}): give input_layout='nchw' or 'nhwc' (--input-layout "
                           "on the command line)")


def _insert_adapter(model: onnx.ModelProto, value: onnx.ValueInfoProto, form: InputForm, elem_type: int) -> None:
    """Rename the model's input to ``<name>/model_form``, fed by a float32 NCHW input of the old name."""
    name = value.name
    inner = f"{ADAPTER_SCOPE}{name}"
    for node in model.graph.node:
        node.input[:] = [inner if i == name else i for i in node.input]
    for output in model.graph.output:
        if output.name == name:
            raise InvalidModelError(f"the image input {name!r} is also an output of the model")
    nodes = []
    current = name
    if form.layout == "nhwc":
        nodes.append(helper.make_node("Transpose", [current], [f"{inner}/nhwc"], name=f"{inner}/Transpose",
                                      perm=[0, 2, 3, 1]))
        current = f"{inner}/nhwc"
    if elem_type in _INTEGER_RANGES:
        low, high = _INTEGER_RANGES[elem_type]
        bounds = [helper.make_tensor(f"{inner}/{what}", TensorProto.FLOAT, [], [float(v)])
                  for what, v in (("low", low), ("high", high))]
        model.graph.initializer.extend(bounds)
        nodes.append(helper.make_node("Round", [current], [f"{inner}/rounded"], name=f"{inner}/Round"))
        nodes.append(helper.make_node("Clip", [f"{inner}/rounded", bounds[0].name, bounds[1].name],
                                      [f"{inner}/clipped"], name=f"{inner}/Clip"))
        current = f"{inner}/clipped"
    if elem_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [current], [f"{inner}/cast"], name=f"{inner}/Cast", to=elem_type))
        current = f"{inner}/cast"
    nodes.append(helper.make_node("Identity", [current], [inner], name=f"{inner}/Identity"))
    for node in reversed(nodes):
        model.graph.node.insert(0, node)
    model.graph.value_info.append(helper.make_tensor_value_info(inner, elem_type, list(form.dims)))
    value.type.tensor_type.elem_type = TensorProto.FLOAT
    del value.type.tensor_type.shape.dim[:]
    for dim in form.nchw:
        entry = value.type.tensor_type.shape.dim.add()
        if isinstance(dim, int) and dim > 0:
            entry.dim_value = dim
        elif dim:
            entry.dim_param = str(dim)


def with_nominal_size(model: onnx.ModelProto, size: tuple[int, int]) -> onnx.ModelProto | None:
    """A copy of ``model`` (float32 NCHW image input) whose dynamic height and width are ``size``, shapes
    inferred again: where the automatic layer search reads static grids. None where shapes cannot be inferred."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    value = image_input(probe)
    for axis, extent in zip((2, 3), size):
        dim = value.type.tensor_type.shape.dim[axis]
        if not dim.HasField("dim_value"):
            dim.dim_value = extent
    del probe.graph.value_info[:]
    try:
        return onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError):
        return None


def _dims(value: onnx.ValueInfoProto) -> tuple[Dim, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                 for d in value.type.tensor_type.shape.dim)


def _numpy_name(elem_type: int) -> str:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name
