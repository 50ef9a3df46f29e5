"""``fedlora flower ...``: what a person runs to take a federation across machines on Flower (needs
``pip install 'fedlora[flower]'``). The apps themselves are :mod:`fedlora_cli.flower`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fedlora_cli.cli.app import _recipe_path, app, command
from fedlora_cli.cli.options import (
    AccumulationOpt, BaseModelOpt, CheckpointingOpt, DeviceOpt, DtypeOpt, MixedPrecisionOpt, OverwriteOpt,
    QuantizationOpt, ReportToOpt, ThreadsOpt,
)

flower_app = typer.Typer(
    help="Across machines with Flower: the app folder for flwr run, and each SuperNode's --node-config.",
    no_args_is_help=True,
)
app.add_typer(flower_app, name="flower")


@command(flower_app, "app")
def app_cmd(
    recipe: Annotated[Path, typer.Argument(help="Recipe file or shipped recipe name (on the SuperLink host).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The app folder to write (its pyproject.toml).")],
    run: Annotated[Path, typer.Option("--run", help="The run folder on the SuperLink host (simulate's layout).")],
    round_timeout: Annotated[
        Optional[float], typer.Option(help="Seconds a round waits for the sites' updates (default 900).")
    ] = None,
    test: Annotated[
        Optional[str], typer.Option(help="Test data on the SuperLink host, to evaluate each round's global.")
    ] = None,
    validation: Annotated[
        Optional[str], typer.Option(help="Validation data on the SuperLink host (default RUN/data/validation.parquet "
                                         "when there is one), to score each round's global for export --round best.")
    ] = None,
    base_model: BaseModelOpt = None,
    client_evaluation: Annotated[
        bool, typer.Option("--client-evaluation", help="Also ask each site to evaluate on its own test-data.")
    ] = False,
    overwrite: OverwriteOpt = False,
    report_to: ReportToOpt = None,
) -> None:
    """Write the app folder 'flwr run' takes: a pyproject.toml pointing at the installed fedlora's apps.

    With --report-to, the ServerApp logs each round's row (simulate's names; never a DP-SGD client's loss) to
    those trackers, in RUN/tracking on the SuperLink host.

    Example: fedlora flower app quickstart -o app --run /srv/fedlora/quickstart --report-to tensorboard
    """
    from fedlora_cli.cli import ui
    from fedlora_cli.flower import require_flwr
    from fedlora_cli.flower.app_folder import write_app

    require_flwr()
    written = write_app(_recipe_path(recipe), out, run, round_timeout, test, base_model, client_evaluation,
                        overwrite, report_to, validation=validation)
    ui.out.print(f"app folder: {written.parent}", highlight=False)
    ui.err.print(
        "next: flower-superlink on the coordinator, flower-supernode --node-config \"$(fedlora flower node-config "
        f"...)\" at each site, then: flwr run {written.parent} CONNECTION --stream (README: Across machines with "
        "Flower)", highlight=False, soft_wrap=True,
    )


@command(flower_app, "node-config")
def node_config_cmd(
    client_id: Annotated[str, typer.Option("--client-id", help="This site's client id in the federation.")],
    state_dir: Annotated[Path, typer.Option("--state-dir", help="This site's folder, kept at home: each federation's client state "
                                          "(STATE-DIR/<recipe name>-<digest>) and the worker's socket.")],
    data: Annotated[Optional[str], typer.Option(help="This site's training data (any source partition reads).")] = None,
    test_data: Annotated[Optional[str], typer.Option(help="This site's test data, for evaluate messages.")] = None,
    validation_data: Annotated[
        Optional[str], typer.Option(help="This site's own validation data, scored beside its test data.")
    ] = None,
    base_model: BaseModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quantization: QuantizationOpt = None,
    mixed_precision: MixedPrecisionOpt = None,
    gradient_checkpointing: CheckpointingOpt = None,
    accumulation_steps: AccumulationOpt = None,
    threads: ThreadsOpt = None,
    worker: Annotated[Optional[str], typer.Option(
        help="When the ClientApp relays to this site's resident worker (fedlora flower worker): auto (default: "
        "when its socket exists), required, off.")] = None,
) -> None:
    """Print the --node-config value of this site's SuperNode (TOML, strings quoted, paths absolute).

    Example: flower-supernode ... --node-config "$(fedlora flower node-config --client-id site-a --data a.csv
    --state-dir state-a)"
    """
    from fedlora_cli.errors import FedloraError
    from fedlora_cli.flower.app_folder import node_config
    from fedlora_cli.flower.site import WORKER_MODES
    from fedlora_cli.recipe.site_settings import BY_NAME

    if worker is not None and worker not in WORKER_MODES:
        raise FedloraError(f"--worker must be one of {', '.join(WORKER_MODES)}; got '{worker}'")

    site = {"device": device, "dtype": dtype, "quantization": quantization, "mixed_precision": mixed_precision,
            "gradient_checkpointing": gradient_checkpointing, "accumulation_steps": accumulation_steps,
            "threads": threads}
    print(node_config(client_id, data, str(state_dir), **{
        "test-data": test_data, "validation-data": validation_data, "base": base_model, **{BY_NAME[name].node_key: value for name, value in site.items()},
        "worker": worker,
    }))


@command(flower_app, "worker")
def worker_cmd(
    node_config: Annotated[str, typer.Option(
        "--node-config", help="This site's SuperNode --node-config: the very same string (or its .toml file).")],
    max_benches: Annotated[int, typer.Option(
        "--max-benches", help="Workbenches (copies of a base model) kept in memory at most; least recently used "
        "dropped first.")] = 1,
) -> None:
    """Run this site's resident worker beside its SuperNode, until SIGTERM or Ctrl-C.

    It loads torch once and the base model once per federation, and does the work of every message of every
    round; the ClientApp only relays to it over STATE-DIR/worker.sock (0600). A first signal lets the request in
    progress finish, a second stops at once.

    Example: fedlora flower worker --node-config "$(fedlora flower node-config --client-id site-a --data a.csv
    --state-dir state-a)"
    """
    import time

    from fedlora_cli.cli import ui
    from fedlora_cli.errors import FedloraError
    from fedlora_cli.flower import require_flwr, worker
    from fedlora_cli.flower.site import SiteConfig

    require_flwr()
    site = SiteConfig.from_node_config(worker.parse_node_config(node_config))
    if site.worker == "off":
        raise FedloraError('this --node-config says worker="off": its ClientApp would never relay to a worker')
    worker.Benches(max_benches)  # refuses a bad --max-benches before torch is imported

    def log(line: str) -> None:
        ui.err.print(f"{time.strftime('%H:%M:%S')} {line}", highlight=False, soft_wrap=True, markup=False)

    raise typer.Exit(worker.run(site, capacity=max_benches, log=log))
