"""Exception classes: every bad input gets one that names the problem."""

from __future__ import annotations


class ExplainrtError(Exception):
    """Base class of every error explainrt raises on purpose."""


class InvalidModelError(ExplainrtError):
    """The model file or graph is unreadable, corrupt, or lacks what explaining needs."""


class UnknownSizeError(InvalidModelError):
    """A gradient rule needs a tensor's size, which the graph leaves unknown (a dynamic image size)."""


class UnsupportedOperatorError(ExplainrtError):
    """The gradient builder has no VJP rule for an operator on the path to the logits."""

    def __init__(self, op_type: str, node_name: str, detail: str = "") -> None:
        self.op_type = op_type
        self.node_name = node_name
        message = f"no gradient rule for operator {op_type!r} (node {node_name!r})"
        super().__init__(f"{message}: {detail}" if detail else message)


class UnknownLayerError(ExplainrtError):
    """A requested target layer (tensor name or module) does not exist in the model."""


class DynamicTokenGridError(UnknownLayerError):
    """A target layer holds tokens but the image size is dynamic, so its token grid is not known."""


class NoSpatialLayerError(ExplainrtError):
    """The model has no rank-4 tensor with spatial size > 1 on the path to the logits."""


class InvalidInputError(ExplainrtError, ValueError):
    """An image batch, target or option given to an explanation is malformed."""


class InvalidTargetError(InvalidInputError):
    """An explanation target (explainrt.targets) the explained output cannot take: a mask of the wrong
    size, a class out of range, a box outside the image or that no prediction overlaps, a wrong kind."""


class ImageReadError(InvalidInputError):
    """An image file or buffer cannot be decoded."""


class BackendUnavailableError(ExplainrtError):
    """The requested backend or execution provider is not installed or not usable here."""


class UnknownMethodError(InvalidInputError):
    """The explanation method name is not registered."""


class ExplanationCancelled(ExplainrtError):
    """A long explanation was stopped through its ``cancel`` event; nothing partial is returned."""


class RequestTooLargeError(InvalidInputError):
    """A request body or an image exceeds a limit the server was started with."""


class UnknownModelError(InvalidInputError):
    """A request names a model the server does not serve."""


class OutputWriteError(ExplainrtError):
    """The command line cannot write its output files (a read-only or full disk); it wrote none of them."""


class ClientGoneError(ExplanationCancelled):
    """A server request's client disconnected before its answer was ready; its work was dropped."""


class UnsupportedMediaTypeError(InvalidInputError):
    """A request body is sent with a Content-Type the server does not read (it reads JSON)."""


class ServerBusyError(ExplainrtError):
    """The server's queue for a model is full; the client should retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnknownMetricError(InvalidInputError):
    """The faithfulness metric name is not one explainrt computes."""


class BatchJobError(ExplainrtError):
    """A dataset explanation job on Ray failed; no summary table was written."""


class InconsistentExplanationError(ExplainrtError):
    """A method returned maps that do not match the images (one map per image at the input size):
    refused rather than returned, since such maps cannot be what was asked for."""


class MissingDependencyError(ExplainrtError, ImportError):
    """A feature needs a package the core install leaves out; the message names the extra that installs it."""
