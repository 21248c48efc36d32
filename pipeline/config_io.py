"""Text in and out of the config models: YAML files, ``key=value`` overrides, one-line errors.

Nothing here knows the config's sections: every function takes the pydantic model class it works on
(``pipeline.config.Config``, or ``pipeline.search_space.TuneSettings``), so the schema in
:mod:`pipeline.config` reads as the config reference, and the tune YAML reuses the same parsing and errors.
Import these names from :mod:`pipeline.config`, which re-exports them.
"""
from __future__ import annotations

import functools
import re
import typing
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError


class ConfigError(ValueError):
    """A bad configuration: the message is one line and starts with the offending key."""


class KeyedError(ValueError):
    """Raised inside validators: ``key`` is relative to the model that raised it."""

    def __init__(self, key: str, msg: str):
        super().__init__(f"{key}: {msg}")
        self.key, self.msg = key, msg


def section_type(cls: type[BaseModel], name: str) -> Optional[type[BaseModel]]:
    """The model class of field ``name`` when it is a section, else None."""
    f = cls.model_fields.get(name)
    tp = f.annotation if f is not None else None
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


# --------------------------------------------------------------------------- YAML

class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: ``3e-4`` (no dot) is a float, as in every other YAML
    and JSON reader, not the string PyYAML's YAML 1.1 rules make of it."""


class _Dumper(yaml.SafeDumper):
    """The matching writer: a string such as ``"1e5"`` is quoted, so it reads back as a string."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                               list("-+0123456789"))


def yaml_dump(obj: Any) -> str:
    """YAML text that :func:`yaml_load` reads back equal (keys in their order)."""
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False)


def _no_duplicates(node: yaml.Node, prefix: str, source: str) -> None:
    """A key given twice in one mapping is an error (PyYAML silently keeps the last one)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            line = key_node.start_mark.line + 1
            if key is not None and key in seen:
                raise ConfigError(f"{prefix}{key}: duplicate key in {source} (lines {seen[key]} and {line})")
            if key is not None:
                seen[key] = line
            _no_duplicates(value_node, f"{prefix}{key}.", source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _no_duplicates(item, f"{prefix.rstrip('.')}[{i}].", source)


def yaml_load(text: str, source: str = "<text>") -> Any:
    """Parse YAML text (safe tags only, YAML 1.2 floats); a duplicate key raises :class:`ConfigError`.

    Args:
        text: the YAML document.
        source: how error messages name the text (a file path).
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _no_duplicates(node, "", source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's several-line message → ``"expected ',' or ']' (line 1, column 6)"``."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if problem and mark:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split())


def read_yaml(path: Union[str, Path], what: str = "--config") -> Any:
    """Read a YAML file; a missing, unreadable, binary or malformed file is a one-line :class:`ConfigError`.

    Args:
        path: the file.
        what: the option that named the file, the prefix of error messages.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what}: file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: {p} is not a text file (not UTF-8)") from None
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {p} ({exc.strerror or exc})") from None
    try:
        return yaml_load(text, str(p))
    except yaml.reader.ReaderError as exc:  # control characters: a binary file that happens to be UTF-8
        raise ConfigError(f"{what}: {p} is not a text file ({exc.reason} at byte {exc.position})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what}: {p} is not valid YAML: {yaml_problem(exc)}") from None


# --------------------------------------------------------------------------- errors

_EXPECTED = {"int": "int", "float": "float", "bool": "bool (true/false)", "string": "str", "list": "a list",
             "dict": "a mapping", "model": "a mapping (section)"}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _show(v: Any) -> str:
    return format(v, "g") if isinstance(v, float) else repr(v)


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _valid_keys(root: type[BaseModel], loc: tuple) -> str:
    cls: Optional[type[BaseModel]] = root
    for part in loc:
        cls = section_type(cls, part) if cls else None
    return ", ".join(sorted(cls.model_fields)) if cls else ""


