"""Building the base model and its PEFT adapter from a recipe, and moving adapter tensors in and out.

Adapter tensors are named as PEFT saves them (``get_peft_model_state_dict``: no adapter name, head weights as
``...classifier.weight``), so that every file fedlora writes is a file PEFT itself reads.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedlora_cli.adapters.kinds import adapter_kind
from fedlora_cli.adapters.methods import Plan
from fedlora_cli.adapters.roles import ADAPTER_PARAMETER_MARKERS
from fedlora_cli.errors import FedloraError, first_line
from fedlora_cli.model import fingerprint as fingerprints
from fedlora_cli.model.site import HEAD_MODULES, Site, to_device
from fedlora_cli.recipe.loading import resolve_location
from fedlora_cli.recipe.schema import TASK_CAUSAL_LM, TASK_CLASSIFICATION, Recipe

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Workbench:
    """A base model wrapped with the recipe's adapter, its tokenizer, and the base model's fingerprint.

    Built once per process and reused across clients in ``simulate``: every round loads the global tensors,
    the global's base-weight correction (``exact`` aggregation) and the client's own state into it, so nothing
    leaks from one client to the next. ``rank`` is the rank of its LoRA adapter (clients may train a lower
    rank than the global's, see ``adapter.client_ranks``); ``site`` how this site loaded and runs it.

    Frozen: a caller that needs the same model under another recipe of its federation (the global checkpoint's,
    or other evaluation settings) asks :meth:`for_recipe` for a view of it.
    """

    recipe: Recipe
    model: Any
    tokenizer: Any
    fingerprint: str
    base_location: str
    site: Site
    rank: int = 0
    # What the task head reads (model.pooling as resolved from the model's files for 'auto'): default, mean, max, cls.
    pooling: str = "default"
    # The fingerprint as fedlora computed it before it read the stored weights (float32 loads only), so that
    # global checkpoints written then still resume.
    legacy_fingerprint: str | None = None
    # The original base weights of the layers a correction has touched, to restore them (layer name -> W0).
    _base_weights: dict[str, Any] = field(default_factory=dict, repr=False)

    def for_recipe(self, recipe: Recipe) -> Workbench:
        """This workbench read with ``recipe`` (training, evaluation and privacy settings): the same loaded model,
        tokenizer and base weights, not a copy of them. ``recipe`` must describe the model that was built: the
        same task and adapter kind."""
        built = (self.recipe.model.task, self.recipe.adapter.kind)
        if (recipe.model.task, recipe.adapter.kind) != built:
            raise FedloraError(
                f"a workbench built for a {built[0]} model with a {built[1]} adapter cannot serve a recipe for a "
                f"{recipe.model.task} model with a {recipe.adapter.kind} adapter"
            )
        if recipe.model.pooling not in ("auto", self.pooling):
            raise FedloraError(
                f"a workbench built with pooling '{self.pooling}' cannot serve a recipe whose model.pooling is "
                f"'{recipe.model.pooling}'"
            )
        return dataclasses.replace(self, recipe=recipe)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors (and a trained head's), copied to the CPU."""
        from peft.utils import get_peft_model_state_dict

        return {name: t.detach().to("cpu", copy=True) for name, t in get_peft_model_state_dict(self.model).items()}

    def batch(self, examples: Any, rows: Any) -> dict[str, torch.Tensor]:
        """The token batch of ``rows`` of ``examples``, on this site's device."""
        from fedlora_cli.data.examples import encode

        return to_device(encode(self.tokenizer, examples, rows, self.recipe.data.max_length), self.site.device)

    def load_adapter_tensors(self, tensors: Mapping[str, torch.Tensor], partial: bool = False) -> None:
        """Copy tensors into the adapter; names must match the adapter's (all of them unless ``partial``)."""
        from peft.utils import set_peft_model_state_dict

        expected = set(self.adapter_tensors_shapes())
        unknown = sorted(set(tensors) - expected)
        if unknown:
            raise FedloraError(f"tensor '{unknown[0]}' is not part of this adapter ({len(unknown)} unknown)")
        missing = sorted(expected - set(tensors))
        if missing and not partial:
            raise FedloraError(f"adapter tensor '{missing[0]}' is missing ({len(missing)} missing)")
        shapes = self.adapter_tensors_shapes()
        for name, t in tensors.items():
            if tuple(t.shape) != shapes[name]:
                raise FedloraError(f"tensor '{name}' has shape {tuple(t.shape)}, the adapter has {shapes[name]}")
        # PEFT expects every head tensor at once, so a partial load goes through a full adapter state.
        full = {**self.adapter_tensors(), **tensors} if partial else dict(tensors)
        result = set_peft_model_state_dict(self.model, full)
        if result.unexpected_keys:
            raise FedloraError(f"PEFT did not accept tensor '{result.unexpected_keys[0]}'")

    def adapter_tensors_shapes(self) -> dict[str, tuple[int, ...]]:
        from peft.utils import get_peft_model_state_dict

        return {name: tuple(t.shape) for name, t in get_peft_model_state_dict(self.model).items()}

    def set_trainable(self, plan: Plan) -> list[torch.nn.Parameter]:
        """Freeze everything but the roles the plan trains; returns the trainable parameters."""
        trainable = []
        for name, param in self.model.named_parameters():
            is_adapter = any(marker in name for marker in ADAPTER_PARAMETER_MARKERS)
            param.requires_grad = is_adapter and plan.trains(name)
            if param.requires_grad:
                trainable.append(param)
        return trainable

    def apply_correction(self, correction: Mapping[str, torch.Tensor] | None) -> None:
        """Set each adapted layer's base weight to W0 + correction[layer]; layers not in ``correction`` get W0.

        ``correction`` maps an adapted layer's name (its PEFT module path, e.g.
        ``base_model.model.bert.encoder.layer.0.attention.self.query``) to a dense (out x in) tensor: the
        residual that ``exact`` aggregation folds into the base model. ``None`` restores every base weight.
        """
        import torch

        correction = dict(correction or {})
        with torch.no_grad():
            for layer in sorted(set(self._base_weights) | set(correction)):
                try:
                    module = self.model.get_submodule(layer)
                except AttributeError:
                    raise FedloraError(f"correction for '{layer}', which is not an adapted layer of this model") from None
                base = module.get_base_layer() if hasattr(module, "get_base_layer") else None
                if base is None or base is module:
                    raise FedloraError(f"correction for '{layer}', which is not an adapted layer of this model")
                if layer not in self._base_weights:
                    self._base_weights[layer] = base.weight.detach().clone()
                original = self._base_weights[layer]
                if layer not in correction:
                    base.weight.copy_(original)
                    continue
                delta = correction[layer]
                if getattr(module, "fan_in_fan_out", False):
                    delta = delta.T  # Conv1D-style layers store (in x out)
                if tuple(delta.shape) != tuple(original.shape):
                    raise FedloraError(
                        f"correction for '{layer}' has shape {tuple(delta.shape)}, the layer {tuple(original.shape)}"
                    )
                base.weight.copy_((original.float() + delta.float()).to(original.dtype))

    def adapter_config(self) -> dict[str, Any]:
        config = self.model.peft_config["default"].to_dict()
        config["base_model_name_or_path"] = self.recipe.model.base
        return json.loads(json.dumps(config, default=sorted))


# PEFT's task type for each recipe task: SEQ_CLS saves the classifier head with the adapter
# (modules_to_save); CAUSAL_LM has no head to save (the LM head belongs to the frozen base model).
PEFT_TASK_TYPES = {TASK_CLASSIFICATION: "SEQ_CLS", TASK_CAUSAL_LM: "CAUSAL_LM"}


def _load_base(recipe: Recipe, location: str, num_labels: int | None, site: Site, pooling: str) -> Any:
    """The base model class of the recipe's task (a sequence classifier with ``num_labels`` whose head reads
    ``pooling``, or a causal LM), in the site's precision or quantisation, on the site's device, with gradient
    checkpointing if asked for."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    task, kwargs = recipe.model.task, site.load_kwargs(recipe.model.task)
    if task == TASK_CAUSAL_LM:
        model = AutoModelForCausalLM.from_pretrained(location, revision=recipe.model.revision, **kwargs)
    elif num_labels is None:
        raise FedloraError("the number of labels is unknown: set model.num_labels or pass a partition folder")
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            location, num_labels=num_labels, revision=recipe.model.revision, **kwargs
        )
        _install_pooling(model, location, pooling)
    # Non-reentrant checkpointing needs no gradient at the (frozen) inputs, and Opacus' hooks see each
    # adapter layer's forward pass once per backward pass.
    checkpointing = {"use_reentrant": False}
    if site.quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=site.gradient_checkpointing, gradient_checkpointing_kwargs=checkpointing
        )
    else:
        model.to(site.device)
        if site.gradient_checkpointing:
            if not model.supports_gradient_checkpointing:
                raise FedloraError(f"training.gradient_checkpointing: {type(model).__name__} does not support it")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    return model


def _install_pooling(model: Any, location: str, mode: str) -> None:
    """Make the head read ``mode`` (``default``: the architecture's pooler, left as it is)."""
    from fedlora_cli.model import pooling
    from fedlora_cli.model.pooling_choice import exported_mode

    exported = exported_mode(getattr(model.config, "auto_map", None))
    if exported is not None and mode != exported:
        raise FedloraError(
            f"model.base '{location}' is a {exported}-pooled fedlora export (its pooler is not in its weights): set "
            f"model.pooling '{exported}' or 'auto'"
        )
    if mode in pooling.MODES:
        try:
            pooling.install(model, mode)
        except ValueError as exc:
            raise FedloraError(f"model.pooling '{mode}': {exc}") from None


def _float32_heads(model: Any) -> None:
    """A trained task head computes, trains and travels in float32 whatever the base's dtype: its weights are
    cast, and its input (the base's hidden states, perhaps bfloat16) is cast on the way in."""
    import torch

    def to_float32(_module: Any, args: tuple) -> tuple:
        return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in HEAD_MODULES and any(p.dtype != torch.float32 for p in module.parameters()):
            module.float()
            module.register_forward_pre_hook(to_float32)


def build(
    recipe: Recipe, num_labels: int | None, base_override: str | None = None, *, rank: int | None = None,
    site: Site | None = None,
) -> Workbench:
    """Load the base model and tokenizer, attach a freshly initialised adapter (seeded by ``training.seed``).

    The model class follows ``model.task``: AutoModelForSequenceClassification with ``num_labels`` classes,
    or AutoModelForCausalLM (``num_labels`` unused).

    ``rank`` (default ``adapter.r``) builds a LoRA adapter of another rank, for a client that trains a lower
    rank than the global's. VeRA's projections are derived from ``training.seed`` (PEFT's
    ``projection_prng_key``) and saved with the adapter (``save_projection``), so a global checkpoint loads in
    vanilla PEFT on any machine.

    ``site`` (default: the recipe's site settings) says where and how the base model is loaded; the adapter is
    float32 on the same device.

    The process's global state is left as it was: torch's random generators (seeded for the initialisation only),
    transformers' verbosity and progress bars, the warning filters.
    """
    location = resolve_location(base_override or recipe.model.base)
    site = site or Site.of(recipe)
    # The head (from_pretrained) and the adapter (get_peft_model) are initialised from the seeded generators,
    # which the process gets back as they were, as it gets back transformers' logging.
    with quiet_transformers(), seeded(recipe.training.seed, site.device):
        return _build(recipe, num_labels, location, rank=rank, site=site)


def _build(recipe: Recipe, num_labels: int | None, location: str, *, rank: int | None, site: Site) -> Workbench:
    from peft import get_peft_model
    from transformers import AutoTokenizer

    from fedlora_cli.model.pooling_choice import choose

    pooling = choose(recipe.model, location).pooling
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, revision=recipe.model.revision)
        model = _load_base(recipe, location, num_labels, site, pooling)
    except (OSError, ValueError) as exc:
        raise FedloraError(f"cannot load base model '{location}': {first_line(exc)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if recipe.model.task == TASK_CAUSAL_LM and getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    fingerprint = fingerprints.of_loaded(location, recipe.model.revision, model, site)
    legacy = fingerprints.legacy_of_loaded(model) if not site.quantized and site.dtype == "float32" else None
    rank = rank or recipe.adapter.r
    config = adapter_config(recipe, rank)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise FedloraError(f"adapter.target_modules: {first_line(exc)}") from None
    # PEFT adapts embeddings with lora_embedding_A/B, whose roles (and transposed shapes) the methods do not
    # know: refused rather than silently trained as (or shared like) a head.
    embedded = next((n for n, _ in peft_model.named_parameters() if ".lora_embedding_" in n), None)
    if embedded is not None:
        module = embedded.split(".lora_embedding_")[0].rsplit(".", 1)[-1]
        raise FedloraError(
            f"adapter.target_modules: '{module}' is an embedding layer; fedlora adapts linear layers only"
        )
    _float32_heads(peft_model)
    peft_model.eval()  # training switches to train mode for its steps and back
    return Workbench(
        recipe=recipe, model=peft_model, tokenizer=tokenizer, fingerprint=fingerprint, base_location=location,
        site=site, rank=rank, pooling=pooling, legacy_fingerprint=legacy,
    )


@contextmanager
def seeded(seed: int, device: str) -> Iterator[None]:
    """Seed torch's generators of the CPU and of ``device``'s kind, as ``torch.manual_seed(seed)`` does for
    them; on leaving, every generator seeded is back in the state it had (``torch.random.fork_rng``).

    Only the generators the work draws from are touched: a CPU site neither seeds nor initialises CUDA.
    """
    import torch

    kind = torch.device(device).type
    with ExitStack() as stack:
        cuda = list(range(torch.cuda.device_count())) if kind == "cuda" else []
        stack.enter_context(torch.random.fork_rng(devices=cuda, device_type="cuda"))
        torch.random.default_generator.manual_seed(seed)
        if kind == "cuda":
            torch.cuda.manual_seed_all(seed)
        elif kind == "mps":
            stack.enter_context(torch.random.fork_rng(devices=[0], device_type="mps"))
            torch.mps.manual_seed(seed)
        yield


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Loading (or saving) a model without transformers' progress bars, notices and FutureWarnings; on leaving, its
    verbosity, its progress bars and the warning filters are as they were."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()


def trained_coordinates(recipe: Recipe, plan: Plan, num_labels: int | None) -> int:
    """How many coordinates a client of this recipe trains (the d that DP-SGD's noise spreads over), counted on
    the model's skeleton: built from its config on the meta device, so no weight is loaded."""
    import torch
    from peft import get_peft_model

    location = resolve_location(recipe.model.base)
    with quiet_transformers():
        config, factory = _skeleton_config(recipe, location, num_labels)
        with torch.device("meta"):
            model = get_peft_model(factory.from_config(config), adapter_config(recipe, recipe.adapter.r))
    return sum(
        p.numel() for name, p in model.named_parameters()
        if any(marker in name for marker in ADAPTER_PARAMETER_MARKERS) and plan.trains(name)
    )


def _skeleton_config(recipe: Recipe, location: str, num_labels: int | None) -> tuple[Any, Any]:
    """The base model's config and the Auto class of the recipe's task."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        if recipe.model.task == TASK_CAUSAL_LM:
            config = AutoConfig.from_pretrained(location, revision=recipe.model.revision)
            factory = AutoModelForCausalLM
        else:
            config = AutoConfig.from_pretrained(location, revision=recipe.model.revision, num_labels=num_labels or 2)
            factory = AutoModelForSequenceClassification
    except (OSError, ValueError) as exc:
        raise FedloraError(f"cannot read the config of base model '{location}': {first_line(exc)}") from None
    return config, factory


def adapter_config(recipe: Recipe, rank: int) -> Any:
    """The PEFT config of the recipe's adapter kind at ``rank``."""
    adapter = recipe.adapter
    return adapter_kind(adapter.kind).peft_config(adapter, rank, PEFT_TASK_TYPES[recipe.model.task], recipe.training.seed)
