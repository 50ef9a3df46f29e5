"""Recipes: the sections of a federation (:mod:`.schema`), their validation (:mod:`.validation`), reading YAML and
overrides (:mod:`.loading`), and the recipes fedlora ships (:mod:`.catalog`)."""

from fedlora_cli.recipe.loading import (
    apply_overrides, dump, from_dict, load, parse_override, resolve_location, with_site, with_task_defaults,
)
from fedlora_cli.recipe.schema import (
    ACCOUNTANTS, ADAPTER_KINDS, AGGREGATIONS, ANSWER_EXTRACTORS, HEAD_POLICIES, METHODS, NORM_BOUND_ACTIONS,
    OPTIMIZERS, PARTITIONERS, SAMPLINGS, SERVER_OPTIMIZERS, SITE_KEYS, TASK_CAUSAL_LM, TASK_CLASSIFICATION, TASK_DEFAULTS,
    TASKS, TRACKERS, VERA_D_INITIAL, WEIGHTINGS, AdapterSection, DataSection, EvaluationSection, FederationSection,
    ModelSection, PrivacySection, Recipe, ServerPrivacySection, TrackingSection, TrainingSection,
)
from fedlora_cli.recipe.validation import validate

__all__ = [
    "ACCOUNTANTS", "ADAPTER_KINDS", "AGGREGATIONS", "ANSWER_EXTRACTORS", "AdapterSection", "DataSection",
    "EvaluationSection", "FederationSection", "HEAD_POLICIES", "METHODS", "ModelSection", "NORM_BOUND_ACTIONS",
    "OPTIMIZERS", "PARTITIONERS", "SAMPLINGS", "SERVER_OPTIMIZERS", "PrivacySection", "Recipe",
    "ServerPrivacySection", "SITE_KEYS", "TASKS", "TASK_CAUSAL_LM", "TASK_CLASSIFICATION", "TASK_DEFAULTS", "TRACKERS",
    "TrackingSection", "TrainingSection", "VERA_D_INITIAL", "WEIGHTINGS", "apply_overrides", "dump",
    "from_dict", "load", "parse_override", "resolve_location", "validate", "with_site", "with_task_defaults"
]
