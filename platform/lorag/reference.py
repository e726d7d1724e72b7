"""The config reference: every field of `LoragConfig` with its path, type, bounds, default and description.

`reference` walks the model tree (`lorag.config.LoragConfig` and its `lorag.sections`) and
`reference_markdown` renders it as docs/config.md, one table per section: what `lorag config`
prints, and `lorag config --markdown > docs/config.md` writes. Nothing here is written by hand:
a field's `Field(description=...)` is its one documentation.
"""

from __future__ import annotations

import json
import types
from typing import Any, Literal, NamedTuple, Union, get_args, get_origin

from pydantic import BaseModel

from lorag.config import LoragConfig, submodel


class ConfigField(NamedTuple):
    """One field of the reference, as `lorag config` and docs/config.md show it."""

    path: str  # dotted, `[]` for each list item: knowledge_bases[].chunking.size
    type: str
    default: str  # as JSON (valid YAML); "required" when there is none
    description: str


class ConfigSection(NamedTuple):
    """One model of the tree: its path, its docstring and its own fields (sections below it come after it)."""

    path: str  # "" for the top level
    doc: str
    fields: list[ConfigField]


def reference(model: type[BaseModel] = LoragConfig, path: str = "", defaults: BaseModel | None = None) -> list[ConfigSection]:
    """Every section of the config tree, parents first, each with its fields' paths, types, defaults and descriptions.

    Args:
        model, path: the section to start from and its path with a trailing dot (the whole tree by default).
        defaults: the section's default when its parent sets one (k8s.gpu_workers), so its fields show what applies.
    """
    fields, below = [], []
    for name, f in model.model_fields.items():
        if defaults is not None:
            value = getattr(defaults, name)
        else:
            value = None if f.is_required() else f.get_default(call_default_factory=True)
        fields.append(ConfigField(f"{path}{name}", _type_name(f.annotation) + _bounds(f), _default(value, f.is_required()), f.description or ""))
        if sub := submodel(f.annotation):
            below += reference(sub[0], f"{path}{name}{sub[1]}.", value if isinstance(value, BaseModel) else None)
    return [ConfigSection(path.rstrip("."), " ".join((model.__doc__ or "").split()), fields), *below]


def reference_markdown() -> str:
    """docs/config.md: the reference as one Markdown table per section."""
    out = [
        "# lorag.yaml reference",
        "",
        "_Generated from the models in `platform/lorag/config.py` and `platform/lorag/sections.py` by "
        "`lorag config --markdown > docs/config.md`; do not edit by hand (change a `Field(description=...)` and regenerate)._",
        "",
        "Paths are YAML nesting; `[]` stands for each item of a list, so `knowledge_bases[].chunking.size` is `size` under "
        "`chunking` of every knowledge base. On the command line `--set` addresses a list item by index or name: "
        "`--set knowledge_bases.handbook.chunking.size=256`. Defaults are JSON (which is YAML). Unknown keys are rejected.",
    ]
    for section in reference():
        out += ["", f"## `{section.path}`" if section.path else "## Top level", "", _md(section.doc), ""]
        out += ["| Field | Type | Default | Description |", "|---|---|---|---|"]
        out += [f"| `{f.path}` | `{_md(f.type, code=True)}` | `{_md(f.default, code=True)}` | {_md(f.description)} |" for f in section.fields]
    return "\n".join(out) + "\n"


def _type_name(annotation: Any) -> str:
    """A field's type in YAML's words: `int | null`, `"rrf" | "scores"`, `list[section]`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(map(_type_name, args))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(map(_type_name, args))}]"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(f: Any) -> str:
    """A field's constraints (ge, le, pattern, ...) as ` (>= 1, <= 512)`, or ""."""
    ops = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "min length"), ("pattern", "pattern"))
    found = [f"{op} {getattr(m, attr)}" for m in f.metadata for attr, op in ops if getattr(m, attr, None) is not None]
    return f" ({', '.join(found)})" if found else ""


def _default(value: Any, required: bool) -> str:
    """A default as JSON, which is also YAML."""
    if required:
        return "required"
    if isinstance(value, BaseModel):  # a section: what differs from its fields' own defaults
        value = value.model_dump(mode="json", exclude_defaults=True)
    return json.dumps(value)


def _md(text: str, code: bool = False) -> str:
    """Text for a Markdown table cell: pipes escaped, and '<' outside code spans too (else <workdir> reads as HTML)."""
    parts = text.replace("|", "\\|").split("`")
    return "`".join(p if code or i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))
