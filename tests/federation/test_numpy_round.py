"""fedlora_cli.federation.numpy_round: the mean's one-pass round over the mapped update files. It writes what the
coordinator's screened path (each update read and checked, then streamed into aggregation.weighted_mean) writes, bit
for bit (tensors, digests, manifest, the per-client table), never imports torch, and refuses what the screened path
refuses. (Both against the torch backend they replaced: benchmarks/backend_equivalence.py.)"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from conftest import legacy_tensor_digest
from safetensors.torch import load_file, save_file

from fedlora_cli import aggregation, federation, storage
from fedlora_cli.aggregation import NormBound
from fedlora_cli.errors import FedloraError
from fedlora_cli.federation import numpy_round, server

CLIENTS = ["client-0", "client-1", "client-2"]


def sent(update_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(update_dir / storage.UPDATE_TENSORS))


def second_largest_norm(g: Path, updates: list[Path]) -> float:
    """A norm bound that the largest update exceeds and the others do not."""
    reference = {n: t.numpy() for n, t in load_file(str(g / storage.ADAPTER_WEIGHTS)).items()}
    return sorted(aggregation.update_norm({n: t.numpy() for n, t in sent(u).items()}, reference) for u in updates)[-2]


@pytest.fixture
def both_ways(monkeypatch, tmp_path):
    """Aggregate the same round through the one-pass numpy round and through the screened path (the update
    streamed into aggregation.weighted_mean, as every other strategy receives them); returns both results."""
    calls = []
    real = numpy_round.weighted_mean

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(numpy_round, "weighted_mean", counted)

    def run(g: Path, updates: list[Path], **overrides) -> tuple[federation.AggregateResult, federation.AggregateResult]:
        calls.clear()  # the federation itself may have been simulated since the spy went in
        by_numpy = federation.aggregate_round(g, updates, tmp_path / "numpy", **overrides)
        assert calls == [1], "the numpy round did not run"
        with monkeypatch.context() as m:
            m.setattr(server._RoundContributions, "weighted_mean", aggregation.Contributions.weighted_mean)
            by_screen = federation.aggregate_round(g, updates, tmp_path / "screened", **overrides)
        assert calls == [1], "the screened path ran the numpy round"
        return by_numpy, by_screen

    return run


def assert_identical(by_numpy: federation.AggregateResult, by_screen: federation.AggregateResult) -> None:
    a, b = by_numpy.checkpoint, by_screen.checkpoint
    for name in (storage.ADAPTER_WEIGHTS, storage.CORRECTION_TENSORS):
        assert (a.path / name).exists() == (b.path / name).exists()
        if (a.path / name).exists():
            assert (a.path / name).read_bytes() == (b.path / name).read_bytes(), name
    manifests = [{k: v for k, v in dataclasses.asdict(c.manifest).items() if k != "created"} for c in (a, b)]
    assert manifests[0] == manifests[1]  # digests, the identity, the aggregation report
    assert by_numpy.clients == by_screen.clients  # weights and update norms to the last bit


@pytest.mark.parametrize("case", ["fedavg", "ffa", "fedsa-uniform", "clip", "reject", "vera"])
def test_the_numpy_round_writes_what_the_screened_path_writes(case, make_recipe, strategy_recipe, kind_recipe,
                                                           cached_federation, both_ways):
    recipe = {"ffa": make_recipe("ffa"), "fedsa-uniform": strategy_recipe("fedsa"),
              "vera": kind_recipe("vera", "ffa")}.get(case, make_recipe("fedavg"))
    layout = cached_federation(recipe)
    g, updates = layout.global_checkpoint(0), [layout.update(1, c) for c in CLIENTS]
    overrides = {"fedsa-uniform": {"weighting": "uniform"},
                 "clip": {"norm_bound": second_largest_norm(g, updates)},
                 "reject": {"norm_bound": second_largest_norm(g, updates), "norm_bound_action": "reject"}}.get(case, {})

    by_numpy, by_screen = both_ways(g, updates, **overrides)

    assert_identical(by_numpy, by_screen)
    assert [row.bound for row in by_numpy.clients if row.bound] == {"clip": ["clipped"], "reject": ["rejected"]}.get(case, [])


def test_a_correction_from_an_exact_round_is_carried_as_it_is(strategy_recipe, cached_federation, both_ways):
    layout = cached_federation(strategy_recipe(aggregation="exact"))

    by_numpy, by_screen = both_ways(layout.global_checkpoint(1), [layout.update(2, c) for c in CLIENTS], strategy="mean")

    assert_identical(by_numpy, by_screen)
    parent = storage.read_global(layout.global_checkpoint(1)).manifest
    assert by_numpy.checkpoint.manifest.correction_digests == parent.correction_digests


def test_updates_with_old_sha256_digests_verify(make_recipe, cached_federation, tmp_path, both_ways):
    layout = cached_federation(make_recipe("fedavg"))
    updates = []
    for client in CLIENTS:  # as an older fedlora at the client wrote them
        update = storage.read_update(layout.update(1, client))
        update.manifest.tensor_digests = {n: legacy_tensor_digest(t) for n, t in sent(update.path).items()}
        updates.append(storage.write_update(tmp_path / "old" / client, update.manifest, sent(update.path)).path)

    by_numpy, by_screen = both_ways(layout.global_checkpoint(0), updates)

    assert_identical(by_numpy, by_screen)


def test_the_result_is_the_next_rounds_global_without_a_read(make_recipe, cached_federation, tmp_path, monkeypatch):
    layout = cached_federation(make_recipe("fedavg"))
    result = federation.aggregate_round(layout.global_checkpoint(0), [layout.update(1, c) for c in CLIENTS],
                                        tmp_path / "g1")
    monkeypatch.setattr(storage, "load_verified", lambda *args: pytest.fail("read the global again"))

    tensors = result.checkpoint.verified_tensors  # what the next round's clients train from: the same memory

    arrays = result.checkpoint.verified_arrays
    assert set(tensors) == set(arrays) and all(tensors[n].data_ptr() == arrays[n].ctypes.data for n in arrays)
    assert all(torch.equal(tensors[n], t) for n, t in load_file(str(tmp_path / "g1" / storage.ADAPTER_WEIGHTS)).items())


def test_progress_is_reported_per_update(make_recipe, cached_federation, tmp_path):
    layout = cached_federation(make_recipe("fedavg"))
    seen = []

    federation.aggregate_round(layout.global_checkpoint(0), [layout.update(1, c) for c in CLIENTS], tmp_path / "g1",
                               progress=lambda done, total: seen.append((done, total)))

    assert seen == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize("options, one_pass", [
    ({}, True),
    ({"norm_bound": 1e9, "norm_bound_action": "reject"}, True),
    ({"strategy": "median"}, False),
    ({"strategy": "svd"}, False),
    ({"server_privacy": "DP"}, False),  # DP-FedAvg streams the clipped deltas into the mean instead
])
def test_the_mean_takes_the_one_pass_round_and_nothing_else_does(options, one_pass, make_recipe, federation_copy,
                                                                 tmp_path, monkeypatch):
    from fedlora_cli import recipe as recipes

    layout = federation_copy(make_recipe("fedavg"))  # DP-FedAvg writes its ledger beside the global checkpoints
    calls = []
    real = numpy_round.weighted_mean
    monkeypatch.setattr(numpy_round, "weighted_mean", lambda *args: calls.append(1) or real(*args))
    if options.get("server_privacy"):
        options = {"server_privacy": recipes.ServerPrivacySection(clip_norm=1.0, noise_multiplier=0.0)}

    federation.aggregate_round(layout.global_checkpoint(0), [layout.update(1, c) for c in CLIENTS], tmp_path / "g1",
                               server_ledger=tmp_path / "ledger.json", **options)

    assert calls == ([1] if one_pass else [])


# --------------------------------------------------------------------------------------------------------
# What it refuses, each in one line


def direct(layout, updates: list[Path], bound: float | None = None, expected=None):
    """numpy_round.weighted_mean on updates of round 1, as aggregate_round calls it."""
    g = federation.Global.of(layout.global_checkpoint(0))
    header = {n: d for n, d in g.header.items() if g.plan.sends(n)}
    reference = {n: g.verified_arrays[n] for n in header}
    weights = [1 / len(updates)] * len(updates)
    return numpy_round.weighted_mean([storage.read_update(u) for u in updates], weights, reference,
                                     expected or header, NormBound(bound), lambda *args: None)


def damaged(layout, tmp_path: Path, value: float, keep_digest: bool, client: str = "client-0",
            pick=max) -> tuple[Path, str]:
    """A client's update with one value of one tensor (the last by name) replaced; its manifest's digest updated to
    match if ``keep_digest``."""
    bad = tmp_path / f"bad-{client}"
    update = storage.read_update(layout.update(1, client))
    tensors = sent(update.path)
    name = pick(tensors)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = value
    if keep_digest:
        update.manifest.tensor_digests[name] = storage.tensor_digest(tensors[name])
    storage.write_update(bad, update.manifest, sent(update.path))
    save_file(tensors, str(bad / storage.UPDATE_TENSORS))
    return bad, name


@pytest.mark.parametrize("bound", [None, 1e9, 1e-9])
@pytest.mark.parametrize("value, keep_digest, needle", [
    (float("nan"), True, "holds NaN or Inf"),
    (float("inf"), True, "holds NaN or Inf"),
    (float("nan"), False, "does not match the digest"),  # a damaged file is refused as damaged first
    (0.123, False, "does not match the digest"),
])
def test_a_bad_tensor_is_refused_by_name(value, keep_digest, needle, bound, make_recipe, cached_federation, tmp_path):
    layout = cached_federation(make_recipe("fedavg"))
    bad, name = damaged(layout, tmp_path, value, keep_digest)
    good = [layout.update(1, c) for c in CLIENTS[1:]]

    with pytest.raises(FedloraError) as caught:
        direct(layout, [*good, bad], bound)

    message = str(caught.value)
    assert needle in message and f"tensor '{name}'" in message and str(bad) in message and "\n" not in message


def test_a_tensor_file_that_changed_since_it_was_checked_is_refused(make_recipe, cached_federation):
    layout = cached_federation(make_recipe("fedavg"))
    g = federation.Global.of(layout.global_checkpoint(0))
    header = {n: d for n, d in g.header.items() if g.plan.sends(n)}
    name = min(header)
    dtype, shape = header[name]

    with pytest.raises(FedloraError, match="its tensor file changed while aggregating"):
        direct(layout, [layout.update(1, "client-0")], expected={**header, name: (dtype, (*shape, 1))})


@pytest.mark.parametrize("group", [1, 2, numpy_round._GROUP])
def test_the_first_bad_update_is_the_one_named(group, make_recipe, cached_federation, tmp_path, monkeypatch):
    # The second update is mapped while the first is averaged (or visited with it, in one group); its refusal
    # waits for its turn.
    monkeypatch.setattr(numpy_round, "_GROUP", group)
    layout = cached_federation(make_recipe("fedavg"))
    first, name = damaged(layout, tmp_path, 0.123, keep_digest=False)
    second = tmp_path / "garbage"
    shutil.copytree(layout.update(1, "client-1"), second)
    (second / storage.UPDATE_TENSORS).write_bytes(b"not safetensors at all")

    with pytest.raises(FedloraError, match=rf"{first}.*tensor '{name}' does not match the digest"):
        direct(layout, [first, second])
    with pytest.raises(FedloraError, match=rf"{second}.* is not a readable safetensors file"):
        direct(layout, [layout.update(1, "client-0"), second])
    # Visited together, tensor by tensor: the second update's first tensor is bad, the first's last one.
    late, late_name = damaged(layout, tmp_path, float("nan"), keep_digest=True, client="client-2")
    early, _ = damaged(layout, tmp_path, float("nan"), keep_digest=True, client="client-1", pick=min)
    for bound in (None, 1e9):
        with pytest.raises(FedloraError, match=rf"{late}: tensor '{late_name}' holds NaN"):
            direct(layout, [late, early], bound)


@pytest.mark.parametrize("group", [1, 2])
def test_the_grouping_changes_no_bit(group, make_recipe, cached_federation, monkeypatch):
    layout = cached_federation(make_recipe("fedavg"))
    updates = [layout.update(1, c) for c in CLIENTS]
    bound = second_largest_norm(layout.global_checkpoint(0), updates)
    grouped = [direct(layout, updates, b) for b in (None, bound)]

    monkeypatch.setattr(numpy_round, "_GROUP", group)
    regrouped = [direct(layout, updates, b) for b in (None, bound)]

    for a, b in zip(grouped, regrouped):
        assert set(a) == set(b) and all(a[n].tobytes() == b[n].tobytes() for n in a)


_TRUNCATING_AGGREGATE = """
import os, sys
from fedlora_cli.aggregation import arrays
from fedlora_cli.cli import app

real, updates = arrays.squared_distance, sys.argv[3:-2]

def truncating(*args, **kwargs):
    # Another process cuts every update file short once the round has begun reading their tensors.
    for update in updates:
        path = os.path.join(update, "update.safetensors")
        if os.path.getsize(path) > 0:
            os.truncate(path, 0)
    return real(*args, **kwargs)

arrays.squared_distance = truncating
app(sys.argv[1:], prog_name="fedlora")
"""


def test_an_update_file_truncated_by_another_process_mid_round_is_one_line_not_sigbus(make_recipe, federation_copy,
                                                                                       tmp_path):
    """Issue 28: the mean round read each update through a memory map, and a file another process truncated under
    it killed the coordinator with SIGBUS. In a subprocess, since SIGBUS would kill the test run."""
    import os
    import subprocess
    import sys

    layout = federation_copy(make_recipe("fedavg"))
    out = tmp_path / "g1-again"
    args = ["aggregate", str(layout.global_checkpoint(0)), *[str(layout.update(1, c)) for c in CLIENTS],
            "--out", str(out)]
    done = subprocess.run([sys.executable, "-c", _TRUNCATING_AGGREGATE, *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "200"}, cwd=tmp_path)
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "cut short" in lines[0], lines
    assert not out.exists()
