"""Every config key with its type, default and documentation, for ``train.py --help-config`` and
``toolkit config``.

The documentation is the string literal under each dataclass field in ``toolkit/config.py``, read from
the module's source with ``ast`` (Python keeps no such attribute docstrings at run time), so the help
never drifts from the code and nothing is written twice.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from functools import cache

from toolkit.config import Config, ConfigError

SECTION_SUMMARIES = {
    "run": "the run's name and directory",
    "batch": "the global batch (samples per optimizer step) and the micro-batch per process",
    "data": "where samples come from (stdlib source, a uint16 token file, synthetic), sequence length, validation split",
    "model": "the built-in GPT: a size preset and the fields that override it",
    "optim": "AdamW, gradient clipping and the learning-rate schedule (counted in samples)",
    "train": "steps, log and validation intervals, device, precision, what a NaN/Inf does",
    "checkpoint": "how often checkpoints are written, how many are kept, and resuming",
    "deepspeed": "the ZeRO stage, CPU offload and a DeepSpeed JSON to start from",
    "tracking": "Weights & Biases (offline without an account) and the gradient noise scale",
}
"""One line per section of ``Config`` that has no docstring of its own (a top-level key such as ``seed``
is described by its field's docstring)."""


@dataclasses.dataclass(frozen=True)
class Key:
    """One leaf of the config: ``batch.global_size``."""

    name: str
    """Dotted name, as written in overrides."""
    type: str
    """The annotation as written in config.py (``int | None``)."""
    default: object
    """The typed default (the dataclass's, not that of a YAML file)."""
    doc: str
    """The field's docstring, dedented; empty if it has none."""


@cache
def attribute_docs(obj) -> dict[str, str]:
    """The string literals directly under the assignments of a class or module body: ``{name: doc}``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    body = tree.body[0].body if inspect.isclass(obj) else tree.body
    docs = {}
    for stmt, following in zip(body, body[1:], strict=False):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            names = [stmt.target.id]
        elif isinstance(stmt, ast.Assign):
            names = [t.id for t in stmt.targets if isinstance(t, ast.Name)]
        else:
            continue
        if (isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            for name in names:
                docs[name] = inspect.cleandoc(following.value.value)
    return docs


TYPE_SHOWN = {"batch.global_size": "int | full", "batch.micro_size": "int | auto | None"}
"""Keys whose annotation is wider than what they accept (``int | str``: a number, or the word ``full`` / ``auto``)."""


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _section_class(f: dataclasses.Field):
    factory = f.default_factory
    return factory if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory) else None


def keys(cls=Config, prefix: str = "") -> list[Key]:
    """Every leaf key of ``cls``, in declaration order, nested sections flattened to dotted names."""
    docs = attribute_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        nested = _section_class(f)
        if nested is not None:
            out.extend(keys(nested, f"{prefix}{f.name}."))
        else:
            type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            type_name = TYPE_SHOWN.get(f"{prefix}{f.name}", type_name)
            out.append(Key(f"{prefix}{f.name}", type_name, _default(f), docs.get(f.name, "")))
    return out


def sections() -> dict[str, str]:
    """The top-level names of ``Config`` (sections and top-level keys such as ``seed``) with one line each."""
    docs = attribute_docs(Config)
    out = {}
    for f in dataclasses.fields(Config):
        if f.name in SECTION_SUMMARIES:
            out[f.name] = SECTION_SUMMARIES[f.name]
        else:  # a top-level key: the first paragraph of its docstring, in the summaries' lower case
            first = " ".join(docs.get(f.name, "").split("\n\n")[0].split()).rstrip(".")
            out[f.name] = first[:1].lower() + first[1:]
    return out


def show(value) -> str:
    """A value as it would be written in a YAML file or an override (``null``, ``true``, ``[]``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return repr(value)


def select(names: list[str] | tuple[str, ...] = ()) -> list[Key]:
    """The keys of the named sections (``batch``) or single keys (``batch.global_size``); all for none.
    An unknown name raises ConfigError naming the valid ones."""
    every = keys()
    if not names:
        return every
    chosen = []
    for name in names:
        top = name.split(".")[0]
        if top not in sections():
            raise ConfigError(f"unknown config section '{name}'; valid sections: {', '.join(sections())}")
        match = [k for k in every if k.name == name or k.name.startswith(name + ".")]
        if not match:
            valid = ", ".join(k.name for k in every if k.name.startswith(top + "."))
            raise ConfigError(f"unknown config key '{name}'; valid keys here: {valid}")
        chosen.extend(k for k in match if k not in chosen)
    return chosen


def _value(cfg: Config, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def describe(names: list[str] | tuple[str, ...] = (), cfg: Config | None = None, source: str = "") -> str:
    """Every selected key as ``section.key: type = default``, its docstring indented below. With ``cfg``
    (a resolved config; ``source`` says where it came from) each key line also shows ``-> value``, and
    ``*`` marks a value that differs from the default."""
    chosen = select(names)
    lines = ["# Every key: `section.key: type = default`, then its documentation (from toolkit/config.py).",
             "# Set one in a YAML file (--config FILE) or on the command line: section.key=value."]
    if cfg is None:
        lines.append("# These are the typed defaults; a run without --config reads configs/tiny.yaml over them:")
        lines.append("# `toolkit config --config FILE [key=value ...]` shows the values a run would use.")
    else:
        lines.append(f"# `-> value`: the value resolved from {source or 'the config'}; `*` where it differs "
                     f"from the default.")
    heads = [(k, f"{k.name}: {k.type} = {show(k.default)}") for k in chosen]
    width = max(len(head) for _, head in heads)
    summaries = sections()
    section = None
    for key, head in heads:
        top = key.name.split(".")[0]
        if top != section and "." in key.name:
            lines.append("")
            lines.append(f"# {top}: {summaries[top]}")
        elif top != section:
            lines.append("")
        section = top
        if cfg is not None:
            value = _value(cfg, key.name)
            head = f"{head:<{width}}  -> {show(value)}" + ("  *" if value != key.default else "")
        lines.append(head)
        if key.doc:
            lines.append(textwrap.indent(key.doc, "    "))
    return "\n".join(lines)
