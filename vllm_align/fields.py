"""Configuration fields that carry their own command-line flag (stdlib only).

A dataclass field written ``option(default, "help")`` is the one place for its
default and its help: ``add_flags(parser, Config)`` adds one flag per such
field, and ``flag_values(Config, args)`` reads them back as constructor
keywords. Flag rules (``--name-with-dashes`` unless the metadata says
``flag``):

* a ``bool`` field defaulting to False is ``--flag`` (store_true); one
  defaulting to True is ``--no-flag`` (store_false);
* otherwise the flag's type follows the annotation (``int``, ``float``, else
  ``str``); a field without a default is a required flag.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, default_factory: Any = _MISSING,
           flag: str | None = None, metavar: str | None = None,
           choices: tuple | None = None, cli: bool = True, positional: bool = False,
           parse: Any = None) -> Any:
    """A dataclass field with its flag's help (and optionally its name, metavar, choices);
    ``cli=False`` keeps it off the command line, ``positional`` makes it a positional
    argument, ``parse`` is the flag's type when the annotation's would be wrong (the
    field's own validation may parse further)."""
    meta = {"help": help, "flag": flag, "metavar": metavar, "choices": choices, "cli": cli,
            "positional": positional, "parse": parse}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _cli_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli")]


def _kind(f: dataclasses.Field) -> type:
    if f.metadata.get("parse") is not None:
        return f.metadata["parse"]
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    for name, kind in (("bool", bool), ("float", float), ("int", int)):
        if name in text:
            return kind
    return str


def add_flags(parser: argparse.ArgumentParser, cls, *, prefix: str = "") -> None:
    """One flag per ``option`` field of ``cls``; ``dest`` is ``prefix + field name``."""
    for f in _cli_fields(cls):
        meta, kind = f.metadata, _kind(f)
        name = "--" + f.name.replace("_", "-")
        dest = prefix + f.name
        if meta.get("positional"):
            parser.add_argument(dest, type=kind, metavar=meta["metavar"], help=meta["help"])
            continue
        if kind is bool:
            on = f.default is not True
            parser.add_argument(meta["flag"] or (name if on else "--no-" + name[2:]), dest=dest,
                                action="store_true" if on else "store_false", help=meta["help"])
            continue
        required = f.default is _MISSING and f.default_factory is _MISSING
        kwargs: dict[str, Any] = {"dest": dest, "type": kind, "help": meta["help"]}
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
            kwargs["help"] += " (default: %(default)s)"
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        kwargs["metavar"] = meta["metavar"] or (None if meta["choices"] else
                                                {int: "N", float: "X"}.get(kind))
        parser.add_argument(meta["flag"] or name, **kwargs)


def flag_values(cls, args: argparse.Namespace, *, prefix: str = "") -> dict[str, Any]:
    """``{field name: parsed value}`` for ``cls``'s ``option`` fields (see ``add_flags``)."""
    return {f.name: getattr(args, prefix + f.name) for f in _cli_fields(cls)}
