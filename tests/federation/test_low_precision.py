"""The coordinator on bfloat16 and float16 updates (issue 25): numpy has no bfloat16, so the tensors are widened to
float32 exactly, aggregated, and the result written back in the clients' dtype, rounded once, to nearest even, as
torch rounds; the written checkpoint verifies and its tensors are what torch computes from the same files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlora_cli import federation, recipe as recipes, storage
from fedlora_cli.adapters.methods import plan

NAMES = [f"base_model.model.model.layers.0.self_attn.{p}.{f}.weight" for p in ("q_proj", "v_proj")
         for f in ("lora_A", "lora_B")]
COUNTS = [30, 50, 20]


def write_round(root: Path, dtype: torch.dtype) -> tuple[Path, list[Path]]:
    """A global checkpoint of round 0 and three round-1 updates in ``dtype``, through fedlora's writers."""
    recipe = recipes.from_dict({"name": "low-precision", "model": {"base": "synthetic", "num_labels": 2},
                                "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                                "federation": {"method": "fedavg", "head": "frozen", "clients": 3}})
    generator = torch.Generator().manual_seed(0)
    shapes = {n: (4, 24) if "lora_A" in n else (24, 4) for n in NAMES}
    tensors = {n: (torch.randn(s, generator=generator) * 0.1).to(dtype) for n, s in shapes.items()}
    digests = federation.digests(tensors)
    manifest = storage.GlobalManifest(
        round=0, method="fedavg", head="frozen", adapter_kind="lora", base_model="synthetic", base_fingerprint="x",
        recipe=recipe.to_dict(), recipe_digest=recipe.digest(), seed=0, num_labels=2, tensor_digests=digests,
        digest=storage.combined_digest(digests), frozen_digest=federation.frozen_digest(plan("fedavg", "frozen"), digests))
    g = storage.write_global(root / "g0", manifest, tensors, {"peft_type": "LORA"}).path
    updates = []
    for k, n in enumerate(COUNTS):
        sent = {name: (t.float() + torch.randn(t.shape, generator=generator) * 0.01 * (k + 1)).to(dtype)
                for name, t in tensors.items()}
        m = storage.UpdateManifest(
            client_id=f"client-{k}", round=1, parent_digest=manifest.digest, method="fedavg",
            recipe_digest=manifest.recipe_digest, base_fingerprint="x", frozen_digest=manifest.frozen_digest,
            num_examples=n, shard_examples=n, steps=1, loss=0.5, seconds=1.0, bytes=0,
            tensor_digests=federation.digests(sent))
        updates.append(storage.write_update(root / f"client-{k}", m, sent).path)
    return g, updates


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy", ["mean", "median"])
def test_low_precision_updates_are_aggregated_in_float32_and_written_in_their_dtype(dtype, strategy, tmp_path):
    g, updates = write_round(tmp_path, dtype)

    result = federation.aggregate_round(g, updates, tmp_path / "g1", strategy=strategy)

    written = load_file(str(tmp_path / "g1" / storage.ADAPTER_WEIGHTS))
    sent = [load_file(str(u / storage.UPDATE_TENSORS)) for u in updates]
    p = [n / sum(COUNTS) for n in COUNTS]
    for name in NAMES:
        values = [s[name].float() for s in sent]  # widened exactly, as the coordinator widens them
        if strategy == "mean":
            by_torch = values[0] * p[0]
            for v, w in zip(values[1:], p[1:]):
                by_torch = by_torch + v * w
        else:
            by_torch = torch.stack(values).median(dim=0).values  # three values: the middle one, no averaging
        assert written[name].dtype == dtype
        assert torch.equal(written[name], by_torch.to(dtype)), name  # rounded once, to nearest even
    # The checkpoint verifies (digests of the bfloat16 bytes, named as torch names them) and the next round reads it.
    again = federation.Global.of(result.checkpoint.path)
    assert all(torch.equal(again.verified_tensors[n], written[n]) for n in NAMES)
    assert all(torch.equal(result.checkpoint.verified_tensors[n], written[n]) for n in NAMES)
