"""``fedlora privacy``: spending reports and noise planning."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fedlora_cli.cli.app import command, privacy_app
from fedlora_cli.cli.options import JsonOpt
from fedlora_cli.errors import FedloraError


@command(privacy_app, "report")
def privacy_report(
    path: Annotated[Path, typer.Argument(help="A client state folder, a run folder (simulate's or the Flower server app's), or a global checkpoint.")],
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
        if entry.get("not_aggregated"):
            rounds = ", ".join(str(r) for r in entry["not_aggregated"])
            ui.out.print(f"note: this epsilon counts round(s) {rounds}, whose global checkpoint did not aggregate the "
                         "client's update (it came after the round's deadline, or was refused): an over-count, "
                         "which is safe")


# What the plans' noise/signal ratio leaves out (benchmarks/dp_signal.py, on ffa-lora-dp).
_RATIO_NOTE = (
    "noise/signal takes the averaged clipped gradient at its largest norm, C, spread over all d coordinates; "
    "per-example gradients that disagree average to less (0.12 C at ffa-lora-dp's first step), and a new head "
    "holds nearly all of it (99.9% there) in few coordinates, whose own ratio is far lower: "
    "benchmarks/dp_signal.py measures both, and benchmarks/results/RESULTS.md says which plans learned"
)


@command(privacy_app, "plan")
def privacy_plan(
    examples: Annotated[int, typer.Option("--examples", help="The (smallest) client's number of examples.")],
    recipe: Annotated[
        Optional[Path],
        typer.Option("--recipe", help="Recipe file or shipped recipe name: its method and model give the trained "
                                      "coordinates d, its privacy section and rounds the defaults below."),
    ] = None,
    epsilon: Annotated[Optional[float], typer.Option("--epsilon", help="Target epsilon over the whole federation.")] = None,
    delta: Annotated[Optional[float], typer.Option("--delta", help="Target delta (default: the recipe's, else 1e-5).")] = None,
    rounds: Annotated[Optional[int], typer.Option("--rounds", help="Rounds the client takes part in.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="One plan: expected logical batch.")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="One plan: local steps per round.")] = None,
    coordinates: Annotated[
        Optional[int], typer.Option("--coordinates", help="Trained coordinates d, without a recipe.")
    ] = None,
    accountant: Annotated[Optional[str], typer.Option("--accountant", help="prv or rdp (default: the recipe's, else prv).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Choose a DP-SGD plan: candidate (logical batch, steps per round) pairs for a budget, with the noise each
    needs and the expected noise-to-signal ratio sigma * sqrt(d) / B, and a recommendation. With --batch-size
    and --steps: the noise multiplier of that one plan (what init calibrates from a recipe).

    Example: [cyan]fedlora privacy plan --recipe ffa-lora-dp --examples 2562 --epsilon 3[/]
    """
    from fedlora_cli import privacy, recipe as recipes
    from fedlora_cli.cli import ui
    from fedlora_cli.cli.app import _load_recipe
    from fedlora_cli.privacy import planning

    r = _load_recipe(recipe, None) if recipe is not None else None
    p = r.privacy if r is not None else None
    epsilon = epsilon if epsilon is not None else (p.target_epsilon if p is not None else None)
    delta = delta if delta is not None else (p.delta if p is not None else 1e-5)
    rounds = rounds if rounds is not None else (r.federation.rounds if r is not None else None)
    accountant = accountant or (p.accountant if p is not None else "prv")
    if epsilon is None or rounds is None:
        raise FedloraError("give --epsilon and --rounds, or a --recipe whose privacy section and rounds say them")
    if epsilon <= 0 or not 0 < delta < 1 or examples < 1 or rounds < 1:
        raise FedloraError("--epsilon must be > 0, --delta in (0, 1), and --examples and --rounds at least 1")
    if accountant not in recipes.ACCOUNTANTS:
        raise FedloraError(f"--accountant must be {' or '.join(recipes.ACCOUNTANTS)}")
    privacy.check_delta(delta, examples, "this client")
    if (batch_size is None) != (steps is None):
        raise FedloraError("--batch-size and --steps go together (one plan); leave both out for candidates")
    if batch_size is not None:
        _one_plan(epsilon, delta, examples, batch_size, steps, rounds, accountant, as_json)
        return
    d = coordinates if coordinates is not None else _trained_coordinates(r)
    with ui.step_progress("calibrating candidates") as progress:
        found = planning.candidates(examples, epsilon, delta, rounds, d, progress=lambda i, n: progress(i, n, float("nan")))
    best = planning.recommend(found, examples, epsilon, delta, rounds, d, accountant)
    _show_candidates(found, best, examples=examples, epsilon=epsilon, delta=delta, rounds=rounds, coordinates=d,
                     as_json=as_json)


def _show_candidates(found, best, *, examples: int, epsilon: float, delta: float, rounds: int, coordinates: int,
                     as_json: bool) -> None:
    """The candidate plans as a table (or JSON) and the recommended one."""
    from fedlora_cli.cli import ui
    from fedlora_cli.privacy import planning

    d = coordinates
    if as_json:
        ui.print_json({"examples": examples, "epsilon": epsilon, "delta": delta, "rounds": rounds, "coordinates": d,
                       "candidates": [c.to_dict() for c in found], "recommended": best and best.to_dict(),
                       "recommended_epsilon": best and planning.spent(best, rounds, delta)})
        return
    rows = [[c.batch, c.steps_per_round, f"{c.epochs:.2f}", f"{c.sample_rate:.4f}", f"{c.noise_multiplier:.3f}",
             f"{c.noise_to_signal:.3f}"] for c in found]
    title = f"DP-SGD plans for n={examples}, epsilon {epsilon:g}, delta {delta:g}, {rounds} rounds, d={d:,} (rdp)"
    ui.out.print(ui.table(title, ["batch", "steps/round", "epochs", "q", "sigma", "noise/signal"], rows))
    if best is None:
        ui.out.print(f"no candidate takes {planning.MIN_STEPS_PER_ROUND}+ steps a round over at least one epoch: "
                     "too few examples for this budget and these rounds")
        return
    ui.out.print(
        f"recommended: training.batch_size {best.batch}, training.local_steps {best.steps_per_round} "
        f"(sigma {best.noise_multiplier:.3f} by {best.accountant}, noise/signal {best.noise_to_signal:.3f}, "
        f"epsilon {planning.spent(best, rounds, delta):.3f}); raise training.lr with the batch"
    )
    ui.out.print(f"[dim]{_RATIO_NOTE}[/]")


def _trained_coordinates(r) -> int:
    if r is None:
        raise FedloraError("give --recipe (or --coordinates) to count the coordinates a client trains")
    from fedlora_cli.adapters.methods import plan
    from fedlora_cli.model.workbench import trained_coordinates

    return trained_coordinates(r, plan(r.federation.method, r.federation.head, r.adapter.kind), r.model.num_labels)


def _one_plan(epsilon: float, delta: float, examples: int, batch_size: int, steps: int, rounds: int,
              accountant: str, as_json: bool) -> None:
    from fedlora_cli import privacy
    from fedlora_cli.cli import ui

    if batch_size < 1 or steps < 1:
        raise FedloraError("--batch-size and --steps must be at least 1")
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
