"""Option types shared by the CLI's commands (one definition each, so help texts agree)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (for scripts).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace the output folder if it exists.")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a recipe value, e.g. --set training.lr=0.01 (repeatable)."),
]
BaseModelOpt = Annotated[
    Optional[str],
    typer.Option("--base-model", help="Where this site keeps the base model, if not where the recipe says."),
]

# Site settings (fedlora_cli.model.site): how this site loads and runs the model; default: the recipe's.
DeviceOpt = Annotated[
    Optional[str],
    typer.Option("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps; default: the recipe's."),
]
DtypeOpt = Annotated[
    Optional[str],
    typer.Option("--dtype", help="Precision of the frozen base: float32, bfloat16, float16 or auto; default: the recipe's."),
]
QuantizationOpt = Annotated[
    Optional[str],
    typer.Option("--quantization", help="Quantised base (QLoRA): none, 4bit or 8bit (needs fedlora[quantization])."),
]
MixedPrecisionOpt = Annotated[
    Optional[str], typer.Option("--mixed-precision", help="Autocast the forward pass: no, bf16 or fp16."),
]
CheckpointingOpt = Annotated[
    Optional[bool],
    typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations to save memory."),
]
AccumulationOpt = Annotated[
    Optional[int],
    typer.Option("--accumulation-steps", help="Micro-batches per logical batch (same step, less memory)."),
]


def site_settings(
    device: str | None = None, dtype: str | None = None, quantization: str | None = None,
    mixed_precision: str | None = None, checkpointing: bool | None = None, accumulation: int | None = None,
) -> dict[str, object]:
    """The site-setting overrides a command's options give (unset ones left to the recipe)."""
    return {
        "training.device": device, "model.dtype": dtype, "model.quantization": quantization,
        "training.mixed_precision": mixed_precision, "training.gradient_checkpointing": checkpointing,
        "training.gradient_accumulation_steps": accumulation,
    }


# What the --data of train-client and evaluate takes besides a partition's shard (one text, so both say the same;
# no slashes: a narrow help column cuts a long word).
SITE_DATA = (
    "a CSV, TSV, JSON, JSONL or Parquet file (optionally .gz, .bz2 or .xz), a save_to_disk folder or a Hub dataset "
    "name, with the recipe's columns (text and label, or prompt and response); labels as the federation's label "
    "names or their ids 0..K-1"
)
SplitOpt = Annotated[
    Optional[str],
    typer.Option(
        "--split", help="Split of a Hub dataset or DatasetDict folder given as --data; default: the recipe's data.split."
    ),
]


# Experiment tracking (fedlora_cli.tracking): offline trackers; default: the recipe's tracking.report_to.
ReportToOpt = Annotated[
    Optional[str],
    typer.Option("--report-to", help="Log metrics to these trackers, comma-separated: tensorboard, mlflow, wandb "
                                     "(offline: files in the run's tracking/ folder), or none; default: the "
                                     "recipe's tracking.report_to."),
]
TrackingDirOpt = Annotated[
    Optional[Path],
    typer.Option("--tracking-dir", help="Where the trackers write their files; default: the run's tracking/ folder "
                                        "(the run folder, or the client's state folder)."),
]
