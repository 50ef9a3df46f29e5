"""The site settings: how one site loads the base model and runs its steps, not what the federation computes.

Each site may set its own (``train-client --device/--dtype/--quantization/...``, a SuperNode's ``--node-config``)
whatever the global checkpoint's recipe says: a 4-bit site and a bfloat16 site train the same adapter on the same
base model. The base model itself (its fingerprint) and every other key are the federation's and must agree, so
the recipe's digest leaves these keys out (:meth:`fedlora_cli.recipe.schema.Recipe.digest`).

Each setting is declared here once, as one :class:`SiteSetting`; everything else reads it from here: the recipe's
fields and their help (:mod:`.schema`), the allowed values (:mod:`.validation`), the digest's exclusion, the
command-line options (:mod:`fedlora_cli.cli.options`), a SuperNode's node-config keys (:mod:`fedlora_cli.flower.site`),
the settings ``export`` loads with (:mod:`fedlora_cli.export.exporter`) and :class:`fedlora_cli.model.site.Site`.

The registry lives in the recipe package, not beside :class:`~fedlora_cli.model.site.Site`, because the recipe's
schema needs it and must import no runtime code (``model.site`` imports the schema). Pure data: no imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEVICES = ("auto", "cpu", "cuda", "mps")  # and 'cuda:N'
DTYPES = ("float32", "bfloat16", "float16", "auto")
QUANTIZATIONS = ("none", "4bit", "8bit")
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
# The most CPU threads a site may ask torch for. A fixed bound, not this machine's cores: the recipe is checked on
# the coordinator, whose cores say nothing of a site's, and reproducing a site's floats by hand needs its count
# even on a smaller machine. 1024 is above the hardware threads of the largest CPU servers (2 x 192 cores x 2),
# and far below what torch.set_num_threads can take (a C int) or OpenMP could start without exhausting the host.
MAX_THREADS = 1024


@dataclass(frozen=True)
class SiteSetting:
    """One site setting. Its node-config key and command-line flag are its ``name`` spelt with dashes
    (``accumulation_steps``: ``accumulation-steps``, ``--accumulation-steps``), so the three cannot drift apart."""

    name: str  # the keyword a command passes it by, and the field of fedlora_cli.model.site.Site
    key: str  # the recipe key, 'section.field'
    default: Any
    help: str  # the recipe key's help (fedlora recipes show)
    choices: tuple[str, ...] = ()  # the values a text setting allows (validation; the device also 'cuda:N')
    flag_help: str | None = None  # the command-line option's help; None: no option (recipe or node config only)
    plain: Any = None  # its value in a plain full-precision load (export's); None: the recipe's

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def field(self) -> str:
        return self.key.split(".", 1)[1]

    @property
    def node_key(self) -> str:
        """The SuperNode's ``--node-config`` key."""
        return self.name.replace("_", "-")

    @property
    def flag(self) -> str | None:
        """The command-line option that sets it, or None."""
        return None if self.flag_help is None else f"--{self.node_key}"

    def of(self, recipe: Any) -> Any:
        """This setting's value in ``recipe``."""
        return getattr(getattr(recipe, self.section), self.field)


