"""Server optimisers (FedAvgM, FedAdam, FedYogi) on numpy arrays against hand computations (in torch), and their
state in the global checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedlora_cli import federation, storage
from fedlora_cli.adapters.methods import plan
from fedlora_cli.aggregation import Aggregate, Contributions, RoundSpec, Strategy
from fedlora_cli.aggregation.server_optimizers import FedAdam, FedAvgM, FedYogi, state_name
from fedlora_cli.errors import FedloraError

runner = CliRunner()


class Fixed(Strategy):
    """An inner strategy whose aggregate is given (the hand-made tensors of a round)."""

    name = "mean"

    def __init__(self, tensors):
        self.tensors = {n: t.numpy() for n, t in tensors.items()}

    def aggregate(self, contributions, spec):
        return Aggregate(dict(self.tensors))


def spec_for(reference) -> RoundSpec:
    return RoundSpec(sorted(reference), None, 16.0, 8, lambda c: 8, {n: t.numpy() for n, t in reference.items()})


def tensors(arrays) -> dict[str, torch.Tensor]:
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in arrays.values())
    return {n: torch.from_numpy(a) for n, a in arrays.items()}


def test_fedavgm_step_equals_the_hand_computation():
    x = {"w": torch.tensor([1.0, -2.0, 0.5])}
    agg1, agg2 = torch.tensor([1.5, -2.5, 0.5]), torch.tensor([2.0, -3.0, 1.5])
    opt = FedAvgM(inner=Fixed({"w": agg1}), lr=0.5, beta1=0.9, beta2=0.0, tau=1.0)
    first = opt.aggregate(Contributions([]), spec_for(x))
    delta1 = agg1 - x["w"]
    torch.testing.assert_close(tensors(first.tensors)["w"], x["w"] + 0.5 * delta1)
    x2 = {"w": tensors(first.tensors)["w"]}
    opt2 = FedAvgM(inner=Fixed({"w": agg2}), lr=0.5, beta1=0.9, beta2=0.0, tau=1.0, state=first.server_state)
    second = opt2.aggregate(Contributions([]), spec_for(x2))
    v = 0.9 * delta1 + (agg2 - x2["w"])
    torch.testing.assert_close(tensors(second.tensors)["w"], x2["w"] + 0.5 * v)
    torch.testing.assert_close(tensors(second.server_state)[state_name("momentum", "w")], v)


def test_fedadam_and_fedyogi_steps_equal_the_hand_computation():
    x = {"w": torch.tensor([0.2, -0.1, 0.0, 1.0])}
    agg = torch.tensor([0.3, -0.4, 0.0, 1.1])
    delta = agg - x["w"]
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    m = (1 - b1) * delta
    settings = {"lr": lr, "beta1": b1, "beta2": b2, "tau": tau}
    adam = FedAdam(inner=Fixed({"w": agg}), **settings).aggregate(Contributions([]), spec_for(x))
    v_adam = b2 * tau**2 + (1 - b2) * delta**2
    torch.testing.assert_close(tensors(adam.tensors)["w"], x["w"] + lr * m / (v_adam.sqrt() + tau))
    yogi = FedYogi(inner=Fixed({"w": agg}), **settings).aggregate(Contributions([]), spec_for(x))
    v0 = torch.full_like(delta, tau**2)
    v_yogi = v0 - (1 - b2) * delta**2 * torch.sign(v0 - delta**2)
    torch.testing.assert_close(tensors(yogi.tensors)["w"], x["w"] + lr * m / (v_yogi.sqrt() + tau))
    torch.testing.assert_close(tensors(adam.server_state)[state_name("variance", "w")], v_adam)
    assert not np.array_equal(adam.tensors["w"], yogi.tensors["w"])  # the two second moments differ


def test_server_optimizers_take_their_settings_by_name():
    with pytest.raises(TypeError):
        FedAdam(Fixed({}), 0.1, 0.9, 0.99, 1e-3)  # four floats side by side: which is which?


def test_fedavgm_without_momentum_at_rate_one_is_plain_fedavg(scaled, tmp_path):
    plain = run(scaled(clients=3, rounds=2), tmp_path / "plain")
    avgm = run(scaled(clients=3, rounds=2, server_optimizer="fedavgm", server_momentum=0.0, server_lr=1.0),
               tmp_path / "avgm")
    for r in (1, 2):
        a = load_file(str(plain.global_checkpoint(r) / storage.ADAPTER_WEIGHTS))
        b = load_file(str(avgm.global_checkpoint(r) / storage.ADAPTER_WEIGHTS))
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-7)


def test_server_optimizer_state_resumes_from_the_checkpoint_exactly(scaled, tmp_path):
    """Round 2 aggregated again in a fresh call, from the files alone, equals the simulation's round 2."""
    recipe = scaled(clients=3, rounds=2, server_optimizer="fedadam")
    layout = run(recipe, tmp_path / "run")
    g1 = storage.read_global(layout.global_checkpoint(1))
    assert g1.manifest.server_state_digests and (g1.path / storage.SERVER_STATE_TENSORS).is_file()
    again = federation.aggregate_round(layout.global_checkpoint(1), [layout.update(2, c) for c in
                                                                      ("client-0", "client-1", "client-2")],
                                       tmp_path / "g2-again")
    simulated = storage.read_global(layout.global_checkpoint(2)).manifest
    assert again.checkpoint.manifest.digest == simulated.digest
    assert again.checkpoint.manifest.server_state_digests == simulated.server_state_digests


