"""Reverse-mode differentiation of ONNX graphs, written back into the graph as inference operators.

``builder`` appends nodes and constants; ``gradients`` is the driver and the value handles rules
are written with; ``rules`` holds one VJP rule per ONNX operator; ``zero_blocks`` moves zero
padding past row-wise operators. ``explainrt.export`` uses this to make a model explainable.
"""
