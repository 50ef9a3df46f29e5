"""Recipes: the sections of a federation (:mod:`.schema`), the site settings (:mod:`.site_settings`), their
validation (:mod:`.validation`), reading YAML and every override (:mod:`.loading`), and the recipes fedlora ships
(:mod:`.catalog`)."""

from fedlora_cli.recipe.loading import (
    apply_overrides, dump, from_dict, load, override, parse_override, resolve_location, with_site, with_task_defaults,
)
from fedlora_cli.recipe.schema import (
    ACCOUNTANTS, ADAPTER_KIND_NAMES, AGGREGATIONS, ANSWER_EXTRACTORS, CALIBRATIONS, DATA_FORMATS, HEAD_POLICY_NAMES,
    METHOD_NAMES, NORM_BOUND_ACTIONS, OPTIMIZERS, PARTITIONERS, SAMPLINGS, SERVER_OPTIMIZER_NAMES, TASK_CAUSAL_LM,
    TASK_CLASSIFICATION, TASK_DEFAULTS, TASKS, TRACKERS, VERA_D_INITIAL, WEIGHTINGS, AdapterSection, DataSection,
    EvaluationSection, FederationSection, ModelSection, PrivacySection, Recipe, ServerPrivacySection,
    TrackingSection, TrainingSection,
)
from fedlora_cli.recipe.site_settings import SITE_KEYS, SITE_SETTINGS, SiteSetting
from fedlora_cli.recipe.validation import validate

__all__ = [
    "ACCOUNTANTS", "ADAPTER_KIND_NAMES", "AGGREGATIONS", "ANSWER_EXTRACTORS", "CALIBRATIONS", "DATA_FORMATS",
    "AdapterSection", "DataSection",
    "EvaluationSection", "FederationSection", "HEAD_POLICY_NAMES", "METHOD_NAMES", "ModelSection",
    "NORM_BOUND_ACTIONS", "OPTIMIZERS", "PARTITIONERS", "SAMPLINGS", "SERVER_OPTIMIZER_NAMES", "PrivacySection",
    "Recipe", "ServerPrivacySection", "SITE_KEYS", "SITE_SETTINGS", "SiteSetting", "TASKS", "TASK_CAUSAL_LM",
    "TASK_CLASSIFICATION", "TASK_DEFAULTS", "TRACKERS", "TrackingSection", "TrainingSection", "VERA_D_INITIAL",
    "WEIGHTINGS", "apply_overrides", "dump", "from_dict", "load", "override", "parse_override", "resolve_location",
    "validate", "with_site", "with_task_defaults",
]
