"""The base model's fingerprint: which model a site holds, whatever precision it loads it in.

It hashes the model's config (without paths, versions and loading settings), the names, dtypes and shapes of its
stored weights, and the bytes of the first and last weight matrix (by name) as the safetensors files hold them.
Two sites with the same base at different paths, one loading it in 4 bits and one in bfloat16, agree; a different
model or fine-tune does not. Task heads (``classifier``, ``score``) are left out: the recipe's seed makes them.

Every fingerprint goes through :func:`digest`, whether a workbench computes it after loading the base
(:func:`of_loaded`) or a site identifies itself from the files alone (:func:`fingerprint`: headers and two
tensors read from disk, no model load and no torch import), so the two cannot drift apart. The config it hashes
is the one ``from_pretrained`` builds (class defaults, labels, the pad token the workbench settles), which only
transformers' config classes reproduce; they import torch whenever it is installed, so a process without torch
has them read by a child process in which torch is hidden (about 1 s, most of it ``import transformers``).

A base without safetensors files (a GGUF or ``.bin`` base, a Hub id not downloaded yet) cannot be identified
without loading it: its fingerprint hashes its loaded float32 weights (:func:`of_loaded`).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora_cli.errors import FedloraError
from fedlora_cli.model.site import HEAD_MODULES
from fedlora_cli.recipe.loading import resolve_location
from fedlora_cli.recipe.schema import TASK_CAUSAL_LM

if TYPE_CHECKING:
    from fedlora_cli.model.site import Site
    from fedlora_cli.recipe.schema import Recipe

# Config keys that say how or where a model was loaded, not which model it is.
LOADING_KEYS = (
    "_name_or_path", "name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype",
    "quantization_config", "_pre_quantization_dtype", "use_cache",
)
# What the fingerprint before 2026-12 left out of the config (it kept the loading settings, so a load in another
# precision changed it).
_LEGACY_LOADING_KEYS = ("_name_or_path", "transformers_version", "name_or_path", "_commit_hash")
_HEADER_LENGTH = struct.Struct("<Q")  # a safetensors file starts with its JSON header's length, little-endian u64


class NotStored(FedloraError):
    """The base model has no safetensors weights: only a loaded model (in float32) can identify it."""


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file as its header describes it; ``start``/``end`` are offsets in the file."""

    path: Path
    dtype: str  # safetensors' own name: F32, BF16, I64, ...
    shape: tuple[int, ...]
    start: int
    end: int

    def read(self) -> bytes:
        """The tensor's bytes as stored (little-endian, row-major), whatever its dtype."""
        with open(self.path, "rb") as handle:
            handle.seek(self.start)
            data = handle.read(self.end - self.start)
        if len(data) != self.end - self.start:
            raise FedloraError(f"{self.path} is truncated: it lacks bytes its header promises")
        return data


def digest(config_text: str, stored: Mapping[str, StoredTensor] | None, loaded: Sequence[bytes] = ()) -> str:
    """The fingerprint (16 hex digits) of a base with this canonical config (:func:`config_text`) and these stored
    tensors (name -> :class:`StoredTensor`); ``loaded`` is the bytes of the first and last loaded float32 weight
    matrices, for a base without safetensors files (``stored`` None)."""
    h = hashlib.sha256(config_text.encode())
    if stored is not None:
        names = sorted(n for n in stored if not is_head(n))
        h.update(json.dumps([[n, stored[n].dtype, stored[n].shape] for n in names]).encode())
        matrices = [n for n in names if len(stored[n].shape) == 2]
        for name in (matrices[0], matrices[-1]) if matrices else ():
            h.update(stored[name].read())
    for data in loaded:
        h.update(data)
    return h.hexdigest()[:16]


def config_text(config: Mapping[str, Any]) -> str:
    """A config dict (``PretrainedConfig.to_dict()``) without its loading keys, as the fingerprint hashes it."""
    kept = {k: v for k, v in config.items() if k not in LOADING_KEYS}
    return json.dumps(kept, sort_keys=True, default=str)


def is_head(name: str) -> bool:
    return any(part in HEAD_MODULES for part in name.split("."))


def safetensors_files(location: str, revision: str | None) -> list[Path]:
    """The base model's safetensors files: in its folder, or in the Hub cache for a Hub id (where from_pretrained
    puts them; none when it has not been downloaded yet)."""
    folder = Path(location)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(location, revision=revision, local_files_only=True,
                                            allow_patterns=["*.safetensors", "*.json"]))
        except Exception:  # noqa: BLE001 - no cached snapshot: only a load can fetch and identify it
            return []
    return sorted(folder.glob("*.safetensors"))


def stored_tensors(files: Sequence[Path]) -> dict[str, StoredTensor]:
    """Every tensor of ``files`` from their headers alone (a name in two files: the later file's)."""
    tensors: dict[str, StoredTensor] = {}
    for path in files:
        with open(path, "rb") as handle:
            head = handle.read(_HEADER_LENGTH.size)
            if len(head) != _HEADER_LENGTH.size:
                raise FedloraError(f"{path} is not a safetensors file (it is shorter than a header)")
            (length,) = _HEADER_LENGTH.unpack(head)
            try:
                header = json.loads(handle.read(length))
            except (UnicodeDecodeError, ValueError):
                raise FedloraError(f"{path} is not a safetensors file (its header is not JSON)") from None
        base = _HEADER_LENGTH.size + length
        for name, entry in header.items():
            if name != "__metadata__":
                start, end = entry["data_offsets"]
                tensors[name] = StoredTensor(path, entry["dtype"], tuple(entry["shape"]), base + start, base + end)
    return tensors


