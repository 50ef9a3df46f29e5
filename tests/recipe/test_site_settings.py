"""fedlora_cli.recipe.site_settings: each site setting declared once, and every place that names one reading it
from there: the recipe's fields, validation, the digest, the commands' options, a SuperNode's node config, export
and the Site a workbench runs with."""

from __future__ import annotations

import dataclasses

import click
import pytest
import typer

from fedlora_cli import recipe as recipes
from fedlora_cli.cli import app
from fedlora_cli.errors import FedloraError
from fedlora_cli.model.site import SITE_FLAGS, Site
from fedlora_cli.recipe import schema
from fedlora_cli.recipe.site_settings import (
    BY_NAME, FLAGS, GRADIENT_CHECKPOINTING, SITE_KEYS, SITE_SETTINGS, plain_load, site_keys,
)

SECTIONS = {"model": schema.ModelSection, "training": schema.TrainingSection}


def base() -> dict:
    return {"model": {"base": "some/model"}}


@pytest.mark.parametrize("setting", SITE_SETTINGS, ids=lambda s: s.name)
def test_each_setting_is_a_recipe_field_with_the_registrys_default_and_help(setting):
    fields = {f.name: f for f in dataclasses.fields(SECTIONS[setting.section])}
    assert fields[setting.field].default == setting.default
    assert fields[setting.field].metadata["help"] == setting.help
    assert setting.of(recipes.from_dict(base())) == setting.default


def test_the_registry_names_the_keys_the_site_runs_with():
    assert SITE_KEYS == (
        "model.dtype", "model.quantization", "model.quant_type", "model.double_quant", "model.compute_dtype",
        "training.device", "training.mixed_precision", "training.gradient_checkpointing",
        "training.gradient_accumulation_steps", "training.threads",
    )
    # A Site has one field per setting, by its name, so Site.of reads them all from the registry.
    assert {f.name for f in dataclasses.fields(Site)} == set(BY_NAME)


def test_a_setting_is_named_alike_in_a_node_config_and_on_the_command_line():
    assert GRADIENT_CHECKPOINTING.node_key == "gradient-checkpointing"
    assert BY_NAME["accumulation_steps"].flag == "--accumulation-steps"
    assert BY_NAME["quant_type"].flag is None, "set in the recipe or a node config only"
    assert SITE_FLAGS == FLAGS == {
        "model.dtype": "--dtype", "model.quantization": "--quantization", "training.device": "--device",
        "training.mixed_precision": "--mixed-precision", "training.gradient_checkpointing": "--gradient-checkpointing",
        "training.gradient_accumulation_steps": "--accumulation-steps", "training.threads": "--threads",
    }


def test_the_flower_node_config_keys_are_the_registrys():
    from fedlora_cli.flower.site import SITE_SETTINGS as NODE_KEYS, SiteConfig

    assert NODE_KEYS == {s.node_key: s.key for s in SITE_SETTINGS}
    config = {"client-id": "a", "state-dir": "/s", "quant-type": "fp4", "double-quant": False}
    site = SiteConfig.from_node_config(config)
    assert site.settings == {"model.quant_type": "fp4", "model.double_quant": False}


def _options(command: str) -> dict[str, click.Option]:
    """The options of ``command`` (``'flower node-config'`` for a subcommand), by their first flag."""
    cmd = typer.main.get_command(app)
    for name in command.split():
        cmd = cmd.get_command(click.Context(cmd), name)
    return {p.opts[0]: p for p in cmd.params if isinstance(p, click.Option)}


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        ("train-client", list(FLAGS.values())),
        ("flower node-config", list(FLAGS.values())),
        ("evaluate", ["--device", "--dtype", "--quantization", "--threads"]),
        ("simulate", ["--device", "--threads"]),
        ("export", ["--device"]),
    ],
)
def test_the_commands_site_options_carry_the_registrys_flag_and_help(command, flags):
    options = _options(command)
    by_flag = {s.flag: s for s in SITE_SETTINGS}
    for flag in flags:
        assert options[flag].help == by_flag[flag].flag_help, flag
    if "--gradient-checkpointing" in flags:
        assert options["--gradient-checkpointing"].secondary_opts == ["--no-gradient-checkpointing"]


def test_site_keys_turns_option_names_into_recipe_keys():
    assert site_keys(device="cpu", accumulation_steps=None) == {
        "training.device": "cpu", "training.gradient_accumulation_steps": None,
    }
    with pytest.raises(TypeError, match="'lr' is not a site setting"):
        site_keys(lr=0.1)


def test_export_loads_plain_full_precision_on_its_device():
    assert plain_load("cpu") == {"model.dtype": "float32", "model.quantization": "none",
                                 "training.mixed_precision": "no", "training.device": "cpu"}
    r = recipes.with_site(recipes.from_dict({"model": {"base": "m", "quantization": "4bit", "dtype": "bfloat16"},
                                             "training": {"mixed_precision": "bf16"}}), plain_load(None))
    assert (r.model.dtype, r.model.quantization, r.training.mixed_precision) == ("float32", "none", "no")


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("model.compute_dtype", "int8", "recipe key 'model.compute_dtype' must be one of bfloat16, float16, float32"),
        ("model.quant_type", "nf3", "recipe key 'model.quant_type' must be one of nf4, fp4; got 'nf3'"),
        ("training.device", "cuda:x", "must be one of auto, cpu, cuda, mps or 'cuda:N'; got 'cuda:x'"),
        ("training.mixed_precision", "fp8", "must be one of no, bf16, fp16; got 'fp8'"),
        ("training.threads", -1, r"training.threads' must be 0 \(the process's own count\) up to 1024"),
        ("training.threads", 1025, r"training.threads' must be 0 \(the process's own count\) up to 1024; got 1025"),
        ("training.threads", 2**40, r"training.threads' must be 0 .* up to 1024; got 1099511627776"),
    ],
)
def test_validation_reads_each_settings_choices_from_the_registry(setting, value, message):
    section, name = setting.split(".")
    with pytest.raises(FedloraError, match=message):
        recipes.from_dict({**base(), section: {**base().get(section, {}), name: value}})


def test_a_site_runs_with_every_setting_the_recipe_gives():
    chosen = {"dtype": "bfloat16", "quantization": "4bit", "quant_type": "fp4", "double_quant": False,
              "compute_dtype": "float16", "device": "cpu", "mixed_precision": "bf16", "gradient_checkpointing": True,
              "accumulation_steps": 4, "threads": 1}
    assert set(chosen) == set(BY_NAME) and all(chosen[s.name] != s.default for s in SITE_SETTINGS)
    site = Site.of(recipes.with_site(recipes.from_dict(base()), site_keys(**chosen)))
    assert dataclasses.asdict(site) == chosen


def test_zero_threads_is_the_process_own_count_and_a_count_holds_only_while_the_site_computes():
    import torch

    own = torch.get_num_threads()
    assert Site.of(recipes.from_dict(base())).threads == own
    other = 1 if own > 1 else 2
    site = Site.of(recipes.with_site(recipes.from_dict(base()), site_keys(threads=other)))
    with site.cpu_threads():
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == own
    with pytest.raises(RuntimeError), site.cpu_threads():
        raise RuntimeError("a round that fails gives the count back too")
    assert torch.get_num_threads() == own
