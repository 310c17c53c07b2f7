"""``explainrt methods [NAME]``: the explanation methods with a one-line summary, or one method's options."""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    """Add ``methods`` to the CLI's subcommands."""
    methods = commands.add_parser("methods", parents=[parents["verbose"]],
                                  help="list the explanation methods, or one method's options")
    methods.add_argument("name", nargs="?", metavar="NAME", help="a method: list its options (-O KEY=VALUE)")
    methods.set_defaults(run=_methods)


def _methods(args: argparse.Namespace) -> int:
    from explainrt.methods import METHODS, get_method, option_help

    if args.name is not None:
        method = get_method(args.name)
        print(f"{method.name}: {method.summary}")
        for line in option_help(method):
            print(f"  {line}")
        return 0
    width = max(map(len, METHODS))
    for name, method in METHODS.items():
        print(f"{name:<{width}}  {method.summary}")
    return 0
