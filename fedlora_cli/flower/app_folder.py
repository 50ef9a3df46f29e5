"""The app folder ``flwr run`` takes: one pyproject.toml whose components are the server and client apps of the
installed fedlora, and whose run config says where the recipe and the run folder are on the SuperLink host.

Nothing else goes in it: Flower bundles the folder (10 MB at most) and fedlora is installed on every host, so the
bundle carries no code and never a checkpoint. Writing it needs no flwr.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from fedlora_cli import recipe as recipes
from fedlora_cli.errors import FedloraError
from fedlora_cli.storage.files import atomic_dir

PYPROJECT = "pyproject.toml"
SERVER_APP = "fedlora_cli.flower.server_app:app"
CLIENT_APP = "fedlora_cli.flower.client_app:app"
# Under federation.secure_aggregation: the same queries and evaluation, training inside Flower's secaggplus_mod.
SECURE_CLIENT_APP = "fedlora_cli.flower.client_app:secure_app"
PUBLISHER = "fedlora"


def _toml(value: object) -> str:
    """A TOML scalar: JSON's string escapes are valid TOML basic strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def app_name(recipe: recipes.Recipe) -> str:
    return "fedlora-" + (re.sub(r"[^a-z0-9]+", "-", recipe.name.lower()).strip("-") or "federation")


def write_app(recipe_file: Path, out: Path, run_dir: Path, round_timeout: float | None = None,
              test: str | None = None, base: str | None = None, client_evaluation: bool = False,
              overwrite: bool = False, report_to: str | None = None, validation: str | None = None) -> Path:
    """Write the app folder for the (validated) recipe at ``recipe_file``; returns its pyproject.toml.

    Paths are made absolute: the ServerApp runs as a process of the SuperLink host, in another working folder.
    ``report_to`` (as ``--report-to``: comma-separated trackers, or 'none') is checked here as the ServerApp will
    check it: an unknown tracker or one whose package is not installed on this host is refused.
    """
    from fedlora_cli.tracking.fanout import NONE, resolve

    recipe_file = Path(recipe_file).resolve()
    recipe = recipes.load(recipe_file)  # refused here, not on the SuperLink, if it does not validate
    _check_coordinator_can_start(recipe, Path(run_dir))
    config: dict[str, object] = {"recipe": recipe_file, "run-dir": Path(run_dir).resolve()}
    if round_timeout is not None:
        if round_timeout <= 0:
            raise FedloraError(f"--round-timeout must be a positive number of seconds; got {round_timeout:g}")
        config["round-timeout"] = float(round_timeout)
    for key, source in (("test", test), ("validation", validation)):
        if source is not None:
            config[key] = Path(source).resolve() if Path(source).exists() else source
    if base is not None:
        config["base"] = Path(base).resolve() if Path(base).exists() else base
    if client_evaluation:
        config["client-evaluation"] = True
    if report_to is not None:
        config["report-to"] = ",".join(resolve(report_to, recipe)) or NONE
    lines = [
        "# Written by 'fedlora flower app'. Run it with: flwr run . CONNECTION --stream",
        "# The components are modules of the fedlora installed on every host; paths are on the SuperLink host.",
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        f"name = {_toml(app_name(recipe))}",
        'version = "1.0.0"',
        f"description = {_toml(f'fedlora federation {recipe.name} on Flower')}",
        'license = "Apache-2.0"',
        "dependencies = []  # fedlora[flower] is installed on every host (--disable-runtime-dependency-installation)",
        "",
        "[tool.flwr.app]",
        f"publisher = {_toml(PUBLISHER)}",
        "",
        "[tool.flwr.app.components]",
        f"serverapp = {_toml(SERVER_APP)}",
        f"clientapp = {_toml(CLIENT_APP if recipe.federation.secure_aggregation is None else SECURE_CLIENT_APP)}",
        "",
        "[tool.flwr.app.config]",
        *(f"{key} = {_toml(value)}" for key, value in config.items()),
        "",
    ]
    out = Path(out)
    if out.exists() and not overwrite:
        raise FedloraError(f"{out} already exists (pass --overwrite to replace it)")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / PYPROJECT).write_text("\n".join(lines))
    return out / PYPROJECT


def _check_coordinator_can_start(recipe: recipes.Recipe, run_dir: Path) -> None:
    """Refuse a recipe whose round-0 global checkpoint the server app cannot write without the sites' data: one
    that does not name its labels, or a DP-SGD budget it cannot turn into one noise multiplier for the federation
    (that needs every site's dataset size, which the coordinator knows only from a partition in the run folder;
    under ``privacy.calibration: client`` each site calibrates its own)."""
    from fedlora_cli.data.partition import PARTITION_MANIFEST
    from fedlora_cli.storage.run_layout import RunLayout

    if recipe.data.labels is None and recipe.model.num_labels is None and recipe.model.task != recipes.TASK_CAUSAL_LM:
        raise FedloraError("the coordinator never sees the sites' data: the recipe must name data.labels (or "
                           "model.num_labels) for the round-0 global checkpoint")
    p = recipe.privacy
    if (p is None or p.noise_multiplier is not None or p.calibration == "client"
            or (RunLayout(run_dir).data / PARTITION_MANIFEST).is_file()):
        return
    raise FedloraError(
        "privacy.target_epsilon needs every site's dataset size to calibrate one DP-SGD noise for the federation, "
        "and the coordinator never sees the sites' data: let each site calibrate its own (privacy.calibration: "
        "client), or calibrate for the smallest site with 'fedlora privacy plan --recipe RECIPE --examples N "
        "--batch-size B --steps S' and set privacy.noise_multiplier in the recipe"
    )


def node_config(client_id: str, data: str | None, state_dir: str, **settings: object) -> str:
    """A SuperNode's ``--node-config`` value: TOML, strings quoted (Flower refuses bare strings)."""
    from fedlora_cli.storage import check_client_id

    check_client_id(client_id)
    pairs: dict[str, object] = {"client-id": client_id}
    if data is not None:
        pairs["data"] = data
    pairs["state-dir"] = str(Path(state_dir).resolve())
    pairs.update({key: value for key, value in settings.items() if value is not None})
    # Paths that exist here are made absolute (a SuperNode runs its apps in another folder); anything else (a Hub
    # dataset or model name) is kept as given.
    for key in ("data", "test-data", "validation-data", "base"):
        if isinstance(pairs.get(key), str) and Path(pairs[key]).exists():
            pairs[key] = str(Path(pairs[key]).resolve())
    return " ".join(f"{key}={_toml(value)}" for key, value in pairs.items())
