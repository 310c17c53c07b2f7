"""explainrt: inference-time explanations computed inside the ONNX graph."""
