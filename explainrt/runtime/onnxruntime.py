"""The ONNX Runtime backend: any execution providers, validated up front, never a silent fallback;
with CUDAExecutionProvider first, inputs and outputs are bound on the device by IO binding."""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx

from explainrt.errors import BackendUnavailableError, InvalidInputError, InvalidModelError
from explainrt.export.heads import (
    add_map_heads,
    checked_maps,
    closed_form,
    head_only_model,
    keep_maps_only,
    without_maps,
)
from explainrt.export.spec import (
    BOX_OBJECTIVES,
    BOX_OBJECTIVES_OUTPUT,
    REFERENCE_PREFIX,
    TARGETS_INPUT,
    WEIGHTED_BOX_OBJECTIVES,
    ExplainableSpec,
    maps_output,
    original_model,
    reference_input,
    relu_output,
)
from explainrt.export.explainable import shallow_target_ranking
from explainrt.export.variants import head_model, variant_kind, variant_model
from explainrt.runtime.base import (
    MapsResult,
    RunResult,
    head_feeds,
    in_call_heads,
    input_dims,
    map_head_feeds,
    maps_outputs,
    maps_session_model,
    output_names,
    parse_device,
    run_in_chunks,
    run_result,
    static_batch,
    static_dims,
    targets_feed,
)

log = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"


