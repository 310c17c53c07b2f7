"""Models explainrt can load: the one load step (``load``) and the shipped default model."""

from explainrt.models.loading import DEFAULT_MODEL, LoadedModel, Outputs, PreprocessingOverrides, load

__all__ = ["DEFAULT_MODEL", "LoadedModel", "Outputs", "PreprocessingOverrides", "load"]
