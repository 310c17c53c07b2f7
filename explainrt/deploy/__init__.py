"""Deployment artefacts of explainable models: Triton model repositories and the TensorRT operator check."""
