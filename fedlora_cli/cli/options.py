"""Option types shared by the CLI's commands (one definition each, so help texts agree)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from fedlora_cli.recipe import site_settings as sites
from fedlora_cli.recipe.site_settings import SiteSetting

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

# Site settings: how this site loads and runs the model; default: the recipe's. Each option's flag and help are
# its setting's in fedlora_cli.recipe.site_settings (the one declaration); Typer wants the types written out.
def _site_option(setting: SiteSetting) -> Any:
    flag = setting.flag
    if setting.flag is None:
        raise ValueError(f"site setting '{setting.name}' has no command-line option")
    if isinstance(setting.default, bool):
        flag = f"{flag}/--no-{flag[2:]}"
    return typer.Option(flag, help=setting.flag_help)


DeviceOpt = Annotated[Optional[str], _site_option(sites.DEVICE)]
DtypeOpt = Annotated[Optional[str], _site_option(sites.DTYPE)]
QuantizationOpt = Annotated[Optional[str], _site_option(sites.QUANTIZATION)]
MixedPrecisionOpt = Annotated[Optional[str], _site_option(sites.MIXED_PRECISION)]
CheckpointingOpt = Annotated[Optional[bool], _site_option(sites.GRADIENT_CHECKPOINTING)]
AccumulationOpt = Annotated[Optional[int], _site_option(sites.ACCUMULATION_STEPS)]
ThreadsOpt = Annotated[Optional[int], _site_option(sites.THREADS)]


def site_settings(**options: Any) -> dict[str, Any]:
    """The site-setting overrides a command's options give, by recipe key (``device='cuda'`` gives
    ``{'training.device': 'cuda'}``; None leaves the recipe's). :data:`fedlora_cli.recipe.site_settings.FLAGS`
    names each by its option in messages."""
    return sites.site_keys(**options)


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
