"""A service's limits, each declared once as a dataclass field: its default, the flag that sets it
and the flag's help. The command line (``add_limit_arguments``), the config built from it
(``limits_from_args``), a worker's Info and the docs' limits table all derive from the declaration."""

from __future__ import annotations

import argparse
from dataclasses import Field, field, fields
from typing import Any, TypeVar

L = TypeVar("L")


def limit(default: float, flag: str, help: str) -> Any:
    """A limit's one declaration: its default, the flag that sets it and the flag's help."""
    return field(default=default, metadata={"flag": flag, "help": help})


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
        flag, default = declared.metadata["flag"], declared.default
        parser.add_argument(flag, type=type(default), default=default,
                            help=f"{declared.metadata['help']} (default {default:g})")


def limits_from_args(limits: type[L], args: argparse.Namespace, **others: Any) -> L:
    """The limits the parsed flags set (``others``: the fields not declared with a flag)."""
    return limits(**{f.name: getattr(args, limit_dest(f)) for f in declared_limits(limits)}, **others)


def declared_flags(limits: type[Any]) -> dict[str, Any]:
    """Each declared limit's flag and default (the docs' limits table is checked against this)."""
    return {f.metadata["flag"]: f.default for f in declared_limits(limits)}
