"""Exporting a federation's model for use outside fedlora (:mod:`.exporter`), its model card (:mod:`.model_card`)
and the Hugging Face Hub (:mod:`.hub`)."""

from fedlora_cli.export.exporter import DTYPES, ExportResult, export, privacy_facts, run_metrics
from fedlora_cli.export.hub import HubTarget, check_hub_access, push_to_hub
from fedlora_cli.export.model_card import MODEL_CARD, base_license, base_reference, hub_id_of, model_card

__all__ = [
    "DTYPES", "ExportResult", "HubTarget", "MODEL_CARD",
    "base_license", "base_reference", "check_hub_access", "export", "hub_id_of", "model_card", "privacy_facts",
    "push_to_hub", "run_metrics"
]
