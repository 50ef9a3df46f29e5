"""Adapter kinds and federated methods: which adapter tensors each client trains, sends and keeps at home.

Two separate axes. The *adapter kind* (:mod:`.kinds`: LoRA, rsLoRA, VeRA) is PEFT's business: how the update
to a weight is parameterised, its scale, its PEFT config, which axis of each tensor holds the rank. The
*method* (:mod:`.methods`: FedAvg-LoRA, FFA-LoRA, FedSA-LoRA) decides what happens to each part of it in a
round. Every adapter tensor plays one *role* (:mod:`.roles`), read from its PEFT name. Nothing outside this
package compares a kind or method name as a string: code asks these objects.
"""

from fedlora_cli.adapters.kinds import ADAPTER_KINDS, AdapterKind, adapter_kind
from fedlora_cli.adapters.methods import HEAD_POLICIES, METHODS, Method, Plan, method, plan
from fedlora_cli.adapters.roles import (
    ADAPTER_PARAMETER_MARKERS, ROLE_A, ROLE_B, ROLE_HEAD, ROLE_LABELS, ROLE_LAMBDA_B, ROLE_LAMBDA_D,
    ROLE_PROJECTION, ROLES, SIDE_A, SIDE_B, role_of,
)

__all__ = [
    "ADAPTER_KINDS", "ADAPTER_PARAMETER_MARKERS", "HEAD_POLICIES", "METHODS", "ROLE_A", "ROLE_B", "ROLE_HEAD",
    "ROLE_LABELS", "ROLE_LAMBDA_B", "ROLE_LAMBDA_D", "ROLE_PROJECTION", "ROLES", "SIDE_A", "SIDE_B", "adapter_kind",
    "AdapterKind", "Method", "method", "Plan", "plan", "role_of",
]
