"""A service's limits, each declared once as a dataclass field: its default, the flag that sets it,
the flag's help and the values it accepts (``Range``). The command line (``add_limit_arguments``),
the config built from it (``limits_from_args``), a worker's Info and the docs' limits table all
derive from the declaration. The services' other numeric flags take their range the same way
(``Checked``); ``OneLineErrorParser`` refuses a bad value in one line naming the flag and the range."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields, replace
from typing import Any, Generic, NoReturn, TypeVar

L = TypeVar("L")
T = TypeVar("T")

INT32_MAX = 2**31 - 1  # the wire's int32 fields (Info's limits, a request's k and lengths)


@dataclass(frozen=True)
class Range:
    """The values a flag accepts: finite numbers from ``low`` to ``high`` (None: unbounded), ``low``
    itself excluded when ``low_open``; and 0 as well where ``zero`` says what 0 means (e.g. "off")."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    zero: str = ""

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):  # nan passes every comparison as False; inf is never meant here
            return False
        if self.zero and value == 0:
            return True
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            bounds = f"in {'(' if self.low_open else '['}{low}, {high}]"
        elif self.low is not None:
            bounds = f"{'>' if self.low_open else '>='} {low}"
        else:
            bounds = f"<= {high}" if self.high is not None else "finite"
        return f"0 ({self.zero}) or {bounds}" if self.zero else bounds

    def or_zero(self, meaning: str = "off") -> Range:
        """The same range, and 0 with its own ``meaning``."""
        return replace(self, zero=meaning)


def at_least(low: float, high: float | None = None) -> Range:
    return Range(low, high)


def above(low: float, high: float | None = None) -> Range:
    return Range(low, high, low_open=True)


def _number(value: float | None) -> str:
    """A bound for a person: 2^31-1 rather than 2147483647 (from 2^20 up), else as written."""
    if value is None:
        return ""
    if not float(value).is_integer():
        return f"{value:g}"
    whole = int(value)
    for power in range(20, 64):
        if whole in (2**power, 2**power - 1):
            return f"2^{power}" if whole == 2**power else f"2^{power}-1"
    return str(whole)


def limit(default: float, flag: str, help: str, parse: Callable[[str], Any] | None = None,
          valid: Range | None = None) -> Any:
    """A limit's one declaration: its default, the flag that sets it and the flag's help (``parse``:
    how the flag's text becomes the value, raising ValueError for garbage; default: the default's
    type; ``valid``: the values the flag accepts, refused otherwise at start-up)."""
    return field(default=default, metadata={"flag": flag, "help": help, "parse": parse, "valid": valid})


@dataclass(frozen=True)
class Checked(Generic[T]):
    """An argparse ``type``: the flag's text parsed (``int``, ``float`` or a parser raising ValueError)
    and refused outside ``valid`` with a message naming the range; argparse adds the flag."""

    parse: Callable[[str], T]
    valid: Range

    def __call__(self, text: str) -> T:
        kind = {int: "an integer ", float: "a number "}.get(self.parse, "")  # type: ignore[call-overload]
        try:
            value = self.parse(text)
        except ValueError as error:
            message = f"must be {kind}{self.valid} (got {text!r})" if kind else str(error)
            raise argparse.ArgumentTypeError(message) from None
        if value not in self.valid:
            finite = "" if math.isfinite(value) else "a finite number "  # type: ignore[arg-type]
            raise argparse.ArgumentTypeError(f"must be {finite}{self.valid} (got {text})")
        return value


class OneLineErrorParser(argparse.ArgumentParser):
    """A service's argument parser: a bad flag is one line (``specdec-draft: error: --max-sessions:
    must be >= 1 (got 0)``) and exit status 2, with no usage block to scroll past in a service log."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message.removeprefix('argument ')}\n")


def limit_dest(declared: Field[Any]) -> str:
    """The argparse attribute of a declared limit's flag."""
    return declared.metadata["flag"].lstrip("-").replace("-", "_")


def declared_limits(limits: type[Any]) -> list[Field[Any]]:
    """The fields declared with ``limit`` (not a setting whose flag has another shape, e.g.
    --no-pipeline, added by hand)."""
    return [f for f in fields(limits) if "flag" in f.metadata]


def add_limit_arguments(parser: argparse.ArgumentParser, limits: type[Any]) -> None:
    """One flag per declared limit, typed and defaulted from the declaration."""
    for declared in declared_limits(limits):
        flag, default, parse = declared.metadata["flag"], declared.default, declared.metadata.get("parse")
        valid = declared.metadata.get("valid")
        if valid is not None:
            kind: Callable[[str], Any] = Checked(parse or type(default), valid)
        else:
            kind = _reporting(parse) if parse else type(default)
        parser.add_argument(flag, type=kind, default=default,
                            help=f"{declared.metadata['help']} (default {default:g}; {valid or 'any'})")


def _reporting(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` for argparse, whose usage error then carries its ValueError's message."""

    def parsed(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return parsed


def limits_from_args(limits: type[L], args: argparse.Namespace, **others: Any) -> L:
    """The limits the parsed flags set (``others``: the fields not declared with a flag)."""
    return limits(**{f.name: getattr(args, limit_dest(f)) for f in declared_limits(limits)}, **others)


def declared_flags(limits: type[Any]) -> dict[str, Any]:
    """Each declared limit's flag and default (the docs' limits table is checked against this)."""
    return {f.metadata["flag"]: f.default for f in declared_limits(limits)}


def declared_ranges(limits: type[Any]) -> dict[str, Range | None]:
    """Each declared limit's flag and the values it accepts (None: not declared)."""
    return {f.metadata["flag"]: f.metadata.get("valid") for f in declared_limits(limits)}
