"""FGVis (Wagner et al., "Interpretable and Fine-Grained Visual Explanations for CNNs", CVPR 2019).

A mask m in [0, 1]^{C x H x W} per image is optimised by gradient descent on the runtime's
input gradients; the perturbed image is e = m * x + (1 - m) * baseline, and with the score
S_c(e) = log softmax(y(e))_c:

- preservation game: minimise lambda * ||m||_1 - S_c(e), from m = 1 (the image), for ``steps``
  steps, keeping the sparsest mask (least L1) under which c is still the prediction: the
  smallest evidence that suffices (an early stop "when the class holds" from m = 0 would stop at
  once, or never start, on models whose gradient vanishes at the baseline);
- deletion game: minimise lambda * ||1 - m||_1 + S_c(e), from m = 1 (the image), until the
  prediction is no longer c: the evidence whose removal flips the class.

dS/dm = dS/de * (x - baseline). That gradient is divided by its largest magnitude per image
(the paper's normalisation, which makes lambda a fraction of the strongest pixel's pull), the
sparsity gradient is added, and m takes a plain gradient step of size ``lr``, clipped to [0, 1]
(defaults: lambda 0.1, lr 0.1 to preserve; lambda 0, lr 1 to delete; 200 steps).
With ``defense`` (the paper's defence against adversarial evidence, on by default) a ReLU passes
the gradient only where 0 < activation(e) <= activation(x) (``session.defended_input_gradients``),
so the mask cannot create evidence the image does not hold.

Map: the mask averaged over channels (preservation) or the deleted part 1 - m (deletion).
Extras: ``mask`` [n, C, H, W], ``perturbed_classes`` (the prediction on e under that mask),
``steps`` (the gradient steps that led to it) and ``reached`` (whether the game's goal was met:
the class flipped, or held under a mask).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from explainrt.methods.base import Attribution, AttributionRequest, Method, resolve_targets, timed
from explainrt.methods.gradients import IMAGE_BASELINE, baselines
from explainrt.methods.options import Choice, Flag, Integer, Number, Option
from explainrt.progress import track
from explainrt.runtime.base import RunResult

log = logging.getLogger(__name__)

GAMES = ("preserve", "delete")
# Deletion stops at the first flip, which keeps it sparse; a sparsity weight there pushes every
# pixel weaker than lambda x the strongest back to 1, and on real models (EfficientNet-Lite0 on
# "coffee") the defended deletion then never flips: it defaults to lambda 0 and whole steps.
DEFAULT_LAMBDA = {"preserve": 0.1, "delete": 0.0}
DEFAULT_LR = {"preserve": 0.1, "delete": 1.0}
OBJECTIVE = "cross_entropy"  # -log softmax: its negated gradient is that of the score S_c


def _by_game(defaults: dict[str, float]) -> str:
    """A default per game, for the option's help: "None: 0.1 to preserve, 0 to delete"."""
    return "None: " + ", ".join(f"{value:g} to {game}" for game, value in defaults.items())


