"""The coordinator never imports torch (issue 25): `fedlora aggregate`, run in a fresh process through the CLI's own
entry point, completes for every strategy, with the norm bound, under DP-FedAvg and with a server optimiser, for
FedAvg-LoRA and FFA-LoRA, and torch is not in sys.modules at the end. (Moved here from test_numpy_round.py, where it
covered the plain mean only.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file

import fedlora_cli
from fedlora_cli import storage
from fedlora_cli.aggregation import STRATEGIES, update_norm

CLIENTS = ["client-0", "client-1", "client-2"]
TRIM = ["--trim-fraction", "0.34"]  # of 3 updates, one at each end
DP = ["--dp-clip", "0.5", "--dp-noise", "1.0"]

SCRIPT = """
import sys
from fedlora_cli.cli import main
sys.argv = ["fedlora", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    if exc.code:
        raise
print("torch imported" if "torch" in sys.modules else "torch not imported", file=sys.stderr)
"""


def aggregate_in_a_fresh_process(layout, out: Path, *options: str) -> dict:
    """`fedlora aggregate` of round 1 in a new interpreter; its --json result, after checking torch stayed out."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(fedlora_cli.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    args = ["aggregate", layout.global_checkpoint(0), *[layout.update(1, c) for c in CLIENTS], "--out", out, *options,
            "--json"]
    done = subprocess.run([sys.executable, "-c", SCRIPT, *map(str, args)], capture_output=True, text=True, env=env,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "torch not imported"
    return json.loads(done.stdout)


def second_largest_norm(layout) -> str:
    """A norm bound that the largest update exceeds and the others do not."""
    reference = load_file(str(layout.global_checkpoint(0) / storage.ADAPTER_WEIGHTS))
    norms = [update_norm(load_file(str(layout.update(1, c) / storage.UPDATE_TENSORS)), reference) for c in CLIENTS]
    return str(sorted(norms)[-2])


def strategy_options(name: str) -> list[str]:
    return ["--strategy", name, *(TRIM if name == "trimmed-mean" else [])]


BOUNDS = {"no bound": [], "clip": ["--norm-bound", "BOUND"],
          "reject": ["--norm-bound", "BOUND", "--norm-bound-action", "reject"]}
# Every strategy with every bound, but the trimmed mean with a rejection: 2 updates left, none to trim (refused).
CASES = [pytest.param(name, bound, id=f"{name}-{label}") for name in STRATEGIES for label, bound in BOUNDS.items()
         if (name, label) != ("trimmed-mean", "reject")]


@pytest.mark.parametrize("name, bound", CASES)
def test_every_strategy_aggregates_without_torch(name, bound, strategy_recipe, cached_federation, tmp_path):
    layout = cached_federation(strategy_recipe())
    bound = [second_largest_norm(layout) if o == "BOUND" else o for o in bound]

    result = aggregate_in_a_fresh_process(layout, tmp_path / "g1", *strategy_options(name), *bound)

    assert result["round"] == 1 and result["aggregation"]["strategy"] == name
    screened = {"clip": "clipped", "reject": "rejected"}.get(bound[-1] if bound else "", None)
    if screened:  # the bound did its work, one update
        assert len(result["aggregation"][screened]) == 1


@pytest.mark.parametrize("options", [[], ["--norm-bound", "BOUND"], ["--norm-bound", "BOUND", "--norm-bound-action",
                                                                   "reject"], strategy_options("median")],
                         ids=["mean", "clip", "reject", "median"])
def test_ffa_aggregates_without_torch(options, make_recipe, cached_federation, tmp_path):
    """FFA-LoRA sends B alone: the frozen A stays the global's, read but never aggregated."""
    layout = cached_federation(make_recipe("ffa"))
    options = [second_largest_norm(layout) if o == "BOUND" else o for o in options]

    result = aggregate_in_a_fresh_process(layout, tmp_path / "g1", *options)

    assert result["round"] == 1


def test_dp_fedavg_aggregates_without_torch(strategy_recipe, federation_copy, tmp_path):
    layout = federation_copy(strategy_recipe())  # DP-FedAvg writes its ledger beside the global checkpoints

    result = aggregate_in_a_fresh_process(layout, tmp_path / "g1", *DP)

    assert result["round"] == 1 and result["server_epsilon"] > 0


@pytest.mark.parametrize("options", [strategy_options("mean"), strategy_options("median"),
                                     strategy_options("trimmed-mean"), DP],
                         ids=["mean", "median", "trimmed-mean", "dp-fedavg"])
def test_a_server_optimiser_aggregates_without_torch(options, strategy_recipe, federation_copy, tmp_path):
    layout = federation_copy(strategy_recipe(server_optimizer="fedadam"))

    result = aggregate_in_a_fresh_process(layout, tmp_path / "g1", *options)

    manifest = json.loads((tmp_path / "g1" / storage.GLOBAL_MANIFEST).read_text())
    assert result["round"] == 1 and manifest["aggregation"]["server_optimizer"] == "fedadam"
    assert manifest["server_state_digests"], "the optimiser's moments were written"
