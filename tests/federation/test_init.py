"""fedlora_cli.federation.init: the round-0 global checkpoint: calibrated DP noise, and the partition's task."""

from __future__ import annotations

import pytest

from fedlora_cli import federation, privacy, recipe as recipes
from fedlora_cli.data import partition
from fedlora_cli.errors import FedloraError


def test_calibrated_noise_is_never_rounded_below_the_accountants():
    r = recipes.from_dict({"name": "p", "model": {"base": "-", "num_labels": 2},
                           "privacy": {"target_epsilon": 2.0, "delta": 1e-5, "max_grad_norm": 1.0},
                           "federation": {"clients": 2, "rounds": 3}, "training": {"local_steps": 7, "batch_size": 16}})
    partition = {"clients": [{"examples": 1000}, {"examples": 3000}]}
    sigma = federation.calibrated(r, partition).privacy.noise_multiplier
    plans = [privacy.client_plan(n, 16, 7, None) for n in (1000, 3000)]
    target = r.privacy.target_epsilon * (1 - privacy.CALIBRATION_MARGIN)
    raw_sigma = max(privacy.calibrate(target, 1e-5, p.sample_rate, p.steps_per_round * 3) for p in plans)
    assert raw_sigma <= sigma < raw_sigma + 1e-6


def test_init_refuses_a_partition_of_the_other_task(tmp_path, make_causal_recipe, partition_dir):
    with pytest.raises(FedloraError, match="model.task"):
        federation.init(make_causal_recipe(), tmp_path / "g0", partition=partition.read_manifest(partition_dir))