class FGVis(Method):
    """FGVis preservation and deletion masks, optimised on the runtime's (defended) input gradients."""

    name = "fgvis"
    class_targets_only = True
    summary = "FGVis (Wagner et al.): optimised preservation / deletion masks with the adversarial-evidence defence"
    options = (
        Option("game", Choice(GAMES), "preserve", "keep the smallest evidence for the class, or delete it until "
               "the class flips"),
        Option("lambda", Number(at_least=0), None, f"sparsity weight ({_by_game(DEFAULT_LAMBDA)})"),
        Option("steps", Integer(1), 200, "gradient steps at most"),
        Option("lr", Number(above=0), None, f"step size of the mask ({_by_game(DEFAULT_LR)})"),
        Option("baseline", IMAGE_BASELINE, 0.0, "what masked-out pixels show"),
        Option("defense", Flag(), True, "the defence against adversarial evidence (gradients only where "
               "0 < activation <= the image's)"),
    )

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The checked options, with ``lambda`` and ``lr`` left at None set to the chosen game's defaults."""
        checked = super().check_options(options)
        for name, by_game in (("lambda", DEFAULT_LAMBDA), ("lr", DEFAULT_LR)):
            if checked[name] is None:
                checked[name] = by_game[checked["game"]]
        return checked

    def compute(self, request: AttributionRequest) -> Attribution:
        options = request.options
        game, sparsity, steps, lr, defense = (options[name] for name in ("game", "lambda", "steps", "lr", "defense"))
        images = request.images
        base = baselines(options["baseline"], images)
        delta = images - base
        n, timings = images.shape[0], {"runtime": 0.0}

        def gradients(perturbed: np.ndarray, targets: np.ndarray, references: list[np.ndarray] | None
                      ) -> tuple[RunResult, list[np.ndarray]]:
            with timed(timings, "runtime"):
                if defense:
                    return request.session.defended_input_gradients(perturbed, targets[:, None], references, OBJECTIVE)
                return request.session.input_gradients(perturbed, targets[:, None], OBJECTIVE), []

        with timed(timings, "runtime"):
            if defense:
                first, references = request.session.defended_input_gradients(images, request.targets[:, None], None,
                                                                             OBJECTIVE)
                logits = first.logits
            else:
                logits, references = request.session.logits(images), []
        targets = resolve_targets(request.targets, logits)

        mask = np.ones(images.shape, dtype=np.float32)
        kept, kept_size = mask.copy(), np.full(n, np.inf)  # preservation: the sparsest mask that holds
        perturbed_classes = np.full(n, -1, dtype=np.int64)
        taken = np.full(n, steps, dtype=np.int64)
        reached = np.zeros(n, dtype=bool)
        active = np.arange(n)
        for step in track(range(steps + 1), f"fgvis {game}", unit="steps", enabled=request.progress, leave=False):
            request.check_cancelled()
            perturbed = base[active] + mask[active] * delta[active]
            result, _ = gradients(perturbed, targets[active], [r[active] for r in references] if defense else None)
            classes = result.logits.argmax(axis=1)
            if game == "delete":
                goal = classes != targets[active]
                perturbed_classes[active] = classes
                reached[active[goal]], taken[active[goal]] = True, step
            else:
                size = mask[active].sum(axis=(1, 2, 3))
                sparser = (classes == targets[active]) & (size < kept_size[active])
                chosen = active[sparser]
                kept[chosen], kept_size[chosen] = mask[chosen], size[sparser]
                reached[chosen], taken[chosen] = True, step
                perturbed_classes[active] = np.where(reached[active], targets[active], classes)
                goal = np.zeros(active.size, dtype=bool)
            active, score_gradient = active[~goal], -result.gradients[0][~goal, 0] * delta[active[~goal]]
            if step == steps or active.size == 0:
                break
            peak = np.abs(score_gradient).max(axis=(1, 2, 3), keepdims=True)
            pull = np.divide(score_gradient, peak, out=np.zeros_like(score_gradient), where=peak > 0)
            descent = sparsity - pull if game == "preserve" else pull - sparsity
            mask[active] = np.clip(mask[active] - lr * descent, 0.0, 1.0)
        if game == "preserve":
            mask = np.where(reached[:, None, None, None], kept, mask)
        for image in np.flatnonzero(~reached):
            log.warning("fgvis %s game: image %d did not %s class %d within %d steps", game, image,
                        "keep" if game == "preserve" else "flip", targets[image], steps)
        evidence = mask if game == "preserve" else 1.0 - mask
        extras = {"mask": mask, "perturbed_classes": perturbed_classes, "steps": taken, "reached": reached}
        return Attribution(evidence.mean(axis=1), logits, targets, timings, extras)


FGVIS_METHODS: tuple[Method, ...] = (FGVis(),)
