"""model.pooling 'auto' (fedlora_cli.model.pooling_choice): a sentence-transformers folder's modules.json and
Pooling config decide what the head reads; a folder without them reads the architecture's pooler; what fedlora
cannot apply is refused by name; the round-0 global checkpoint records the choice and every client builds it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import recipe_dict

from fedlora_cli import recipe as recipes
from fedlora_cli.errors import FedloraError
from fedlora_cli.model.pooling_choice import choose, exported_mode
from fedlora_cli.recipe.schema import ModelSection

TRANSFORMER = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
POOLING = {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
NORMALIZE = {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
DENSE = {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
FLAGS = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")


def st_folder(root: Path, modules: list | None, config: dict | None = None, *on: str) -> Path:
    """A model folder with sentence-transformers' files: ``modules`` in modules.json, and ``config`` (default: the
    flags ``on`` set, the others unset) in 1_Pooling/config.json."""
    root.mkdir(parents=True, exist_ok=True)
    if modules is not None:
        (root / "modules.json").write_text(json.dumps(modules))
    config = config if config is not None else {f"pooling_mode_{f}": f in on for f in FLAGS}
    (root / "1_Pooling").mkdir(exist_ok=True)
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **config}))
    return root


def auto() -> ModelSection:
    return ModelSection(base="unused", pooling="auto")


@pytest.mark.parametrize("flag, mode", [("mean_tokens", "mean"), ("max_tokens", "max"), ("cls_token", "cls")])
def test_the_pooling_config_names_the_mode(tmp_path, flag, mode):
    folder = st_folder(tmp_path, [TRANSFORMER, POOLING, NORMALIZE], None, flag)
    assert choose(auto(), str(folder)).pooling == mode
    assert choose(auto(), str(folder)).source == "1_Pooling/config.json"


def test_the_short_pooling_mode_form_is_read(tmp_path):
    folder = st_folder(tmp_path, [TRANSFORMER, POOLING], {"pooling_mode": "cls"})
    assert choose(auto(), str(folder)).pooling == "cls"


def test_without_sentence_transformers_files_the_architectures_pooler_is_read(tmp_path):
    assert choose(auto(), str(tmp_path)).pooling == "default"  # no modules.json
    folder = st_folder(tmp_path / "no-pooling", [TRANSFORMER, NORMALIZE], None, "mean_tokens")
    assert choose(auto(), str(folder)).pooling == "default"


def test_an_explicit_choice_is_kept_whatever_the_files_say(tmp_path):
    folder = st_folder(tmp_path, [TRANSFORMER, POOLING], None, "max_tokens")
    for pooling in ("default", "mean", "cls"):
        assert choose(ModelSection(base="x", pooling=pooling), str(folder)).pooling == pooling


@pytest.mark.parametrize(
    "modules, config, on, message",
    [
        ([TRANSFORMER, POOLING], None, ("mean_sqrt_len_tokens",), r"pools by mean_sqrt_len_tokens, which fedlora"),
        ([TRANSFORMER, POOLING], None, ("cls_token", "mean_tokens"), r"pools by mean_tokens \+ cls_token"),
        ([TRANSFORMER, POOLING], {"pooling_mode": "lasttoken"}, (), r"pools by lasttoken"),
        ([TRANSFORMER, POOLING], {"pooling_mode_weightedmean_tokens": True}, (), r"pools by weightedmean_tokens"),
        ([TRANSFORMER, POOLING], {"pooling_mode_mean_tokens": True, "include_prompt": False}, (),
         r"pools by mean_tokens \+ include_prompt false"),
        ([TRANSFORMER, POOLING], None, (), r"declares no pooling mode"),
        ([TRANSFORMER, POOLING, DENSE], None, ("mean_tokens",), r"module sentence_transformers\.models\.Dense"),
        ([TRANSFORMER, POOLING, POOLING], None, ("mean_tokens",), r"several Pooling modules"),
        ({"0": TRANSFORMER}, None, ("mean_tokens",), r"modules\.json of .* is not a list"),
    ],
)
def test_what_fedlora_cannot_apply_is_refused_by_name(tmp_path, modules, config, on, message):
    folder = st_folder(tmp_path, modules, config, *on)
    with pytest.raises(FedloraError, match=r"model\.pooling 'auto': .*" + message):
        choose(auto(), str(folder))


def test_an_unreadable_pooling_config_is_one_error(tmp_path):
    folder = st_folder(tmp_path, [TRANSFORMER, POOLING], None, "mean_tokens")
    (folder / "1_Pooling" / "config.json").write_text("{not json")
    with pytest.raises(FedloraError, match=r"cannot read 1_Pooling/config\.json"):
        choose(auto(), str(folder))


def test_an_exports_class_names_its_pooling():
    assert exported_mode({"AutoModelForSequenceClassification": "fedlora_pooling.MaxPooledBertForSequenceClassification"}) == "max"
    assert exported_mode({"AutoModel": "other.Thing"}) is None and exported_mode(None) is None
    with pytest.raises(FedloraError, match="names no mode"):
        exported_mode({"AutoModelForSequenceClassification": "fedlora_pooling.SumPooledBert"})


def test_the_round0_global_records_the_pooling_the_folder_declares_and_clients_build_it(tmp_path, tiny_model_dir,
                                                                                      reviews_csv):
    from fedlora_cli.federation.common import Global, bench_for
    from fedlora_cli.federation.init import init

    model = tmp_path / "st-model"
    shutil.copytree(tiny_model_dir, model)
    st_folder(model, [TRANSFORMER, POOLING, NORMALIZE], None, "max_tokens")
    recipe = recipes.from_dict(recipe_dict(model, reviews_csv, "ffa"))
    assert recipe.model.pooling == "auto"  # the default for an encoder
    g = Global.of(init(recipe, tmp_path / "round-000").path)
    assert g.recipe.model.pooling == "max" and g.manifest.pooling_source == "1_Pooling/config.json"
    bench = bench_for(g, None, None)
    assert bench.pooling == "max" and type(bench.model.get_base_model().bert.pooler).__name__ == "MaskedPooler"
    # A workbench that reads another pooling cannot serve this federation.
    other = recipes.from_dict({**recipe_dict(model, reviews_csv, "ffa"), "model": {"base": str(model), "pooling": "cls"}})
    from fedlora_cli.model.workbench import build

    with pytest.raises(FedloraError, match="built with pooling 'cls'"):
        bench_for(g, None, build(other, 2))


def test_a_global_written_before_pooling_existed_reads_the_architectures_pooler(tmp_path, tiny_model_dir, reviews_csv):
    from fedlora_cli.federation.common import Global
    from fedlora_cli.federation.init import init

    g = init(recipes.from_dict(recipe_dict(tiny_model_dir, reviews_csv, "ffa")), tmp_path / "round-000")
    del g.manifest.recipe["model"]["pooling"]
    assert Global(g.path, g.manifest).recipe.model.pooling == "default"
