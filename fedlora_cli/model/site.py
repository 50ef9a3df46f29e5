"""How one site loads the base model and runs its steps: device, precision, a quantised base, memory.

These are the recipe's site settings (:mod:`fedlora_cli.recipe.site_settings`). They change how a site
computes, not what the federation computes, so each site chooses its own: a site with a 24 GB GPU loads the base
in 4 bits (QLoRA), a site with a larger one in bfloat16, a laptop in float32 on the CPU, and all of them train the
same adapter on the same base model. What a federation checks is unchanged: the base model's fingerprint (its
weights as stored, whatever the site loads them as) and the recipe digest of the global checkpoint.

Whatever the base's dtype, the adapter tensors and a trained task head are kept, trained and sent in float32
(PEFT keeps adapter weights in float32; :func:`fedlora_cli.model.workbench.build` does the same for the head),
so a client update from a 4-bit site and one from a float32 site aggregate as equals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedlora_cli.errors import FedloraError
from fedlora_cli.recipe.schema import TASK_CAUSAL_LM, Recipe
from fedlora_cli.recipe.site_settings import DEVICE, FLAGS, SITE_SETTINGS, THREADS

if TYPE_CHECKING:
    import torch

# How a command's options name the site settings it overrides, for messages (``--device must be one of ...``).
SITE_FLAGS = FLAGS
# Task heads (PEFT's modules_to_save for sequence classification): never quantised, always float32.
HEAD_MODULES = ("classifier", "score")
_AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Site:
    """A site's settings, with the device resolved (``auto`` becomes the device actually used); one field per
    setting of :mod:`fedlora_cli.recipe.site_settings`, by its name."""

    device: str
    dtype: str
    quantization: str
    quant_type: str
    double_quant: bool
    compute_dtype: str
    mixed_precision: str
    gradient_checkpointing: bool
    accumulation_steps: int
    # torch's CPU threads while the site computes; 0 only in a record written before updates recorded the count.
    threads: int = 0

    @classmethod
    def of(cls, recipe: Recipe) -> Site:
        """The site the recipe's settings describe; ``auto`` device and 0 threads resolved to what this process uses."""
        import torch

        values = {setting.name: setting.of(recipe) for setting in SITE_SETTINGS}
        return cls(**{**values, DEVICE.name: resolve_device(values[DEVICE.name]),
                      THREADS.name: values[THREADS.name] or torch.get_num_threads()})

    @contextlib.contextmanager
    def cpu_threads(self) -> Iterator[None]:
        """torch computes with this site's thread count inside, and with the process's own again after: a resident
        worker serves federations of other settings, and a count left behind would change their floats."""
        import torch

        before = torch.get_num_threads()
        if self.threads and self.threads != before:
            torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)

    @property
    def quantized(self) -> bool:
        return self.quantization != "none"

    def micro_batch(self, batch_size: int) -> int:
        """Examples per forward and backward pass: the logical batch split into ``accumulation_steps``."""
        return max(1, math.ceil(batch_size / self.accumulation_steps))

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward pass's autocast context (a no-op without mixed precision)."""
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_type=self.device_type, dtype=getattr(torch, _AUTOCAST_DTYPES[self.mixed_precision]))

    @property
    def device_type(self) -> str:
        return self.device.split(":", 1)[0]

    def grad_scaler(self) -> Any:
        """fp16 mixed precision's loss scaler (None otherwise): float16 gradients underflow without one."""
        if self.mixed_precision != "fp16":
            return None
        import torch

        return torch.amp.GradScaler(self.device_type)

    def load_kwargs(self, task: str) -> dict[str, Any]:
        """``from_pretrained`` keyword arguments for the base model's precision and quantisation."""
        import torch

        if not self.quantized:
            kwargs: dict[str, Any] = {"dtype": "auto" if self.dtype == "auto" else getattr(torch, self.dtype)}
            if self.device != "cpu":
                kwargs["device_map"] = {"": self.device}  # straight onto the accelerator, not through host memory
            return kwargs
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise FedloraError(
                f"model.quantization '{self.quantization}' needs bitsandbytes: pip install 'fedlora[quantization]'"
            ) from None
        # transformers skips the output embeddings of a causal LM by itself; a list of our own replaces its
        # default, so the task heads are named (a quantised classifier head fails in its first forward pass).
        skip = None if task == TASK_CAUSAL_LM else [*HEAD_MODULES]
        if self.quantization == "8bit":
            config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        else:
            config = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=self.quant_type, bnb_4bit_use_double_quant=self.double_quant,
                bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype), llm_int8_skip_modules=skip,
            )
        # Non-quantised weights (norms, embeddings) load in float32: prepare_model_for_kbit_training wants them so.
        return {"quantization_config": config, "dtype": torch.float32, "device_map": {"": self.device}}

    def describe(self) -> str:
        """One line for a command's output, e.g. ``cpu · base 4bit nf4 (bfloat16 compute) · 4 micro-batches``."""
        if self.quantization == "4bit":
            base = f"base 4bit {self.quant_type} ({self.compute_dtype} compute)"
        elif self.quantization == "8bit":
            base = "base 8bit"
        else:
            base = f"base {self.dtype}"
        parts = [self.device, base]
        if self.mixed_precision != "no":
            parts.append(f"{self.mixed_precision} autocast")
        if self.gradient_checkpointing:
            parts.append("gradient checkpointing")
        if self.accumulation_steps > 1:
            parts.append(f"{self.accumulation_steps} micro-batches")
        return " · ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_device(name: str) -> str:
    """``auto`` is CUDA if there is one, then Apple's MPS, then the CPU; a named device must exist here."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda:0"
        if _mps_available():
            return "mps"
        return "cpu"
    if name == "cpu":
        return name
    if name == "mps":
        if not _mps_available():
            raise FedloraError("training.device 'mps': this machine has no MPS device (Apple silicon)")
        return name
    # 'cuda' or 'cuda:N' (validation has checked the form)
    if not torch.cuda.is_available():
        raise FedloraError(f"training.device '{name}': this machine has no CUDA device (use 'auto' or 'cpu')")
    index = int(name.split(":", 1)[1]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        raise FedloraError(f"training.device '{name}': this machine has {torch.cuda.device_count()} CUDA device(s)")
    return f"cuda:{index}"


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def to_device(batch: Mapping[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    if device == "cpu":
        return dict(batch)
    return {name: t.to(device, non_blocking=True) for name, t in batch.items()}


def chunks(rows: Any, size: int) -> Iterator[Any]:
    """``rows`` in consecutive pieces of at most ``size`` (a logical batch's micro-batches)."""
    for start in range(0, len(rows), size):
        yield rows[start : start + size]
