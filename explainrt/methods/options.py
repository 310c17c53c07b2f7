"""Method options, declared once: name, kind of value, default, allowed values and help.

Each method lists its ``Option``s (``Method.options``). From that one declaration come the API's
validation (``Method.check_options``: clear errors, defaults filled in), the command line's text
forms (``Option.parse_text``, ``parse_text_options``) and help (``option_help``), the server's
option listing (``Option.describe``) and README.md's method table (``markdown_table``).

A ``Kind`` says which values an option takes, checks and normalises them (tuples, NumPy arrays,
plain Python numbers), reads them from command-line text and describes them. ``OneOf`` joins
kinds for options that take several forms (a number, "blur" or an array). Checks that need the
model or the images (a class index below the model's class count, a baseline of the images'
shape) stay with the methods.
"""

from __future__ import annotations

import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

from explainrt.errors import InvalidInputError

TABLE_START = "<!-- methods:start -->"
TABLE_END = "<!-- methods:end -->"
"""The markers around README.md's generated method table."""


class Rejected(ValueError):
    """A value a kind does not take; the message, if any, says why when the kind's description does not."""


class Kind(ABC):
    """Which values an option takes: checked and normalised, read from text, described."""

    type_name: ClassVar[str]

    @abstractmethod
    def expected(self) -> str:
        """What the kind takes, as a phrase for errors, help and the README ("an integer >= 1")."""

    @abstractmethod
    def check(self, value: Any) -> Any:
        """``value`` normalised, or Rejected. Checking a normalised value returns it unchanged."""

    def alternative(self) -> str:
        """The phrase as one form among others (``OneOf``); ``expected`` by default."""
        return self.expected()

    def from_text(self, text: str) -> Any:
        """The value command-line ``text`` stands for (checked afterwards), or Rejected; JSON by default."""
        return converted(json.loads, text)

    def limits(self) -> dict[str, Any]:
        """Bounds or choices as JSON for the server's listing (none by default)."""
        return {}


def converted(convert: Callable[[str], Any], text: str) -> Any:
    """``convert(text)``, or Rejected where the text is not of that form."""
    try:
        return convert(text)
    except (ValueError, KeyError):
        raise Rejected() from None


def _is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _array(value: Any) -> np.ndarray:
    """``value`` as a NumPy array (strings, dicts and callables give arrays of no numeric kind), or Rejected."""
    try:
        return np.asarray(value)
    except (ValueError, TypeError):  # ragged nested lists
        raise Rejected() from None


def _text_integers(text: str) -> list[int]:
    """The integers of "16", "32,32", "[32, 32]" or "(3, 8, 8)", or Rejected."""
    try:
        return [int(item) for item in text.strip().strip("[]()").split(",")]
    except ValueError:
        raise Rejected() from None


@dataclass(frozen=True)
class Integer(Kind):
    """An integer in ``low``..``high`` (no upper bound when None)."""

    low: int = 1
    high: int | None = None
    type_name: ClassVar[str] = "int"

    def expected(self) -> str:
        return f"an integer {'>= ' + str(self.low) if self.high is None else f'in {self.low}..{_power(self.high)}'}"

    def check(self, value: Any) -> int:
        if not _is_integer(value) or value < self.low or (self.high is not None and value > self.high):
            raise Rejected()
        return int(value)

    def from_text(self, text: str) -> int:
        return converted(int, text)

    def limits(self) -> dict[str, Any]:
        return {"minimum": self.low} if self.high is None else {"minimum": self.low, "maximum": self.high}


def _power(bound: int) -> str:
    """A large bound 2^k - 1 written so ("2^64 - 1"), others as they are."""
    bits = (bound + 1).bit_length() - 1
    return f"2^{bits} - 1" if bits > 16 and bound + 1 == 2**bits else str(bound)


