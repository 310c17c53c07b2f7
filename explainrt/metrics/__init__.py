"""Faithfulness metrics for saliency maps: does a map point at what the model uses?

- ``curves``: deletion and insertion AUC (RISE);
- ``pointing``: the pointing game and the energy-based pointing game, on object boxes;
- ``road``: ROAD's MoRF / LeRF curves with noisy linear imputation;
- ``sanity``: Adebayo's cascading model-parameter randomisation on any ONNX model;
- ``pasted``: a seeded data set of scikit-image objects pasted onto textures, with their boxes;
- ``evaluate`` / ``plot``: a method x metric table and the curves as PNG (``explainrt evaluate``).
"""

from explainrt.metrics.curves import CausalCurves, blur, causal_curves, trapezoid_auc
from explainrt.metrics.evaluate import METRICS, Evaluation, evaluate, object_targets
from explainrt.metrics.pasted import PastedSample, input_box, pasted_dataset
from explainrt.metrics.plot import curves_png, plot_curves
from explainrt.metrics.pointing import energy_pointing_game, pointing_game
from explainrt.metrics.road import RoadCurves, noisy_linear_impute, road_curves
from explainrt.metrics.sanity import SanityResult, cascading_randomization, randomized_model, weighted_nodes

__all__ = ["METRICS", "CausalCurves", "Evaluation", "PastedSample", "RoadCurves", "SanityResult", "blur",
           "cascading_randomization", "causal_curves", "curves_png", "energy_pointing_game", "evaluate", "input_box",
           "noisy_linear_impute", "object_targets", "pasted_dataset", "plot_curves", "pointing_game", "randomized_model",
           "road_curves", "trapezoid_auc", "weighted_nodes"]
