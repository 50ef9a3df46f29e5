"""``fedlora privacy``: spending reports and noise planning."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedlora_cli.cli.app import command, privacy_app
from fedlora_cli.cli.options import JsonOpt
from fedlora_cli.errors import FedloraError


@command(privacy_app, "report")
def privacy_report(
    path: Annotated[Path, typer.Argument(help="A client state folder, a simulate run folder, or a global checkpoint.")],
    as_json: JsonOpt = False,
) -> None:
    """Privacy spent: each round's (noise, sample rate, steps) and the cumulative (epsilon, delta)."""
    from fedlora_cli.cli import ui
    from fedlora_cli.privacy import report

    entries = report.collect(path)
    if as_json:
        ui.print_json(entries)
        return
    for entry in entries:
        rows = [[i + 1, f"{s:.4f}", f"{q:.5f}", n, f"{eps:.3f}"] for i, ((s, q, n), eps) in enumerate(zip(entry["history"], entry["epsilon_after"]))]
        budget = f", budget {entry['budget']:g}" if entry.get("budget") is not None else ""
        title = f"{entry['who']}: epsilon {entry['epsilon']:.3f} at delta {entry['delta']:g}{budget} ({entry['accountant']})"
        ui.out.print(ui.table(title, ["entry", "noise", "sample rate", "steps", "epsilon after"], rows))


@command(privacy_app, "plan")
def privacy_plan(
    epsilon: Annotated[float, typer.Option("--epsilon", help="Target epsilon over the whole federation.")],
    examples: Annotated[int, typer.Option("--examples", help="The (smallest) client's number of examples.")],
    batch_size: Annotated[int, typer.Option("--batch-size", help="Expected batch size (Poisson sampling).")],
    steps: Annotated[int, typer.Option("--steps", help="Local steps per round.")],
    rounds: Annotated[int, typer.Option("--rounds", help="Rounds the client takes part in.")],
    delta: Annotated[float, typer.Option("--delta", help="Target delta.")] = 1e-5,
    accountant: Annotated[str, typer.Option("--accountant", help="prv or rdp.")] = "prv",
    as_json: JsonOpt = False,
) -> None:
    """The noise multiplier a budget needs for a plan (what init calibrates from a recipe)."""
    from fedlora_cli import privacy, recipe as recipes
    from fedlora_cli.cli import ui

    if epsilon <= 0 or not 0 < delta < 1 or examples < 1 or batch_size < 1 or steps < 1 or rounds < 1:
        raise FedloraError("--epsilon must be > 0, --delta in (0, 1), and the counts at least 1")
    if accountant not in recipes.ACCOUNTANTS:
        raise FedloraError(f"--accountant must be {' or '.join(recipes.ACCOUNTANTS)}")
    privacy.check_delta(delta, examples, "this client")
    q = privacy.client_plan(examples, batch_size, steps, None).sample_rate  # as init calibrates it
    sigma = privacy.calibrate(epsilon, delta, q, steps * rounds, accountant)
    result = {"noise_multiplier": sigma, "sample_rate": q, "total_steps": steps * rounds, "epsilon": epsilon,
              "delta": delta, "accountant": accountant,
              "epsilon_check": privacy.epsilon([(sigma, q, steps * rounds)], delta, accountant)}
    if as_json:
        ui.print_json(result)
        return
    rows = [[k.replace("_", " "), ui.fmt(v)] for k, v in result.items()]
    ui.out.print(ui.table("DP-SGD noise for this plan", ["quantity", "value"], rows))
