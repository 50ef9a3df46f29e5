"""fedlora_cli.federation.common: what every step of a round shares: the Global checkpoint read and verified once,
and the global adapter as a client of a lower rank receives it."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import QuietReporter
from safetensors.torch import load_file

from fedlora_cli import storage
from fedlora_cli.adapters.kinds import adapter_kind
from fedlora_cli.adapters.roles import ROLE_A, ROLE_B, role_of

CLIENTS = ["client-0", "client-1", "client-2"]


ALPHA, RANK = 8.0, 4  # conftest's adapter: r = 4, alpha = 8


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / storage.ADAPTER_WEIGHTS))


def sent(layout, round_: int, client: str) -> dict[str, torch.Tensor]:
    return load_file(str(layout.update(round_, client) / storage.UPDATE_TENSORS))


def test_heterogeneous_ranks_each_client_trains_and_receives_its_own_rank(strategy_recipe, tmp_path, monkeypatch):
    from fedlora_cli.federation import simulate
    from fedlora_cli.model import training

    ranks = {"client-0": 1, "client-1": 2}  # client-2 trains the global rank 4
    recipe = strategy_recipe(client_ranks=ranks, aggregation="svd")
    received: list[dict[str, torch.Tensor]] = []
    real = training.local_train

    def spy(bench, plan, examples, seed, progress=None, dp=None):
        received.append({n: t.clone() for n, t in bench.adapter_tensors().items()})
        return real(bench, plan, examples, seed, progress, dp)

    monkeypatch.setattr(training, "local_train", spy)
    layout = simulate.RunLayout(tmp_path / "run")
    rows = simulate.simulate(recipe, layout.root, QuietReporter())

    rank_of = {c: ranks.get(c, RANK) for c in CLIENTS}
    for round_ in (1, 2):
        g = weights_of(layout.global_checkpoint(round_))
        assert all(t.shape[0] == RANK for n, t in g.items() if role_of(n) == ROLE_A), "the global holds rank r"
        for client in CLIENTS:
            for name, t in sent(layout, round_, client).items():
                if role_of(name) == ROLE_A:
                    assert t.shape[0] == rank_of[client]
                if role_of(name) == ROLE_B:
                    assert t.shape[1] == rank_of[client]
    # Round 2 starts (calls 4..6) from the round-1 global truncated to each client's rank, rescaled to its scale.
    g1 = weights_of(layout.global_checkpoint(1))
    for k, client in enumerate(CLIENTS):
        r = rank_of[client]
        start = received[3 + k]
        for layer, (a, b) in adapter_kind("lora").layers(g1).items():
            assert start[a].shape == (r, g1[a].shape[1]) and start[b].shape == (g1[b].shape[0], r)
            torch.testing.assert_close(start[a], g1[a][:r])
            torch.testing.assert_close(start[b], g1[b][:, :r] * (ALPHA / RANK) / (ALPHA / r))
    # Every client's personalised model (the global at its rank) is evaluated.
    assert rows[-1]["personalised_accuracy"] is not None
