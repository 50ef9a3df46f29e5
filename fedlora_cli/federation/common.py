"""What every step of a round needs: the federation's plan and recipe, digests, the workbench checked against
the global checkpoint, and the client's model as it starts a round."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora_cli import aggregation, recipe as recipes, storage
from fedlora_cli.adapters.kinds import adapter_kind
from fedlora_cli.adapters.methods import Plan, plan as make_plan
from fedlora_cli.adapters.roles import ROLE_LABELS, ROLE_PROJECTION, role_of
from fedlora_cli.errors import FedloraError
from fedlora_cli.model.site import SITE_FLAGS, Site
from fedlora_cli.model.workbench import Workbench, build
from fedlora_cli.storage import encoding
from fedlora_cli.storage.checkpoints import ADAPTER_WEIGHTS, CORRECTION_TENSORS, SERVER_STATE_TENSORS, GlobalCheckpoint
from fedlora_cli.storage.manifests import GlobalManifest

if TYPE_CHECKING:
    import numpy as np
    import torch


class Global(GlobalCheckpoint):
    """A global checkpoint as one process uses it: its recipe parsed and validated once, its tensors and
    correction read and checked against the manifest's digests once, on first use.

    Every step of a round takes a path or a :class:`Global`; :func:`init` and ``aggregate_round`` return the one
    they wrote, already holding its tensors, so a simulation passes it on instead of reading it back.
    """

    @classmethod
    def of(cls, source: Path | str | GlobalCheckpoint) -> Global:
        if isinstance(source, Global):
            return source
        ckpt = source if isinstance(source, GlobalCheckpoint) else storage.read_global(Path(source))
        return cls(ckpt.path, ckpt.manifest)

    @classmethod
    def written(cls, ckpt: GlobalCheckpoint, recipe: recipes.Recipe, tensors: dict[str, Any],
                correction: dict[str, Any], server_state: dict[str, torch.Tensor] | None = None) -> Global:
        """The checkpoint just written from these tensors (whose digests its manifest records): torch tensors, or
        numpy arrays (the numpy round's, which are viewed as torch tensors when a later step asks for them)."""
        written = cls(ckpt.path, ckpt.manifest)
        if storage.is_arrays(tensors):
            written.__dict__.update(verified_arrays=tensors, verified_correction_arrays=correction)
        else:
            written.__dict__.update(verified_tensors=tensors, verified_correction=correction)
        written.__dict__.update(recipe=recipe, verified_server_state=dict(server_state or {}))
        return written

    def verify(self) -> Global:
        """Read and check the tensors and the correction now (they are kept for every later use)."""
        _ = self.verified_tensors, self.verified_correction
        return self

    @cached_property
    def recipe(self) -> recipes.Recipe:
        data = self.manifest.recipe
        model = data.get("model") if isinstance(data, dict) else None
        if isinstance(model, dict) and "pooling" not in model:
            # Written before model.pooling existed: the head read the architecture's pooler (not today's 'auto').
            data = {**data, "model": {**model, "pooling": "default"}}
        return recipes.from_dict(data)

    @cached_property
    def plan(self) -> Plan:
        return plan_of(self.manifest)

    @cached_property
    def label_names(self) -> list[str] | None:
        """The federation's label names in id order: those the manifest records (init read them from the partition),
        else the recipe's ``data.labels`` (partition numbers labels in that order); None when neither names them
        (a site's data then gives label ids) or for a causal LM."""
        if self.manifest.label_names is not None:
            return [str(name) for name in self.manifest.label_names]
        listed = self.recipe.data.labels
        if listed is not None and len(listed) == self.manifest.num_labels:
            return list(listed)
        return None

    @cached_property
    def header(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Names, dtypes and shapes of the adapter tensors, from the safetensors header (no data read)."""
        return storage.tensor_header(self.weights_path, "global checkpoint weights")

    # Each file's tensors are read and checked once, as torch tensors (a client's) or as numpy arrays (the
    # coordinator's, which never imports torch); asked for the other kind later, they are viewed over the same memory,
    # not read again. A server optimiser's state is the coordinator's alone: numpy only.

    @cached_property
    def verified_tensors(self) -> dict[str, torch.Tensor]:
        return self._verified(ADAPTER_WEIGHTS, "pt")

    @cached_property
    def verified_arrays(self) -> dict[str, np.ndarray]:
        return self._verified(ADAPTER_WEIGHTS, "numpy")

    @cached_property
    def verified_correction(self) -> dict[str, torch.Tensor]:
        return self._verified(CORRECTION_TENSORS, "pt")

    @cached_property
    def verified_correction_arrays(self) -> dict[str, np.ndarray]:
        return self._verified(CORRECTION_TENSORS, "numpy")

    @cached_property
    def verified_server_state(self) -> dict[str, np.ndarray]:
        """A server optimiser's moments, which only the coordinator reads: numpy arrays."""
        return self._verified(SERVER_STATE_TENSORS, "numpy")

    def _verified(self, filename: str, framework: str) -> dict[str, Any]:
        """A file of the checkpoint read and checked against its digests, in ``framework`` ("pt" or "numpy"); the
        same tensors in the other framework if they are held already; empty when the manifest records none (no
        correction, no server optimiser)."""
        digests, what, held_as = _FILES[filename]
        held = self.__dict__.get(held_as.get("numpy" if framework == "pt" else "pt"))
        if held is not None:
            return storage.as_arrays(held) if framework == "numpy" else storage.as_tensors(held)
        expected = getattr(self.manifest, digests)
        return storage.load_verified(self.path / filename, expected, what, framework) if expected else {}


# Each tensor file of a global checkpoint: the manifest field of its digests, what a message calls it, and the
# cached properties of Global that hold its tensors, by framework.
_FILES = {
    ADAPTER_WEIGHTS: ("tensor_digests", "global checkpoint weights",
                      {"pt": "verified_tensors", "numpy": "verified_arrays"}),
    CORRECTION_TENSORS: ("correction_digests", "global checkpoint correction",
                         {"pt": "verified_correction", "numpy": "verified_correction_arrays"}),
    SERVER_STATE_TENSORS: ("server_state_digests", "global checkpoint server state",
                           {"numpy": "verified_server_state"}),
}


def plan_of(manifest: GlobalManifest) -> Plan:
    return make_plan(manifest.method, manifest.head, manifest.adapter_kind)


def digests(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Each tensor's digest, in the current algorithm (:data:`fedlora_cli.storage.DIGEST_ALGORITHM`)."""
    return {name: storage.tensor_digest(t) for name, t in tensors.items()}


def next_digests(
    tensors: Mapping[str, torch.Tensor], parent: Mapping[str, torch.Tensor], parent_digests: Mapping[str, str]
) -> dict[str, str]:
    """The digests of a new checkpoint's tensors, where a tensor taken over from the parent checkpoint (the very
    tensor read and verified from it, or written with it) keeps the parent's digest.

    It is not hashed a second time, and its digest stays in whichever algorithm wrote it: FFA's frozen A keeps
    the digest it was given at round 0, so the frozen digest, which every client update must carry, does not
    change when a federation started with sha256 digests goes on with xxh128. Every other tensor is hashed now.
    """
    return {name: parent_digests[name] if parent.get(name) is t else storage.tensor_digest(t)
            for name, t in tensors.items()}


def frozen_digest(plan: Plan, tensor_digests: Mapping[str, str]) -> str | None:
    """One digest over every tensor no client may change (FFA's A, a frozen head); None if there are none."""
    frozen = {name: d for name, d in tensor_digests.items() if role_of(name) in plan.frozen}
    return storage.combined_digest(frozen) if frozen else None


def frozen_unchanged(plan: Plan, tensors: Mapping[str, torch.Tensor], manifest: GlobalManifest) -> bool:
    """Whether the tensors no client may change are still the global checkpoint's: each matches the digest its
    manifest records for it (checked with the algorithm that digest names, so a checkpoint written with sha256
    digests checks too), and together they are the frozen set the manifest's frozen digest covers."""
    recorded = manifest.tensor_digests
    frozen = {name: recorded.get(name) for name in tensors if role_of(name) in plan.frozen}
    for name, expected in frozen.items():
        where = f"global checkpoint tensor '{name}'"
        if expected is None or not storage.digest_matches(tensors[name], expected, where):
            return False
    return frozen_digest(plan, frozen) == manifest.frozen_digest


def frozen_labels(plan: Plan) -> str:
    """What a plan's frozen roles are called, e.g. 'A' (FFA-LoRA) or 'lambda_d / VeRA projections' (FFA-VeRA)."""
    order = list(ROLE_LABELS)
    return " / ".join(ROLE_LABELS[r] for r in sorted(plan.frozen, key=order.index)) or "tensors"


def build_for_site(recipe: recipes.Recipe, num_labels: int | None, base_override: str | None,
                   site: Mapping[str, Any] | None, rank: int | None = None) -> Workbench:
    """A workbench of ``recipe`` loaded the way this site asks (``site``: :data:`fedlora_cli.recipe.SITE_KEYS` ->
    value, over the recipe's own site settings, validated and named by their command-line options)."""
    site_recipe = recipes.with_site(recipe, site or {}, SITE_FLAGS)
    return build(recipe, num_labels, base_override, rank=rank, site=Site.of(site_recipe))


def bench_for(g: Global, base_override: str | None, bench: Workbench | None, rank: int | None = None,
              site: Mapping[str, Any] | None = None) -> Workbench:
    """A workbench for this federation with a LoRA adapter of ``rank`` (default: the global rank), built with
    this site's settings (``site``: :data:`fedlora_cli.recipe.SITE_KEYS` -> value, over the recipe's own)."""
    recipe, manifest = g.recipe, g.manifest
    rank = rank or recipe.adapter.r
    if bench is None:
        bench = build_for_site(recipe, manifest.num_labels, base_override, site, rank)
    if manifest.base_fingerprint not in (bench.fingerprint, bench.legacy_fingerprint):
        raise FedloraError(
            f"base model '{bench.base_location}' is not the one this federation started from "
            f"(fingerprint {bench.fingerprint}, global checkpoint expects {manifest.base_fingerprint})"
        )
    if bench.rank != rank:
        raise FedloraError(f"the model was built with adapter rank {bench.rank}, this client trains rank {rank}")
    _check_projections(bench, manifest)
    # The global checkpoint's recipe governs (it carries the calibrated DP noise, for one).
    return bench.for_recipe(recipe)


def _check_projections(bench: Workbench, manifest: GlobalManifest) -> None:
    """VeRA: the projections this site derived from the seed must be bit-identical to the global checkpoint's.

    They are never sent: every client regenerates them from ``training.seed`` (PEFT's projection_prng_key),
    so a site whose random number generator differs would silently train a different model.
    """
    derived = {n: t for n, t in bench.adapter_tensors().items() if role_of(n) == ROLE_PROJECTION}
    for name, t in sorted(derived.items()):
        expected = manifest.tensor_digests.get(name)
        if expected is None:
            raise FedloraError(f"the global checkpoint has no VeRA projection '{name}'")
        if not storage.digest_matches(t, expected, f"the global checkpoint's VeRA projection '{name}'"):
            got = storage.tensor_digest(t, storage.digest_algorithm(expected))
            raise FedloraError(
                f"VeRA projection '{name}' derived on this site from seed {manifest.seed} differs from the global "
                f"checkpoint's (digest {got[:20]}, expected {expected[:20]}): every client must derive identical "
                "projections; refusing to go on"
            )


def received_tensors(
    recipe: recipes.Recipe, global_tensors: dict[str, torch.Tensor], rank: int
) -> dict[str, torch.Tensor]:
    """The global adapter as a client of LoRA rank ``rank`` receives it: truncated to its rank (svd orders the
    factors by singular value) and rescaled to its LoRA scale. Unchanged for a client of the global rank."""
    a = recipe.adapter
    if rank == a.r:
        return global_tensors
    kind = adapter_kind(a.kind)
    ratio = kind.scale(a.alpha, a.r) / kind.scale(a.alpha, rank)
    result = dict(global_tensors)
    for a_name, b_name in kind.layers(global_tensors).values():
        result[a_name], result[b_name] = aggregation.to_rank(global_tensors[a_name], global_tensors[b_name], rank, ratio)
    return result


def load_client_model(
    bench: Workbench,
    plan: Plan,
    global_tensors: dict[str, torch.Tensor],
    state: storage.ClientState | None,
    correction: dict[str, torch.Tensor] | None = None,
) -> None:
    """The client's model: the global's base-weight correction (exact aggregation), the global adapter at the
    client's rank, overlaid with the tensors the client keeps (FedSA's B, a local head)."""
    bench.apply_correction(correction)
    bench.load_adapter_tensors(received_tensors(bench.recipe, global_tensors, bench.rank))
    if state is not None:
        # Error feedback's residuals (NAME::residual) are the encoder's, not the model's.
        kept = {name: t for name, t in state.tensors().items() if not encoding.is_residual(name)}
        if any(not plan.keeps(name) for name in kept):
            raise FedloraError(f"client state {state.path} holds tensors this method does not keep locally")
        bench.load_adapter_tensors(kept, partial=True)