def test_server_optimizer_moves_only_what_the_method_sends(scaled, tmp_path):
    layout = run(scaled("ffa", clients=3, rounds=1, server_optimizer="fedadam"), tmp_path / "run")
    g0 = load_file(str(layout.global_checkpoint(0) / storage.ADAPTER_WEIGHTS))
    g1 = load_file(str(layout.global_checkpoint(1) / storage.ADAPTER_WEIGHTS))
    state = load_file(str(layout.global_checkpoint(1) / storage.SERVER_STATE_TENSORS))
    p = plan("ffa", "shared")
    for name in g0:
        if p.sends(name):
            assert state_name("momentum", name) in state
        else:  # FFA's A is frozen
            assert torch.equal(g0[name], g1[name]) and state_name("momentum", name) not in state


def test_a_tampered_server_state_is_refused(scaled, tmp_path):
    layout = run(scaled(clients=3, rounds=1, server_optimizer="fedavgm"), tmp_path / "run")
    path = layout.global_checkpoint(1) / storage.SERVER_STATE_TENSORS
    state = load_file(str(path))
    from safetensors.torch import save_file

    save_file({k: v + 1 for k, v in state.items()}, str(path))
    with pytest.raises(FedloraError, match=r"server_state.safetensors: tensor .* does not match the digest"):
        federation.aggregate_round(layout.global_checkpoint(1), [layout.update(1, "client-0")], tmp_path / "x")


@pytest.mark.parametrize("edit", ["strip", "unlist"])
def test_a_stripped_server_state_is_refused_by_name_before_anything_is_written(scaled, federation_copy, edit):
    """Issue 28: the state file deleted and its digests emptied (or only its digests emptied) used to pass, the
    moments silently restarting from zero. The identity is recomputed from the digests the manifest lists."""
    import json

    from cli.helpers import fails

    layout = federation_copy(scaled(clients=3, rounds=2, server_optimizer="fedadam"))
    g1 = layout.global_checkpoint(1)
    manifest = json.loads((g1 / storage.GLOBAL_MANIFEST).read_text())
    manifest["server_state_digests"] = {}
    (g1 / storage.GLOBAL_MANIFEST).write_text(json.dumps(manifest))
    if edit == "strip":
        (g1 / storage.SERVER_STATE_TENSORS).unlink()
    out = layout.root / "again"
    needle = "digest is not the one its listed tensor digests give" if edit == "strip" else "does not list"
    fails(["aggregate", g1, *[layout.update(2, c) for c in ("client-0", "client-1", "client-2")], "--out", out],
          "server_state" if edit == "unlist" else str(g1), needle)
    assert not out.exists()


def test_a_listed_file_that_is_missing_is_refused(scaled, federation_copy):
    layout = federation_copy(scaled(clients=3, rounds=1, server_optimizer="fedavgm"))
    (layout.global_checkpoint(1) / storage.SERVER_STATE_TENSORS).unlink()
    with pytest.raises(FedloraError, match="lacks server_state.safetensors, which its manifest lists"):
        storage.read_global(layout.global_checkpoint(1))
