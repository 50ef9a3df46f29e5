"""fedlora_cli.model.fingerprint: a base model identified from its files alone (config, safetensors headers and two
tensors) gets the fingerprint a workbench computes after loading it, in every precision and quantisation, and
reading it imports no torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import causal_recipe_dict, recipe_dict

from fedlora_cli import recipe as recipes
from fedlora_cli.model import fingerprint as fingerprints
from fedlora_cli.model.workbench import build

LOADINGS = {
    "float32": {},
    "bfloat16": {"model.dtype": "bfloat16"},
    "float16": {"model.dtype": "float16"},
    "4bit": {"model.quantization": "4bit"},
    "8bit": {"model.quantization": "8bit"},
}


def _bitsandbytes_problem() -> str | None:
    """Why a quantised load cannot run here (None when bitsandbytes imports)."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means no quantised loads on this machine
        return f"bitsandbytes does not import here: {exc}"
    return None


def _resaved(source: Path, target: Path, dtype: torch.dtype, causal: bool) -> Path:
    """``source``'s model and tokenizer saved again with its weights stored in ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    factory = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    factory.from_pretrained(source, dtype=torch.float32).to(dtype).save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def bases(tiny_model_dir, tiny_causal_dir, tmp_path_factory) -> dict[str, tuple[Path, bool]]:
    """Name -> (folder, is a causal LM): the tiny BERT and Llama stored in float32 and in bfloat16."""
    root = tmp_path_factory.mktemp("stored")
    return {
        "bert-float32": (tiny_model_dir, False),
        "bert-bfloat16": (_resaved(tiny_model_dir, root / "bert-bf16", torch.bfloat16, False), False),
        "llama-float32": (tiny_causal_dir, True),
        "llama-bfloat16": (_resaved(tiny_causal_dir, root / "llama-bf16", torch.bfloat16, True), True),
        "llama-no-pad": (_without_pad(tiny_causal_dir, root / "llama-no-pad"), True),
    }


def _without_pad(source: Path, target: Path) -> Path:
    """``source`` with no pad token in its config or tokenizer: the workbench pads with the end-of-sequence token
    and records it in the loaded config, which the fingerprint hashes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.config.pad_token_id = None
    model.save_pretrained(target)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(target)
    assert AutoTokenizer.from_pretrained(target).pad_token is None
    return target


def _recipe(folder: Path, causal: bool, data: Path, site: dict) -> recipes.Recipe:
    raw = causal_recipe_dict(folder, data) if causal else recipe_dict(folder, data)
    return recipes.with_site(recipes.from_dict(raw), site)


@pytest.mark.parametrize("loading", list(LOADINGS))
@pytest.mark.parametrize("base", ["bert-float32", "bert-bfloat16", "llama-float32", "llama-bfloat16", "llama-no-pad"])
def test_the_files_give_the_fingerprint_of_the_loaded_workbench(bases, reviews_csv, math_jsonl, base, loading):
    if loading in ("4bit", "8bit") and (problem := _bitsandbytes_problem()):
        pytest.skip(problem)
    folder, causal = bases[base]
    labels = None if causal else 2
    bench = build(_recipe(folder, causal, math_jsonl if causal else reviews_csv, LOADINGS[loading]), labels)
    assert fingerprints.fingerprint(str(folder), None, labels) == bench.fingerprint


def test_a_bfloat16_stored_base_is_read_as_its_stored_bfloat16_bytes(bases):
    from safetensors.torch import load_file

    folder, _ = bases["bert-bfloat16"]
    stored = load_file(folder / "model.safetensors")
    read = fingerprints.stored_tensors(fingerprints.safetensors_files(str(folder), None))
    name = sorted(n for n, t in read.items() if len(t.shape) == 2 and not fingerprints.is_head(n))[0]
    assert read[name].dtype == "BF16" and stored[name].dtype == torch.bfloat16
    assert read[name].read() == stored[name].contiguous().view(torch.uint8).numpy().tobytes()
    assert len(read[name].read()) == 2 * stored[name].numel()
    float32 = str(bases["bert-float32"][0])
    assert fingerprints.fingerprint(str(folder), None, 2) != fingerprints.fingerprint(float32, None, 2)


