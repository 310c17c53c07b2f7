"""The ``explainrt`` command line: one module per subcommand, all sharing ``common``.

Every error explainrt raises on purpose (``ExplainrtError``) and every OS error is reported as
one line ``explainrt: error: <message>`` on stderr with exit status 2, without a traceback
(``-vv`` logs it).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import sys
from collections.abc import Sequence

from explainrt.cli.common import EXIT_ERROR, configure_logging, parent_parsers
from explainrt.errors import ExplainrtError

log = logging.getLogger(__name__)

COMMAND_MODULES: tuple[str, ...] = ("export", "explain", "methods", "check_trt", "serve", "evaluate", "batch")
"""Modules of ``explainrt.cli`` that add subcommands: each has ``register(commands, parents)`` where
``parents`` maps "verbose", "model" and "runtime" to the shared argument parsers; a subcommand sets
``run`` (args -> exit status)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="explainrt",
        description="Explain image classifiers with Grad-CAM and friends, computed inside the ONNX graph.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log progress as lines when the output is not a terminal (-vv: debug, with tracebacks)")
    parser.add_argument("-q", "--quiet", action="store_true", help="show no progress bars or progress lines")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parents = parent_parsers()
    for module in COMMAND_MODULES:
        importlib.import_module(f"explainrt.cli.{module}").register(commands, parents)
    for command in commands.choices.values():  # unknown arguments are reported with the subcommand's usage
        command.set_defaults(command_parser=command)
        command.formatter_class = DefaultsHelpFormatter
    return parser


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that states every option's default: "(default: X)" is added where the text does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if ("default" in text or action.default in (None, False, argparse.SUPPRESS) or action.nargs == 0
                or not action.option_strings or text == argparse.SUPPRESS):
            return action.help
        return f"{text} (default: %(default)s)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 2 bad input or usage)."""
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            _unknown_arguments(args.command_parser, unknown)
    except SystemExit as exit_:  # usage errors and --help
        return exit_.code if isinstance(exit_.code, int) else EXIT_ERROR
    configure_logging(args.verbose, args.quiet)
    try:
        return args.run(args)
    except (ExplainrtError, OSError) as error:
        log.debug("traceback of the error below", exc_info=True)
        print(f"explainrt: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("explainrt: interrupted", file=sys.stderr)
        return 130


def _unknown_arguments(command: argparse.ArgumentParser, unknown: list[str]) -> None:
    """Exit with the subcommand's usage, naming the arguments it does not take and the closest it does."""
    known = [option for action in command._actions for option in action.option_strings]
    close = difflib.get_close_matches(unknown[0].split("=")[0], known, n=2)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    command.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