class OnnxRuntimeSession:
    """An explainable ONNX model in ONNX Runtime, plus lazily built plain, head and variant sessions.

    A variant is the same original model made explainable for another objective (a loss instead of
    a logit) or with the model input as the target (input gradients); each is built on first use.
    """

    def __init__(self, model: onnx.ModelProto, providers: Sequence[str] | None = None, device_id: int = 0,
                 device_outputs: bool = False, maps: Sequence[str] = ()) -> None:
        """``device_id``: the CUDA device of CUDAExecutionProvider. ``device_outputs=True`` (CUDA only)
        returns CuPy arrays that share ONNX Runtime's output buffers (DLPack) instead of host arrays.
        ``maps``: closed-form CAM methods whose map heads the main session's model gets when ``model``
        lacks them (``main_maps``): their maps then come from the model's one runtime call, not from a
        second call of the head alone. ONNX Runtime runs every node of a model whatever outputs are
        fetched, so the main session runs a maps-only copy (``keep_maps_only``: no activation and gradient
        outputs, nor the nodes only they need); the activations and gradients other methods read come
        from a session of the full model, built on first use (the model's weights then twice in memory)."""
        import onnxruntime as ort

        self.spec = ExplainableSpec.from_model(model)
        self.providers = _validated_providers(ort, providers)
        self.device_id = int(device_id)
        self.on_cuda = self.providers[0] == CUDA_PROVIDER
        self.io_device = "cuda"  # where IO binding places buffers (the tests bind host memory through it)
        if device_outputs and not self.on_cuda:
            raise InvalidInputError(f"device_outputs=True needs {CUDA_PROVIDER} first in providers, got {self.providers}")
        self.device_outputs = bool(device_outputs)
        self._model = model
        self._ort = ort
        self.main_maps, added = in_call_heads(self.spec, checked_maps(maps))
        """Methods whose float32 maps the main session returns (the model's own heads and those added)."""
        lean = bool(self.main_maps) and not self.spec.maps_only
        if lean:
            log.info("the model's session returns the maps of %s (heads added: %s)", ", ".join(self.main_maps),
                     ", ".join(added) or "none")
            # its targets ranked only as deep as asked (TensorRT, which wants a constant depth, ranks every class)
            self._main = self._session(shallow_target_ranking(maps_session_model(model, added, self.main_maps)))
        else:
            self._main = self._session(model)
        self._plain: object | None = None
        self._heads: dict[int, tuple[object, bool]] = {}
        # per session, what it takes and returns: held weakly, so that a session replaced (a maps-only variant rebuilt
        # with one more head) goes with its weights
        self._input_types: weakref.WeakKeyDictionary[object, dict[str, np.dtype]] = weakref.WeakKeyDictionary()
        self._output_names: weakref.WeakKeyDictionary[object, set[str]] = weakref.WeakKeyDictionary()
        # (objective, of_input, defended) -> (session, output names, shapes of the defence's reference inputs)
        self._variants: dict[tuple[Any, ...], tuple[object, list[str], list[list[int | str | None]]]] = {} if (
            self.spec.maps_only or lean) else {
            (self.spec.objective, False, False): (self._main, output_names(self.spec.logits, len(self.spec.target_layers),
                                                                           self.spec.objective), [])}
        # method -> the session of its head alone
        self._maps: dict[str, object] = {}
        # target objective -> the methods whose heads its maps-only variant holds, and that variant's session
        self._objective_variants: dict[str, tuple[tuple[str, ...], object]] = {}
        self.input_shape = tuple(input_dims(model, self.spec.image_input))

    def _session(self, model: onnx.ModelProto, spinning: bool = True) -> object:
        """An ONNX Runtime session on this session's providers. ``spinning=False`` for sessions run in
        quick alternation (incremental stages): their idle threads would otherwise spin and starve the next."""
        options = self._ort.SessionOptions()
        options.log_severity_level = 3
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            provider_options = [{"device_id": str(self.device_id)} if p == CUDA_PROVIDER else {} for p in self.providers]
            session = self._ort.InferenceSession(model.SerializeToString(), options, providers=self.providers,
                                                 provider_options=provider_options)
        except Exception as error:  # onnxruntime raises its own untyped exceptions
            raise InvalidModelError(f"onnxruntime cannot load the model: {error}") from error
        active = session.get_providers()
        if active[0] != self.providers[0]:
            raise BackendUnavailableError(f"onnxruntime did not enable {self.providers[0]} (active: {active})")
        return session

    def run(self, images: np.ndarray, targets: np.ndarray, objective: str = "logit") -> RunResult:
        return self._run_variant(images, targets, objective, of_input=False)

    def input_gradients(self, images: np.ndarray, targets: np.ndarray, objective: str = "logit") -> RunResult:
        return self._run_variant(images, targets, objective, of_input=True)

    def maps(self, images: np.ndarray, targets: Any, method: str, objective: str | None = None) -> MapsResult:
        """``method``'s normalised maps [N, K, H, W] computed in the graph by its map head: in the main
        session's one call when its model has the head (``main_maps``), else the method's head alone
        (``head_only_model``, built on first use) run on what the explainable model (or its variant for
        the method's objective) returns. ``objective``: a target objective (``TARGET_OBJECTIVES``, targets
        fed as ``targets_feed`` takes them) in place of the class logit the method weighs: a maps-only
        variant for it with the method's head, one call (``_objective_maps``)."""
        # a method whose head the model's own call has needs no other check
        own = None if objective is None and method in self.main_maps else closed_form(
            method, objective, target_objective=True).objective
        if objective is not None and objective != own:
            return self._objective_maps(images, targets, method, objective)
        if method in self.main_maps:
            return MapsResult(*self._run(self._main, maps_outputs(self.spec, method),
                                         {self.spec.image_input: images, TARGETS_INPUT: targets}))
        result = self.run(images, targets, own)
        if method not in self._maps:
            log.info("building the map head of %s", method)
            # no spinning: the head runs right after the model, whose next call its idle threads would slow
            self._maps[method] = self._session(head_only_model(self._model, method), spinning=False)
        maps = self._run(self._maps[method], [maps_output(method)], map_head_feeds(self.spec, images, result))[0]
        return MapsResult(result.logits, result.targets, maps)

    def _objective_maps(self, images: np.ndarray, targets: Any, method: str, objective: str) -> MapsResult:
        """``maps`` for a target objective: the maps-only layer variant of ``objective``, whose logits and resolved
        targets (or box matches) read as ``run_result``'s. One variant per objective (one copy of the model's
        weights) holds the heads of every method asked for with it so far: a method new to it rebuilds it with
        its head added, and each call then computes every head it holds (about 1 % of the call each)."""
        methods, session = self._objective_variants.get(objective, ((), None))
        if method not in methods:
            self._objective_variants.pop(objective, None)
            methods, session = (*methods, method), None  # the old session goes before the new one is made
            log.info("building the maps-only model of objective %s with the heads of %s", objective, ", ".join(methods))
            if objective == self.spec.objective and not self.spec.maps_only:
                headed = onnx.ModelProto()
                headed.CopyFrom(self._model)
                headed = keep_maps_only(add_map_heads(without_maps(headed), methods, target_objective=True), methods)
            else:  # made anew, its reverse pass skipping the scales no box matched (ONNX Runtime runs If nodes)
                headed = variant_model(self._model, self.spec, objective, False, maps=list(methods), maps_only=True,
                                       target_objective=True, zero_branches=True)
            session = self._session(headed)
            self._objective_variants[objective] = (methods, session)
        outputs = output_names(self.spec.logits, 0, objective)
        computed = self._box_objectives(session, objective)
        values = self._run(session, [*outputs, *computed, maps_output(method)],
                           {self.spec.image_input: images, **targets_feed(objective, targets)})
        result = run_result(values[:len(outputs)], objective, targets)
        return MapsResult(result.logits, result.targets, values[-1], values[len(outputs)] if computed else None)

    def _box_objectives(self, session: object, objective: str) -> list[str]:
        """The output of each box's objective, where ``session``'s model has one (a box objective's, not a weighted
        one's; a model exported by an earlier explainrt has none): the objectives then need no pass in Python."""
        if objective not in BOX_OBJECTIVES or objective in WEIGHTED_BOX_OBJECTIVES:
            return []
        if session not in self._output_names:
            self._output_names[session] = {o.name for o in session.get_outputs()}  # type: ignore[attr-defined]
        return [BOX_OBJECTIVES_OUTPUT] if BOX_OBJECTIVES_OUTPUT in self._output_names[session] else []

    def _variant(self, objective: str, of_input: bool, defended: bool = False,
                 images: Any = None) -> tuple[object, list[str], list[list[int | str | None]]]:
        """The session of a variant (built on first use), its outputs and its reference inputs' shapes."""
        # gradients down to an image of dynamic size: one variant per size (a strided Conv's needs static shapes)
        size = (tuple(int(v) for v in images.shape[2:4]) if of_input and images is not None
                and not all(isinstance(v, int) and v > 0 for v in self.input_shape[2:4]) else None)
        key = (objective, of_input, defended) if size is None else (objective, of_input, defended, size)
        if key not in self._variants:
            log.info("building the %s variant of the model (objective %s)", variant_kind(of_input, defended), objective)
            variant = variant_model(self._model, self.spec, objective, of_input, defended, size)  # type: ignore[arg-type]
            shapes = [input_dims(variant, reference_input(k))
                      for k in range(sum(v.name.startswith(REFERENCE_PREFIX) for v in variant.graph.input))]
            outputs = output_names(self.spec.logits, 1 if of_input else len(self.spec.target_layers), objective)
            self._variants[key] = (self._session(variant), outputs + [relu_output(k) for k in range(len(shapes))], shapes)
        return self._variants[key]

    def _run_variant(self, images: np.ndarray, targets: np.ndarray, objective: str, of_input: bool) -> RunResult:
        session, outputs, _ = self._variant(objective, of_input, images=images)
        computed = self._box_objectives(session, objective)
        values = self._run(session, [*outputs, *computed], {self.spec.image_input: images,
                                                            **targets_feed(objective, targets)})
        result = run_result(values[:len(outputs)], objective, targets)
        return dataclasses.replace(result, objectives=values[-1]) if computed else result

    def _run(self, session: object, outputs: list[str], feeds: dict[str, Any]) -> list[Any]:
        """Run ``session``: in chunks of the model's static batch where it has one (the last chunk padded
        with copies of its last image, the padding dropped); float outputs of another precision (an fp16
        model's) as float32, which is what the methods compute in."""
        values = run_in_chunks(lambda chunk: self._run_once(session, outputs, chunk), self._typed(session, feeds),
                               static_batch(self.input_shape), True, _concatenated)
        return [_as_float32(value) for value in values]

    def _typed(self, session: object, feeds: dict[str, Any]) -> dict[str, Any]:
        """Float feeds in the float type the session's input has (an fp16 model's activations, references)."""
        if session not in self._input_types:
            self._input_types[session] = {i.name: _FLOAT_INPUTS[i.type] for i in session.get_inputs()  # type: ignore[attr-defined]
                                          if i.type in _FLOAT_INPUTS}
        wanted = self._input_types[session]
        return {name: value.astype(wanted[name]) if name in wanted and hasattr(value, "astype")
                and np.dtype(value.dtype).kind == "f" and np.dtype(value.dtype) != wanted[name] else value
                for name, value in feeds.items()}

    def _run_once(self, session: object, outputs: list[str], feeds: dict[str, Any]) -> list[Any]:
        """One runtime call. On CUDA, through IO binding: CUDA arrays (CuPy, torch) are bound in
        place, host arrays copied once, outputs allocated on the device; they come back as CuPy
        arrays (DLPack, no copy) with ``device_outputs``, else copied to the host."""
        if not self.on_cuda:
            return session.run(outputs, feeds)  # type: ignore[attr-defined]
        binding = session.io_binding()  # type: ignore[attr-defined]
        for name, value in feeds.items():
            if hasattr(value, "__cuda_array_interface__"):
                interface = value.__cuda_array_interface__
                if interface.get("strides") is not None and not _is_contiguous(value):
                    raise InvalidInputError(f"the CUDA array for {name!r} must be C-contiguous")
                binding.bind_input(name, self.io_device, self.device_id, np.dtype(interface["typestr"]),
                                   tuple(interface["shape"]), interface["data"][0])
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in outputs:
            binding.bind_output(name, self.io_device, self.device_id)
        session.run_with_iobinding(binding)  # type: ignore[attr-defined]
        values = binding.get_outputs()
        if self.device_outputs:
            from explainrt.kernels._cupy import load_cupy

            cupy = load_cupy()
            return [cupy.from_dlpack(value) for value in values]
        return [value.numpy() for value in values]

    def defended_input_gradients(self, images: np.ndarray, targets: np.ndarray, references: list[np.ndarray] | None = None,
                                 objective: str = "logit") -> tuple[RunResult, list[np.ndarray]]:
        """Input gradients with FGVis's defence: a Relu passes the gradient only where
        0 < activation <= reference, its activation on the unperturbed image (``references``, as an
        earlier call on the unperturbed images returned them; None: no upper bound). Returns the
        result and these images' Relu activations (the references for their perturbations)."""
        session, outputs, shapes = self._variant(objective, of_input=True, defended=True, images=images)
        if references is None:
            references = [np.full([images.shape[0], *static_dims(shape[1:])], np.inf, dtype=images.dtype) for shape in shapes]
        elif len(references) != len(shapes):
            raise InvalidInputError(f"the model has {len(shapes)} defended Relus; got {len(references)} references")
        feeds = {self.spec.image_input: images, **targets_feed(objective, targets),
                 **{reference_input(k): reference for k, reference in enumerate(references)}}
        values = self._run(session, outputs, feeds)
        given = 3 if objective == "weights" else 4
        return run_result(values[:given], objective, targets), list(values[given:])

    @property
    def model(self) -> onnx.ModelProto:
        """The explainable model this session runs."""
        return self._model

    def submodel_runner(self, model: onnx.ModelProto) -> Callable[[np.ndarray], np.ndarray]:
        """Run ``model``, one input to one output, derived from this one (a stage of incremental
        inference) on the same providers and device."""
        session = self._session(model, spinning=False)
        source, result = model.graph.input[0].name, model.graph.output[0].name
        return lambda values: self._run(session, [result], {source: values})[0]

    def logits(self, images: np.ndarray) -> np.ndarray:
        if self._plain is None:
            self._plain = self._session(original_model(self._model))
        return self._run(self._plain, [self.spec.logits], {self.spec.image_input: images})[0]

    def head(self, layer: int, activations: np.ndarray, images: np.ndarray) -> np.ndarray:
        if layer not in self._heads:
            head, reads_image = head_model(self._model, self.spec, layer)
            self._heads[layer] = (self._session(head), reads_image)
        session, reads_image = self._heads[layer]
        return self._run(session, [self.spec.logits], head_feeds(self.spec, layer, activations, images, reads_image))[0]


