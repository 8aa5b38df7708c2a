"""Config plumbing: YAML + ``--set a.b=c`` overrides -> validated pydantic models.

Each component owns its section model (next to the code that uses it); this module only
loads, merges, validates and fingerprints. Errors name the dotted field and the file,
because "validation error for PipelineConfig" is not something a user can act on.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

M = TypeVar("M", bound=BaseModel)

# PyYAML follows YAML 1.1, where "3e-4" is a string; people type it meaning a float.
_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class ConfigError(ValueError):
    """A config cannot be loaded; the message names the file and the dotted field."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping document is a ConfigError."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {file}")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: top level must be a mapping, got {type(data).__name__}")
    return data


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and a YAML-typed value (``3e-4`` -> float)."""
    key, sep, raw = assignment.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(keys):
        raise ConfigError(f"--set expects key.path=value, got {assignment!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
        value = float(value)
    return keys, value


def apply_overrides(data: dict[str, Any], assignments: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with every ``a.b=c`` assignment applied in order.

    A numeric key indexes a list (``corpus.inputs.0.uri=...``), matching how validation
    errors name list items.
    """
    result = json.loads(json.dumps(data))  # deep copy of plain YAML data
    for assignment in assignments:
        keys, value = parse_override(assignment)
        node: Any = result
        for depth, key in enumerate(keys):
            dotted = ".".join(keys[: depth + 1])
            last = depth == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise ConfigError(f"--set {assignment}: {dotted}: no such list item")
                if last:
                    node[int(key)] = value
                else:
                    node = node[int(key)]
            elif isinstance(node, dict):
                if last:
                    node[key] = value
                else:
                    node = node.setdefault(key, {})
            else:
                parent = ".".join(keys[:depth])
                raise ConfigError(f"--set {assignment}: {parent} is not a section")
    return result


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem: ``source: dotted.field: message (got value)``."""
    lines = []
    for problem in error.errors():
        field = ".".join(str(part) for part in problem["loc"]) or "<root>"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        shown = problem.get("input")
        got = "" if problem["type"] in ("missing", "extra_forbidden") else f" (got {shown!r})"
        lines.append(f"{source}: {field}: {message}{got}")
    return "\n".join(lines)


def validate(model: type[M], data: Mapping[str, Any], source: str = "config") -> M:
    """Build ``model`` from ``data`` or raise a ConfigError naming each bad field."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load(model: type[M], path: str | Path, overrides: Iterable[str] = ()) -> M:
    """Load ``path``, apply ``--set`` overrides and validate into ``model``."""
    data = apply_overrides(load_yaml(path), overrides)
    return validate(model, data, source=str(path))


def redact_uri(uri: str | None) -> str | None:
    """Hide the ``user:password@`` part of a URI before it is printed or logged."""
    if uri is None:
        return None
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}***@", uri)


def public_dict(model: BaseModel) -> dict[str, Any]:
    """The model as plain data with secrets masked, safe for logs and MLflow params."""

    def clean(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return "***"
        if isinstance(value, BaseModel):
            return {name: clean(getattr(value, name)) for name in type(value).model_fields}
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [clean(item) for item in value]
        if isinstance(value, str):
            return redact_uri(value)
        return value

    return clean(model)


def fingerprint(*parts: Any) -> str:
    """Stable hash of plain data or models; equal configs and inputs give equal hashes."""

    def plain(value: Any) -> Any:
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json")
        return value

    canonical = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