@dataclass(frozen=True)
class Number(Kind):
    """A finite number, optionally > ``above`` or >= ``at_least``, and < ``below``."""

    above: float | None = None
    at_least: float | None = None
    below: float | None = None
    type_name: ClassVar[str] = "float"

    def expected(self) -> str:
        low = self.above if self.above is not None else self.at_least
        if low is not None and self.below is not None:
            bound = f" in {'(' if self.above is not None else '['}{low:g}, {self.below:g})"
        elif low is not None:
            bound = f" {'>' if self.above is not None else '>='} {low:g}"
        else:
            bound = "" if self.below is None else f" < {self.below:g}"
        return "a finite number" + bound

    def check(self, value: Any) -> float:
        if not _is_number(value) or not math.isfinite(value) or (self.above is not None and not value > self.above) \
                or (self.at_least is not None and not value >= self.at_least) \
                or (self.below is not None and not value < self.below):
            raise Rejected()
        return float(value)

    def from_text(self, text: str) -> float:
        return converted(float, text)

    def limits(self) -> dict[str, Any]:
        limits: dict[str, Any] = {}
        if self.above is not None or self.at_least is not None:
            limits["minimum"] = self.above if self.above is not None else self.at_least
            limits["minimum_exclusive"] = self.above is not None
        if self.below is not None:
            limits |= {"maximum": self.below, "maximum_exclusive": True}
        return limits


@dataclass(frozen=True)
class Flag(Kind):
    """True or False (text: true / false)."""

    type_name: ClassVar[str] = "bool"

    def expected(self) -> str:
        return "True or False"

    def check(self, value: Any) -> bool:
        if not isinstance(value, (bool, np.bool_)):
            raise Rejected()
        return bool(value)

    def from_text(self, text: str) -> bool:
        return converted({"true": True, "false": False}.__getitem__, text.strip().lower())


@dataclass(frozen=True)
class Choice(Kind):
    """One of a few names (or True / False, for switches that also take a name such as "auto")."""

    values: tuple[str | bool, ...]

    @property
    def type_name(self) -> str:  # type: ignore[override]
        return "str" if all(isinstance(v, str) for v in self.values) else "str or bool"

    def expected(self) -> str:
        return self.alternative() if len(self.values) == 1 else f"one of {self.alternative()}"

    def alternative(self) -> str:
        return ", ".join(repr(v) for v in self.values)

    def check(self, value: Any) -> str | bool:
        for choice in self.values:
            if isinstance(choice, bool) and isinstance(value, (bool, np.bool_)) and bool(value) == choice:
                return choice
            if isinstance(choice, str) and isinstance(value, str) and value == choice:
                return choice
        raise Rejected()

    def from_text(self, text: str) -> Any:
        if text.startswith('"'):
            return super().from_text(text)
        for choice in self.values:
            if text == (choice if isinstance(choice, str) else json.dumps(choice)):
                return choice
        return text

    def limits(self) -> dict[str, Any]:
        return {"choices": list(self.values)}


@dataclass(frozen=True)
class Size(Kind):
    """A window size: an integer (h = w) or (h, w) or (c, h, w), every size >= 1; normalised to a tuple."""

    type_name: ClassVar[str] = "size"

    def expected(self) -> str:
        return "an integer, (h, w) or (c, h, w) of integers >= 1"

    def check(self, value: Any) -> tuple[int, ...]:
        items = (value, value) if _is_integer(value) else value
        if not isinstance(items, (list, tuple, np.ndarray)) or len(items) not in (2, 3) \
                or not all(_is_integer(item) and item >= 1 for item in items):
            raise Rejected()
        return tuple(int(item) for item in items)

    def from_text(self, text: str) -> int | list[int]:
        items = _text_integers(text)
        return items[0] if len(items) == 1 else items


@dataclass(frozen=True)
class ClassIndex(Kind):
    """A class index (-k: the k-th most likely), or one per image (normalised to int64 [N])."""

    type_name: ClassVar[str] = "class"

    def expected(self) -> str:
        return "a class index (-k: the k-th most likely) or one per image"

    def check(self, value: Any) -> int | np.ndarray:
        if _is_integer(value):
            return int(value)
        values = _array(value)
        if values.ndim != 1 or values.size == 0 or values.dtype.kind not in "iu":
            raise Rejected()
        return values.astype(np.int64)

    def from_text(self, text: str) -> int | list[int]:
        items = _text_integers(text)
        return items[0] if len(items) == 1 and not text.strip().startswith("[") else items


