"""Command-line flags generated from typed dataclass configs.

Each field becomes `--field-name` with its type, default and, as help text, the docstring written
under the field. Booleans that default to True become `--no-field-name`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal right after each annotated field)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):  # each statement and the next
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):  # fmt: skip
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        help_ = f"{docs.get(f.name, '')} (default: {f.default})"
        if kind is bool:
            if f.default:
                parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name,
                                    action="store_false", help=docs.get(f.name))  # fmt: skip
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help=docs.get(f.name))
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=f.default, help=help_,
                                metavar=kind.__name__.upper())  # fmt: skip


def config_from_args(cls: type, args: argparse.Namespace, **overrides):
    values = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)
    }
    values.update(overrides)
    return cls(**values)