def test_another_model_other_weights_or_other_labels_give_another_fingerprint(bases, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    own = fingerprints.fingerprint(str(tiny_model_dir), None, 2)
    assert fingerprints.fingerprint(str(bases["llama-float32"][0])) != own
    assert fingerprints.fingerprint(str(tiny_model_dir), None, 3) != own
    changed = Path(shutil.copytree(tiny_model_dir, tmp_path / "changed"))
    tensors = load_file(changed / "model.safetensors")
    first = sorted(n for n, t in tensors.items() if t.dim() == 2 and "classifier" not in n)[0]
    tensors[first][0, 0] += 1.0
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    assert fingerprints.fingerprint(str(changed), None, 2) != own
    # the task head is the recipe's, not the base's
    head = Path(shutil.copytree(tiny_model_dir, tmp_path / "head"))
    tensors = load_file(head / "model.safetensors")
    tensors["classifier.weight"] += 1.0
    save_file(tensors, head / "model.safetensors", metadata={"format": "pt"})
    assert fingerprints.fingerprint(str(head), None, 2) == own


def test_a_base_without_safetensors_is_identified_only_by_loading_it_in_float32(tiny_model_dir, reviews_csv, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path / "bin"
    from safetensors.torch import load_file

    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")  # save_pretrained writes no .bin
    (folder / "model.safetensors").unlink()
    assert not list(folder.glob("*.safetensors"))
    with pytest.raises(fingerprints.NotStored, match="can be identified only by loading it"):
        fingerprints.fingerprint(str(folder), None, 2)
    loaded = build(_recipe(folder, False, reviews_csv, {}), 2).fingerprint
    assert loaded != build(_recipe(tiny_model_dir, False, reviews_csv, {}), 2).fingerprint
    with pytest.raises(fingerprints.FedloraError, match="only from its float32 weights"):
        build(_recipe(folder, False, reviews_csv, {"model.dtype": "bfloat16"}), 2)


def test_a_pkg_location_is_resolved_as_the_workbench_resolves_it(tiny_model_dir, tmp_path, monkeypatch):
    package = tmp_path / "fedlora_fingerprint_assets"
    package.mkdir()
    (package / "__init__.py").touch()
    shutil.copytree(tiny_model_dir, package / "model")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert fingerprints.fingerprint("pkg:fedlora_fingerprint_assets/model", None, 2) == fingerprints.fingerprint(
        str(tiny_model_dir), None, 2)


@pytest.mark.parametrize(("base", "labels"), [("bert-float32", 2), ("bert-bfloat16", 12), ("llama-no-pad", None)])
def test_the_config_read_with_torch_hidden_is_the_one_read_with_it(bases, base, labels):
    folder = str(bases[base][0])
    hidden = fingerprints._child_config_text(folder, None, labels)
    assert hidden == fingerprints.loaded_config_text(folder, None, labels)


def test_a_folder_without_a_config_is_refused_in_one_line(tiny_model_dir, tmp_path):
    (tmp_path / "weights").mkdir()
    shutil.copy(tiny_model_dir / "model.safetensors", tmp_path / "weights")
    with pytest.raises(fingerprints.FedloraError, match=r"^cannot read the config of [^\n]*$"):
        fingerprints._child_config_text(str(tmp_path / "weights"), None, 2)


def test_identification_imports_no_torch_and_agrees_with_this_process(tiny_model_dir):
    code = (
        "import json, sys\n"
        "from fedlora_cli.model.fingerprint import fingerprint\n"
        f"value = fingerprint({str(tiny_model_dir)!r}, None, 2)\n"
        "print(json.dumps([value, 'torch' in sys.modules, 'transformers' in sys.modules]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    value, torch_imported, transformers_imported = json.loads(done.stdout.splitlines()[-1])
    assert (torch_imported, transformers_imported) == (False, False)
    assert value == fingerprints.fingerprint(str(tiny_model_dir), None, 2)


@pytest.mark.parametrize("base", ["bert-float32", "llama-bfloat16"])
def test_a_recipe_names_the_base_and_labels_its_workbench_loads(bases, reviews_csv, math_jsonl, tmp_path, base):
    folder, causal = bases[base]
    elsewhere = shutil.copytree(folder, tmp_path / "elsewhere")
    recipe = _recipe(tmp_path / "not-there", causal, math_jsonl if causal else reviews_csv, {})
    expected = build(recipe, 2, base_override=str(elsewhere)).fingerprint
    assert fingerprints.of_recipe(recipe, 2, str(elsewhere)) == expected


def test_the_legacy_fingerprint_is_the_loaded_config_and_first_and_last_float32_matrices(tiny_model_dir, reviews_csv):
    import hashlib

    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2, dtype=torch.float32)
    config = model.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "name_or_path", "_commit_hash"):
        config.pop(key, None)
    assert "dtype" in config  # the old fingerprint kept the loading settings
    by_hand = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    matrices = [p for name, p in model.named_parameters() if p.dim() == 2 and "classifier" not in name]
    for p in (matrices[0], matrices[-1]):
        by_hand.update(p.detach().numpy().tobytes())
    assert build(_recipe(tiny_model_dir, False, reviews_csv, {}), 2).legacy_fingerprint == by_hand.hexdigest()[:16]
    assert build(_recipe(tiny_model_dir, False, reviews_csv, {"model.dtype": "bfloat16"}), 2).legacy_fingerprint is None