DTYPE = SiteSetting(
    "dtype", "model.dtype", "float32",
    "Site setting: precision of the frozen base model's weights, 'float32', 'bfloat16', 'float16' or 'auto' "
    "(the checkpoint's own). Adapter tensors (and a trained head) are float32 whatever this is.",
    DTYPES, "Precision of the frozen base: float32, bfloat16, float16 or auto; default: the recipe's.", "float32",
)
QUANTIZATION = SiteSetting(
    "quantization", "model.quantization", "none",
    "Site setting: a quantised frozen base (QLoRA, bitsandbytes: pip install 'fedlora[quantization]'): "
    "'none', '4bit' or '8bit'. The task head is never quantised; export --merge reloads the base unquantised.",
    QUANTIZATIONS, "Quantised base (QLoRA): none, 4bit or 8bit (needs fedlora's quantization extra).", "none",
)
QUANT_TYPE = SiteSetting(
    "quant_type", "model.quant_type", "nf4", "Site setting, 4bit: 'nf4' (QLoRA's NormalFloat) or 'fp4'.", QUANT_TYPES,
)
DOUBLE_QUANT = SiteSetting(
    "double_quant", "model.double_quant", True, "Site setting, 4bit: quantise the quantisation constants too (QLoRA).",
)
COMPUTE_DTYPE = SiteSetting(
    "compute_dtype", "model.compute_dtype", "bfloat16",
    "Site setting, 4bit: the dtype de-quantised weights compute in: 'bfloat16', 'float16' or 'float32'.",
    COMPUTE_DTYPES,
)
DEVICE = SiteSetting(
    "device", "training.device", "auto",
    "Site setting: where the model trains and evaluates, 'auto' (CUDA, then MPS, then the CPU), 'cpu', "
    "'cuda', 'cuda:N' or 'mps'. Aggregation always runs on the CPU.",
    DEVICES, "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps; default: the recipe's.",
)
MIXED_PRECISION = SiteSetting(
    "mixed_precision", "training.mixed_precision", "no",
    "Site setting: autocast the forward pass, 'no', 'bf16' or 'fp16' (with a gradient scaler; not under "
    "DP-SGD). Adapter tensors and optimizer state stay float32.",
    MIXED_PRECISIONS, "Autocast the forward pass: no, bf16 or fp16.", "no",
)
GRADIENT_CHECKPOINTING = SiteSetting(
    "gradient_checkpointing", "training.gradient_checkpointing", False,
    "Site setting: recompute activations in the backward pass instead of keeping them (less memory, about a "
    "third more compute).",
    flag_help="Recompute activations to save memory.",
)
ACCUMULATION_STEPS = SiteSetting(
    "accumulation_steps", "training.gradient_accumulation_steps", 1,
    "Site setting: split each logical batch of batch_size into this many micro-batches, one forward and "
    "backward each, one optimizer step: the same step in less memory. Under DP-SGD the Poisson-sampled "
    "logical batch is split into micro-batches of ceil(batch_size / steps) and clipped and noised once.",
    flag_help="Micro-batches per logical batch (same step, less memory).",
)
THREADS = SiteSetting(
    "threads", "training.threads", 0,
    "Site setting: the CPU threads torch computes with while this site trains and evaluates (torch.set_num_threads); "
    f"0: the process's own count (torch's default: the machine's cores, or OMP_NUM_THREADS); at most {MAX_THREADS}. "
    "Another count adds floats in another order, so updates agree to the last bit only between runs that compute "
    "with the same count "
    "(simulate, train-client and a Flower site alike); each update records the count it was made with.",
    flag_help=f"CPU threads torch trains and evaluates with (at most {MAX_THREADS}); 0: the process's own count.",
)

SITE_SETTINGS: tuple[SiteSetting, ...] = (
    DTYPE, QUANTIZATION, QUANT_TYPE, DOUBLE_QUANT, COMPUTE_DTYPE, DEVICE, MIXED_PRECISION, GRADIENT_CHECKPOINTING,
    ACCUMULATION_STEPS, THREADS,
)
BY_NAME = {s.name: s for s in SITE_SETTINGS}
BY_KEY = {s.key: s for s in SITE_SETTINGS}
SITE_KEYS = tuple(BY_KEY)
# How a command's options name the site settings they override, for messages (``--device must be one of ...``).
FLAGS = {s.key: s.flag for s in SITE_SETTINGS if s.flag is not None}


def site_keys(**values: Any) -> dict[str, Any]:
    """The settings a command's options give (``device='cuda'``), by recipe key (``{'training.device': 'cuda'}``);
    a value of None leaves the recipe's."""
    unknown = sorted(set(values) - set(BY_NAME))
    if unknown:
        raise TypeError(f"'{unknown[0]}' is not a site setting (site settings: {', '.join(BY_NAME)})")
    return {BY_NAME[name].key: value for name, value in values.items()}


def plain_load(device: str | None) -> dict[str, Any]:
    """The settings of a plain load (``export``'s): full precision, unquantised, no autocast, on ``device``."""
    return {**{s.key: s.plain for s in SITE_SETTINGS if s.plain is not None}, DEVICE.key: device}