def config_error(exc: ValidationError, root: type[BaseModel], prefix: str = "") -> ConfigError:
    """Pydantic's (multi-line) ValidationError → one line that starts with the dotted key of its first error.

    Args:
        exc: what pydantic raised.
        root: the model validated (to list the valid keys of a section): ``Config``, or the tune settings.
        prefix: dotted key of ``root`` inside a larger document (``"tune"``), or of a single value parsed.
    """
    e = exc.errors(include_url=False)[0]
    loc, kind, got, ctx = tuple(e["loc"]), e["type"], e.get("input"), e.get("ctx") or {}
    key = ".".join(x for x in (prefix, _dotted(loc)) if x)
    family = kind.split("_")[0]
    if isinstance(ctx.get("error"), KeyedError):  # a model validator names its key relative to the model
        err = ctx["error"]
        return ConfigError(f"{'.'.join(x for x in (key, err.key) if x)}: {err.msg}")
    if kind == "extra_forbidden":
        msg = f"unknown key (valid: {_valid_keys(root, loc[:-1])})"
    elif kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        msg = f"must be {_BOUNDS[kind]} {_show(bound)}, got {_show(got)}"
    elif kind == "literal_error":
        msg = f"must be one of {ctx['expected'].replace(chr(39), '')}, got {got!r}"
    elif family in _EXPECTED and kind.endswith(("_type", "_parsing", "_from_float")):
        what = "" if kind.endswith("_parsing") else f"{type(got).__name__} "  # _parsing: text from the CLI
        hint = " (quote it in YAML)" if kind == "string_type" and isinstance(got, (int, float)) else ""
        msg = f"expected {_EXPECTED[family]}, got {what}{got!r}{hint}"
    elif kind in ("too_short", "string_too_short"):
        msg = f"must not be empty, got {got!r}"
    elif kind == "value_error":
        msg = str(ctx.get("error", e["msg"]))
    else:
        msg = f"{e['msg'][:1].lower()}{e['msg'][1:]}, got {got!r}"
    return ConfigError(f"{key or '--config'}: {msg}")


# --------------------------------------------------------------------------- overrides

def parse_override(text: str) -> tuple[str, str]:
    """``"optim.lr=1e-4"`` → ``("optim.lr", "1e-4")``: the value stays text, for :func:`parse_text`."""
    if "=" not in text:
        raise ConfigError(f"{text}: override must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"{text}: empty key in override")
    return key, raw


def field_of(root: type[BaseModel], key: str) -> Any:
    """The pydantic FieldInfo of dotted ``key`` in ``root``; unknown keys raise :class:`ConfigError`.

    Args:
        root: the model class (``pipeline.config.Config``, or the tune settings).
        key: dotted key relative to ``root``.
    """
    cls: Optional[type[BaseModel]] = root
    parts = key.split(".")
    for i, part in enumerate(parts):
        if cls is None:
            raise ConfigError(f"{'.'.join(parts[:i])}: is not a section, cannot set {key}")
        if part not in cls.model_fields:
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: unknown key (valid: {', '.join(sorted(cls.model_fields))})")
        info, cls = cls.model_fields[part], section_type(cls, part)
    return info


@functools.lru_cache(maxsize=None)
def _adapter(tp: Any) -> TypeAdapter:
    return TypeAdapter(tp)


def parse_text(root: type[BaseModel], key: str, raw: str) -> Any:
    """Command-line text → the value of field ``key``, parsed by the field's own type.

    ``null``/``~`` is None; lists, mappings and sections are YAML (``optim.milestones=[10, 20]``); any other
    field parses the text itself, so ``name=2024`` stays a string and ``optim.lr=1e-4`` is a float.

    Args:
        root: the model class holding ``key``.
        key: dotted field name.
        raw: the text after ``=``.
    """
    info = field_of(root, key)
    if raw.strip() in ("null", "~"):
        return None
    tp = info.annotation
    if typing.get_origin(tp) in (list, dict) or (isinstance(tp, type) and issubclass(tp, BaseModel)):
        try:
            return yaml_load(raw, key)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: {raw!r} is not valid YAML: {yaml_problem(exc)}") from None
    try:
        return _adapter(tp).validate_strings(raw)
    except ValidationError as exc:
        raise config_error(exc, root, key) from None


def _set(tree: dict[str, Any], key: str, value: Any) -> None:
    *sections, last = key.split(".")
    for part in sections:
        if not isinstance(tree.get(part), dict):  # absent, or a commented-out section (None)
            tree[part] = {}
        tree = tree[part]
    tree[last] = value


def set_values(root: type[BaseModel], tree: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Apply dotted ``key -> value`` pairs to a nested dict of ``root``'s shape; text values are parsed by
    their field's type (:func:`parse_text`), others are kept for validation. Returns ``tree``.

    Args:
        root: the model class the tree will be validated against.
        tree: nested mapping (a YAML document or ``model_dump()``), changed in place.
        values: dotted key → value or command-line text.
    """
    for key, value in values.items():
        if isinstance(value, str):
            value = parse_text(root, key, value)
        else:
            field_of(root, key)
        _set(tree, key, value)
    return tree
