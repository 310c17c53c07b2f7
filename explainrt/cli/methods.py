"""``explainrt methods``: the explanation methods with a one-line summary."""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    """Add ``methods`` to the CLI's subcommands."""
    verbose = parents["verbose"]
    methods = commands.add_parser("methods", parents=[verbose], help="list the explanation methods")
    methods.set_defaults(run=_methods)



def _methods(args: argparse.Namespace) -> int:
    from explainrt.methods import METHODS

    width = max(map(len, METHODS))
    for name, method in METHODS.items():
        print(f"{name:<{width}}  {method.summary}")
    return 0
