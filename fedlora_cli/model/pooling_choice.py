"""``model.pooling: auto``: how the task head reads the encoder, from the model's own files.

A sentence-transformers model folder says how it is read: ``modules.json`` lists its modules (the Transformer,
then a Pooling module, perhaps Normalize), and the Pooling module's ``config.json`` (``1_Pooling/config.json``)
names the mode with flags such as ``pooling_mode_mean_tokens``. ``auto`` takes that mode when fedlora supports it
(mean, max, cls: :data:`fedlora_cli.model.pooling.MODES`), refuses by name one it does not (weighted mean, mean
over sqrt(length), last token, several modes concatenated, a Dense projection after the pooling), and falls back to
the architecture's own pooler (``default``) for a model without a sentence-transformers pooling config. A fedlora
export reads as it was exported (its ``config.auto_map`` names its pooling class).

A Normalize module is not applied: it scales the embedding to unit length for cosine similarity, while the task
head that reads it learns its own scale (unit-length features would only slow a freshly initialised head).

The choice is made once, by whoever writes the round-0 global checkpoint (:func:`fedlora_cli.federation.init`),
and recorded in its recipe: every client builds the model its federation computes, whatever its own copy of the
base model's folder says. This module reads JSON only (no torch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora_cli.errors import FedloraError, first_line
from fedlora_cli.recipe.schema import TASK_CAUSAL_LM, ModelSection

AUTO = "auto"
DEFAULT = "default"
MODULES_FILE = "modules.json"
# sentence-transformers' Pooling config flags, and what fedlora reads each as (None: not supported).
_FLAGS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_sqrt_len_tokens": None,
    "pooling_mode_weightedmean_tokens": None,
    "pooling_mode_lasttoken": None,
}
# The short names of the supported modes (sentence-transformers' ``pooling_mode`` argument).
_SHORT = {"mean": "mean", "max": "max", "cls": "cls"}
# Modules that may follow the Transformer: the Pooling module read here, Normalize (not applied, see above).
_POOLING_TYPE, _NORMALIZE_TYPE = "Pooling", "Normalize"


@dataclass(frozen=True)
class PoolingChoice:
    """The pooling the task head reads (``default``, ``mean``, ``max`` or ``cls``) and where it was found."""

    pooling: str
    source: str


def choose(model: ModelSection, location: str) -> PoolingChoice:
    """The pooling of ``model`` (the recipe's section) for the base model at ``location`` (a folder or a Hub id):
    the recipe's own choice, or for ``auto`` the one the model's files declare."""
    if model.task == TASK_CAUSAL_LM:
        return PoolingChoice(DEFAULT, "causal-lm: no task head")
    if model.pooling != AUTO:
        return PoolingChoice(model.pooling, "recipe")
    exported = _exported(location, model.revision)
    if exported is not None:
        return PoolingChoice(exported, "fedlora export (config.json auto_map)")
    modules = _read_json(location, MODULES_FILE, model.revision)
    if modules is None:
        return PoolingChoice(DEFAULT, f"no {MODULES_FILE}: the architecture's pooler")
    return _from_modules(modules, location, model.revision)


def _from_modules(modules: Any, location: str, revision: str | None) -> PoolingChoice:
    entries = modules if isinstance(modules, list) else None
    if entries is None or not all(isinstance(e, dict) and isinstance(e.get("type"), str) for e in entries):
        raise FedloraError(f"model.pooling 'auto': {MODULES_FILE} of '{location}' is not a list of modules with a type")
    kinds = [(e["type"].rsplit(".", 1)[-1], e) for e in entries]
    pools = [e for kind, e in kinds if kind == _POOLING_TYPE]
    if not pools:
        return PoolingChoice(DEFAULT, f"{MODULES_FILE} has no Pooling module: the architecture's pooler")
    after = [e for _, e in kinds[kinds.index((_POOLING_TYPE, pools[0])) + 1:]]
    unsupported = [e["type"] for e in after if e["type"].rsplit(".", 1)[-1] != _NORMALIZE_TYPE]
    if len(pools) > 1 or unsupported:
        what = "several Pooling modules" if len(pools) > 1 else f"module {unsupported[0]} after its pooling"
        raise FedloraError(f"model.pooling 'auto': '{location}' declares {what}, which fedlora does not apply: "
                           "set model.pooling to default, mean, max or cls")
    folder = str(pools[0].get("path") or "")
    config = _read_json(location, f"{folder}/config.json" if folder else "config.json", revision)
    if not isinstance(config, dict):
        raise FedloraError(f"model.pooling 'auto': '{location}' has a Pooling module without a readable "
                           f"{folder}/config.json")
    return PoolingChoice(_mode(config, location), f"{folder}/config.json")


def _mode(config: dict[str, Any], location: str) -> str:
    """The one supported mode a Pooling config declares; FedloraError naming any other."""
    if isinstance(config.get("pooling_mode"), str):  # the short form sentence-transformers' constructor takes
        declared = [config["pooling_mode"]]
    else:
        declared = [flag.removeprefix("pooling_mode_") for flag in _FLAGS if config.get(flag) is True]
    if config.get("include_prompt") is False:
        declared.append("include_prompt false")
    if not declared:
        raise FedloraError(f"model.pooling 'auto': the Pooling config of '{location}' declares no pooling mode: set "
                           "model.pooling to default, mean, max or cls")
    mode = _SHORT.get(declared[0], _FLAGS.get(f"pooling_mode_{declared[0]}")) if len(declared) == 1 else None
    if mode is None:
        raise FedloraError(f"model.pooling 'auto': '{location}' pools by {' + '.join(declared)}, which fedlora does "
                           "not support (it reads one of mean, max, cls): set model.pooling to default, mean, max or cls")
    return mode


# What fedlora_cli.model.pooling.remote_code writes: the module of an export's pooling code, and its class named
# for the mode (MeanPooledBertForSequenceClassification, MaxPooled..., ClsPooled...).
REMOTE_CODE_MODULE = "fedlora_pooling"
_EXPORT_MODES = {"Mean": "mean", "Max": "max", "Cls": "cls"}


def exported_mode(auto_map: Any) -> str | None:
    """The pooling mode of a fedlora export, from its config's ``auto_map``; None for any other model."""
    for value in auto_map.values() if isinstance(auto_map, dict) else ():
        module, _, name = str(value).partition(".")
        if module == REMOTE_CODE_MODULE:
            prefix = name.split("Pooled", 1)[0]
            if prefix not in _EXPORT_MODES:
                raise FedloraError(f"the fedlora export's pooling class '{name}' names no mode this fedlora reads")
            return _EXPORT_MODES[prefix]
    return None


def _exported(location: str, revision: str | None) -> str | None:
    config = _read_json(location, "config.json", revision)
    return exported_mode(config.get("auto_map")) if isinstance(config, dict) else None


def _read_json(location: str, name: str, revision: str | None) -> Any:
    """A JSON file of the model at ``location`` (a folder, or a Hub repo read through huggingface_hub's cache and
    network); None when the model has no such file. FedloraError when it exists but cannot be read."""
    folder = Path(location)
    if folder.is_dir():
        path = folder / name
        if not path.is_file():
            return None
    else:
        path = _hub_file(location, name, revision)
        if path is None:
            return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FedloraError(f"model.pooling 'auto': cannot read {name} of '{location}': {first_line(exc)}") from None


def _hub_file(repo: str, name: str, revision: str | None) -> str | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(repo, name, revision=revision)
    except EntryNotFoundError:
        return None
    except Exception as exc:  # offline without a cached copy, no such repo, no access: the user must choose
        raise FedloraError(f"model.pooling 'auto': cannot read {name} of '{repo}' ({first_line(exc)}): set "
                           "model.pooling to default, mean, max or cls") from None