@dataclass(frozen=True)
class Array(Kind):
    """A NumPy array (or nested lists) of ``ndims`` dimensions: numbers (finite), or integers with ``integer``."""

    shape: str  # how the axes read in help, e.g. "[C, H, W]"
    ndims: tuple[int, ...]
    integer: bool = False
    type_name: ClassVar[str] = "array"

    def expected(self) -> str:
        return f"{'an integer' if self.integer else 'a numeric'} array {self.shape}"

    def check(self, value: Any) -> np.ndarray:
        array = _array(value)
        if array.ndim not in self.ndims or array.dtype.kind not in ("iu" if self.integer else "iuf"):
            raise Rejected()
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise Rejected("it holds NaN or inf")
        return array


@dataclass(frozen=True)
class Parameters(Kind):
    """A dict (a JSON object) of named settings, checked by ``validate`` (Rejected with the reason)."""

    description: str
    validate: Callable[[dict[str, Any]], None]
    type_name: ClassVar[str] = "dict"

    def expected(self) -> str:
        return self.description

    def check(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise Rejected()
        value = dict(value)
        self.validate(value)
        return value


@dataclass(frozen=True)
class Function(Kind):
    """A Python callable (the API only: it has no text or JSON form)."""

    signature: str
    type_name: ClassVar[str] = "callable"

    def expected(self) -> str:
        return f"a function {self.signature}"

    def check(self, value: Any) -> Callable[..., Any]:
        if not callable(value):
            raise Rejected()
        return value

    def from_text(self, text: str) -> Any:
        raise Rejected("a function has no text form")


@dataclass(frozen=True)
class Images(Kind):
    """Images, one or one per image, in any form ``Explainer.prepare`` takes (text: a file); it checks them."""

    type_name: ClassVar[str] = "image"

    def expected(self) -> str:
        return "an image or one per image (files, PIL images or arrays)"

    def check(self, value: Any) -> Any:
        return value

    def from_text(self, text: str) -> str:
        return text


@dataclass(frozen=True)
class OneOf(Kind):
    """The first of ``kinds`` that takes the value: options with several forms, declared once."""

    kinds: tuple[Kind, ...]

    @property
    def type_name(self) -> str:  # type: ignore[override]
        return " or ".join(dict.fromkeys(kind.type_name for kind in self.kinds))

    def expected(self) -> str:
        phrases = [kind.alternative() for kind in self.kinds]
        return f"{', '.join(phrases[:-1])} or {phrases[-1]}"

    def check(self, value: Any) -> Any:
        reasons = []
        for kind in self.kinds:
            try:
                return kind.check(value)
            except Rejected as rejected:
                reasons.append(str(rejected))
        raise Rejected("; ".join(reason for reason in reasons if reason))

    def from_text(self, text: str) -> Any:
        for kind in self.kinds:
            try:
                return kind.check(kind.from_text(text))
            except Rejected:
                continue
        raise Rejected()

    def limits(self) -> dict[str, Any]:
        return {"any_of": [{"type": kind.type_name, **kind.limits()} for kind in self.kinds]}


@dataclass(frozen=True)
class Option:
    """One method option: its kind of value, the default the method uses, one line of help.

    ``per_image``: the value may be one per image (the pipeline slices it per chunk);
    ``image``: the value is images (the pipeline preprocesses them). A None default means the
    option may be left out (or given as None); the help says what the method does then.
    """

    name: str
    kind: Kind
    default: Any
    help: str
    per_image: bool = False
    image: bool = False

    def allowed(self) -> str:
        """What the option takes, as a phrase ("an integer >= 1", "... or None")."""
        return self.kind.expected() + (" or None" if self.default is None else "")

    def parse(self, value: Any, method: str | None = None) -> Any:
        """``value`` validated and normalised; InvalidInputError naming method, option, value and what is allowed."""
        if value is None and self.default is None:
            return None
        try:
            return self.kind.check(value)
        except Rejected as rejected:
            raise self._error(method, _shown(value), str(rejected)) from None

    def parse_text(self, text: str, method: str | None = None) -> Any:
        """The value command-line ``text`` gives: ``32,32`` or JSON ``[32,32]``, ``true``, a name, a number."""
        try:
            value = self.kind.from_text(text)
        except Rejected as rejected:
            raise self._error(method, repr(text), str(rejected)) from None
        return self.parse(value, method)

    def describe(self) -> dict[str, Any]:
        """The option as JSON (the server's method listing): name, type, default, allowed values, help."""
        return {"name": self.name, "type": self.kind.type_name, "default": _jsonable(self.default),
                "allowed": self.allowed(), **self.kind.limits(), "help": self.help, "per_image": self.per_image,
                "image": self.image}

    def _error(self, method: str | None, shown: str, reason: str) -> InvalidInputError:
        where = f"method {method!r}: " if method else ""
        why = f" ({reason})" if reason else ""
        return InvalidInputError(f"{where}{self.name} must be {self.allowed()}, got {shown}{why}")


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _shown(value: Any) -> str:
    """A given value for an error message, arrays by dtype and shape, long reprs cut."""
    if isinstance(value, np.ndarray) and value.ndim > 0:
        return f"a {value.dtype} array of shape {value.shape}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- command line ---------------------------------------------------------------------------------
class Declares(Protocol):
    """What the functions below need of a method (``explainrt.methods.base.Method``, which imports this module)."""

    name: str
    summary: str
    options: tuple[Option, ...]

    def option(self, name: str) -> Option: ...


def parse_text_options(method: Declares, pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """The options given on the command line as (name, text) pairs, each parsed by its declaration.

    Unknown names raise the same InvalidInputError as ``Method.check_options``; the result holds
    only the given options (``check_options`` fills in the defaults).
    """
    return {name: method.option(name).parse_text(text, method.name) for name, text in pairs}


def option_help(method: Declares) -> list[str]:
    """Plain-text help of a method's options, one line each, for ``explainrt methods NAME`` and ``--help``."""
    if not method.options:
        return ["no options"]
    width = max(len(option.name) for option in method.options)
    return [f"{option.name:<{width}}  {option.help}. Default {option.default!r}; accepts {option.allowed()}."
            for option in method.options]


# -- README ----------------------------------------------------------------------------------------
def markdown_table(methods: Iterable[Declares]) -> str:
    """The Markdown table of ``methods`` and their options: type, default, allowed values, help."""
    rows = ["| method | option | type | default | accepts | description |", "| --- | --- | --- | --- | --- | --- |"]
    for method in methods:
        rows.append(f"| `{method.name}` | {'' if method.options else 'none'} | | | | {_cell(method.summary)} |")
        rows.extend(f"| | `{o.name}` | {o.kind.type_name} | `{o.default!r}` | {_cell(o.allowed())} | "
                    f"{_cell(o.help)} |" for o in method.options)
    return "\n".join(rows) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def replace_table(text: str, table: str) -> str:
    """``text`` (README.md) with the lines between the table markers replaced by ``table``, indented as they are."""
    pattern = re.compile(rf"^([ \t]*){re.escape(TABLE_START)}\n.*?^[ \t]*{re.escape(TABLE_END)}$",
                         re.MULTILINE | re.DOTALL)
    found = pattern.search(text)
    if found is None:
        raise InvalidInputError(f"no {TABLE_START} ... {TABLE_END} section to replace")
    indent = found.group(1)
    lines = [indent + line for line in table.splitlines()]
    section = "\n".join([indent + TABLE_START, *lines, indent + TABLE_END])
    return text[: found.start()] + section + text[found.end():]
