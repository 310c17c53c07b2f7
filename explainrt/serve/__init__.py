"""``explainrt serve``: explanations over HTTP (KServe V1, Open Inference Protocol V2, a web page).

``explainrt.serve.app.create_app(explainers)`` builds the ASGI app (needs the ``serve`` extra:
FastAPI, uvicorn); ``explainrt.cli.serve`` adds the subcommand without importing them, so the
rest of the command line works without that extra.
"""
