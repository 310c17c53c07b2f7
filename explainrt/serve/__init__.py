"""``explainrt serve``: explanations over HTTP (KServe V1, Open Inference Protocol V2, a web page).

``create_app(explainers)`` builds the ASGI app; ``explainrt.serve.cli`` adds the subcommand.
"""

from explainrt.serve.app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]