_FLOAT_INPUTS = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16),
                 "tensor(double)": np.dtype(np.float64)}


def _concatenated(values: list[Any]) -> Any:
    """NumPy arrays (or CuPy arrays, with device outputs) joined along axis 0."""
    if isinstance(values[0], np.ndarray):
        return np.concatenate(values)
    from explainrt.kernels._cupy import load_cupy

    return load_cupy().concatenate(values)


def _as_float32(value: Any) -> Any:
    """Float outputs of another precision as float32; everything else as it is."""
    dtype = getattr(value, "dtype", None)  # NumPy's dtype on NumPy and CuPy arrays alike
    if dtype is not None and dtype.kind == "f" and dtype.char != "f":
        return value.astype(np.float32)
    return value


def _validated_providers(ort: object, providers: Sequence[str] | None) -> list[str]:
    available = ort.get_available_providers()  # type: ignore[attr-defined]
    wanted = list(providers) if providers else ["CPUExecutionProvider"]
    missing = [p for p in wanted if p not in available]
    if missing:
        raise BackendUnavailableError(
            f"onnxruntime execution provider(s) {missing} are not available here (available: {available}); "
            "install onnxruntime-gpu for CUDAExecutionProvider"
        )
    return wanted


def _is_contiguous(array: Any) -> bool:
    return bool(getattr(array, "flags", None) is not None and array.flags.c_contiguous) or (
        hasattr(array, "is_contiguous") and array.is_contiguous())


def onnxruntime_placement(providers: Sequence[str] | None, device: str | None) -> tuple[list[str] | None, int]:
    """Providers and CUDA device id for ONNX Runtime from ``providers`` and ``device``.

    ``device="cuda[:N]"`` with no providers means CUDAExecutionProvider (CPU for the operators
    it lacks); a device that contradicts the first provider is an error, never a silent switch.
    """
    if device is None:
        return (list(providers) if providers else None), 0
    kind, index = parse_device(device)
    if providers:
        if (providers[0] == CUDA_PROVIDER) != (kind == "cuda"):
            raise InvalidInputError(f"device {device!r} contradicts the first provider {providers[0]!r}")
        return list(providers), index
    return ([CUDA_PROVIDER, "CPUExecutionProvider"] if kind == "cuda" else ["CPUExecutionProvider"]), index
