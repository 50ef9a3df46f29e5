"""The roles adapter tensors play, read from their PEFT names.

Every adapter tensor plays one role::

    ==============  ===============  ==============================================================
    role            adapter kinds    what it is
    ==============  ===============  ==============================================================
    lora_A          lora, rslora     the down-projection A (r x k), seeded kaiming-uniform init
    lora_B          lora, rslora     the up-projection B (d x r), initialised zero
    vera_lambda_d   vera             the r-vector scaling the shared A projection (init d_initial)
    vera_lambda_b   vera             the d-vector scaling the shared B projection (init zero)
    vera_projection vera             the shared random projections vera_A / vera_B: derived from the
                                     seed by every client, never trained, never sent
    head            all              the task head (PEFT modules_to_save copy of the classifier)
    ==============  ===============  ==============================================================
"""

from __future__ import annotations

ROLE_A = "lora_A"
ROLE_B = "lora_B"
ROLE_LAMBDA_D = "vera_lambda_d"
ROLE_LAMBDA_B = "vera_lambda_b"
ROLE_PROJECTION = "vera_projection"
ROLE_HEAD = "head"
ROLES = (ROLE_A, ROLE_B, ROLE_LAMBDA_D, ROLE_LAMBDA_B, ROLE_PROJECTION, ROLE_HEAD)


# The two sides of an adapter, in the methods' terms.
SIDE_A = "A"
SIDE_B = "B"


# Parts of a PEFT name that mark a tensor's role; VeRA's projections are model-level buffers vera_A / vera_B.
_NAME_PARTS = {ROLE_A: ROLE_A, ROLE_B: ROLE_B, ROLE_LAMBDA_D: ROLE_LAMBDA_D, ROLE_LAMBDA_B: ROLE_LAMBDA_B,
               "vera_A": ROLE_PROJECTION, "vera_B": ROLE_PROJECTION}
# Markers of a trainable adapter parameter in a PeftModel's named_parameters().
ADAPTER_PARAMETER_MARKERS = ("lora_A", "lora_B", "vera_lambda_", "modules_to_save")


def role_of(name: str) -> str:
    """The role of an adapter tensor, from its PEFT parameter or state-dict name."""
    for part in name.split("."):
        if part in _NAME_PARTS:
            return _NAME_PARTS[part]
    return ROLE_HEAD


# What a person calls each role (model cards, messages).
ROLE_LABELS = {ROLE_A: "A", ROLE_B: "B", ROLE_LAMBDA_D: "lambda_d", ROLE_LAMBDA_B: "lambda_b",
               ROLE_PROJECTION: "VeRA projections", ROLE_HEAD: "classifier head"}
