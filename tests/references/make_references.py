"""Write pytorch-grad-cam's maps for the compat parity cases too slow to recompute in every test run.

Score-CAM and Ablation-CAM in pytorch-grad-cam run the whole model once per channel of the target
layer (2048 passes for ResNet-50, 512 at 224x224 for VGG-16): minutes of CPU per case. Their maps
for the models and images that tests/test_compat.py builds (random weights and images under
``torch.manual_seed(0)``) are stored here as ``pytorch_grad_cam/<model>-<method>.npz`` with a
fingerprint of those inputs; the test compares explainrt against the stored maps, and refuses
(naming this script) when the fingerprint no longer matches. The same methods stay live on the
tiny nets of test_compat.py. Regenerate after changing the models, images or grad-cam version:

    python tests/references/make_references.py            # every stored case
    python tests/references/make_references.py resnet50    # the cases of one model
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
import time
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "pytorch_grad_cam"

log = logging.getLogger("make_references")


def main(argv: list[str]) -> int:
    """Regenerate the stored references (all, or those of the models named in ``argv``)."""
    sys.path.insert(0, str(TESTS))
    import test_compat

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    OUT.mkdir(exist_ok=True)
    wanted = set(argv) or {name for name, _ in test_compat.STORED}
    for name, method in test_compat.STORED:
        if name not in wanted:
            continue
        zoo = test_compat._build(name)
        tick = time.perf_counter()
        maps = test_compat._theirs(test_compat.METHODS[method], zoo, zoo.theirs())
        seconds = time.perf_counter() - tick
        path = OUT / f"{name}-{method}.npz"
        np.savez_compressed(path, maps=maps.astype(np.float32), fingerprint=test_compat.fingerprint(zoo),
                            grad_cam=importlib.metadata.version("grad-cam"))
        log.info("wrote %s (%d bytes; pytorch-grad-cam took %.1f s)", path, path.stat().st_size, seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