def fingerprint(base: str, revision: str | None = None, num_labels: int | None = None) -> str:
    """The fingerprint a workbench of ``base`` (a folder, a ``pkg:`` location or a cached Hub id) computes after
    loading it in any precision, from its files alone: no model load, no torch import.

    ``num_labels`` is the sequence classifier's (its labels are in the loaded config); None for a causal LM.
    :class:`NotStored` when the base has no safetensors files (a GGUF or ``.bin`` base, a Hub id not downloaded
    yet): such a base can be identified only by loading it (:func:`of_loaded`).
    """
    location = resolve_location(base)
    files = safetensors_files(location, revision)
    if not files:
        raise NotStored(f"base model '{base}' has no safetensors files here: it can be identified only by loading it")
    return digest(_config_text_without_torch(location, revision, num_labels), stored_tensors(files))


def of_recipe(recipe: Recipe, num_labels: int | None, base_override: str | None = None) -> str:
    """:func:`fingerprint` of the base a workbench of ``recipe`` loads (``base_override``, else ``model.base``):
    with ``num_labels`` labels for a sequence classifier, the config's own for a causal LM."""
    labels = None if recipe.model.task == TASK_CAUSAL_LM else num_labels
    return fingerprint(base_override or recipe.model.base, recipe.model.revision, labels)


def of_loaded(location: str, revision: str | None, model: Any, site: Site) -> str:
    """The fingerprint of a base just loaded (``model``, with its pad token settled) from ``location``: its stored
    weights when it has safetensors files, else its loaded float32 weights, which only a float32, unquantised
    load reproduces."""
    text = config_text(model.config.to_dict())
    files = safetensors_files(location, revision)
    if files:
        return digest(text, stored_tensors(files))
    if site.quantized or site.dtype != "float32":
        raise FedloraError(
            f"base model '{location}' has no safetensors weights, so fedlora can identify it only from its float32 "
            "weights: load it with model.dtype 'float32' and no quantization, or re-save it with save_pretrained"
        )
    return digest(text, None, _loaded_matrices(model))


def legacy_of_loaded(model: Any) -> str:
    """The fingerprint of fedlora before 2026-12, which global checkpoints written then record: the loaded config
    (without paths and versions only) and the first and last loaded weight matrices outside ``classifier``, so a
    float32, unquantised load alone reproduces it."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in _LEGACY_LOADING_KEYS}
    text = json.dumps(config, sort_keys=True, default=str)
    return digest(text, None, _loaded_matrices(model, lambda name: "classifier" in name))


def _loaded_matrices(model: Any, left_out: Callable[[str], bool] = is_head) -> list[bytes]:
    """The bytes of the first and last loaded 2-D parameters (in the model's order) not ``left_out``."""
    import torch

    weights = [p for name, p in model.named_parameters() if p.dim() == 2 and not left_out(name)]
    return [p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            for p in ((weights[0], weights[-1]) if weights else ())]


def loaded_config_text(location: str, revision: str | None, num_labels: int | None) -> str:
    """What :func:`config_text` gives for the config of a model loaded from ``location``, from its files: the
    config as ``from_pretrained`` builds it (with ``num_labels``), with the pad token the workbench settles (the
    tokenizer's, else its end-of-sequence token) when the config names none."""
    from transformers import AutoConfig, AutoTokenizer

    extra = {} if num_labels is None else {"num_labels": num_labels}
    try:
        config = AutoConfig.from_pretrained(location, revision=revision, **extra)
        if config.pad_token_id is None:
            tokenizer = AutoTokenizer.from_pretrained(location, revision=revision)
            config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token is not None else tokenizer.eos_token_id
    except (OSError, ValueError) as exc:
        raise FedloraError(f"cannot read the config of base model '{location}': {str(exc).splitlines()[0]}") from None
    return config_text(config.to_dict())


# transformers' config code imports torch whenever it is installed (2-3 s); with torch hidden it reads configs
# the same (it supports installs without torch), so a process that has no torch yet asks a child that hides it.
_CHILD = """import sys
sys.modules["torch"] = None
from fedlora_cli.model.fingerprint import loaded_config_text
location, revision, labels = sys.argv[1], sys.argv[2] or None, sys.argv[3]
try:
    print(loaded_config_text(location, revision, int(labels) if labels else None))
except Exception as exc:
    message = (str(exc).splitlines() or [type(exc).__name__])[0]
    sys.exit(message if message.startswith("cannot read") else f"cannot read the config of '{location}': {message}")
"""


def _config_text_without_torch(location: str, revision: str | None, num_labels: int | None) -> str:
    if "torch" in sys.modules:
        return loaded_config_text(location, revision, num_labels)
    return _child_config_text(location, revision, num_labels)


def _child_config_text(location: str, revision: str | None, num_labels: int | None) -> str:
    """:func:`loaded_config_text` read by a child process in which torch is hidden."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (package_root, os.environ.get("PYTHONPATH"))))}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, location, revision or "", "" if num_labels is None else str(num_labels)],
        capture_output=True, text=True, env=env, check=False,
    )
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise FedloraError(lines[-1] if lines else f"cannot read the config of '{location}': exit {done.returncode}")
    return done.stdout.splitlines()[-1]  # the config text is one line, and the child's last
