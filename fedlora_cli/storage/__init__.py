"""On-disk formats: atomic files and tensors (:mod:`.files`), manifests (:mod:`.manifests`), global checkpoints,
client updates and client state (:mod:`.checkpoints`), and the folder tree of a simulated run (:mod:`.run_layout`)."""

from fedlora_cli.storage.checkpoints import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, CORRECTION_TENSORS, GLOBAL_MANIFEST, SERVER_STATE_TENSORS, STATE_MANIFEST,
    STATE_TENSORS, UPDATE_MANIFEST, UPDATE_TENSORS, ClientState, ClientUpdate, GlobalCheckpoint, check_client_id,
    latest_state, prune_states, read_global, read_update, round_dirname, staged_update, state_rounds,
    valid_client_id, write_global, write_state, write_update,
)
from fedlora_cli.storage.files import (
    DIGEST_ALGORITHM, as_arrays, as_tensors, atomic_dir, atomic_file, check_digest, combined_digest, digest_algorithm,
    digest_matches, global_digest, is_arrays, load_tensors, load_verified, read_json, read_tensor, save_tensors,
    tensor_digest, tensor_header, write_json,
)
from fedlora_cli.storage.manifests import FORMAT_VERSION, GlobalManifest, StateManifest, UpdateManifest
from fedlora_cli.storage.run_layout import (
    CLIENTS_DIR, CURVES_PNG, DATA_DIR, GLOBAL_DIR, METRICS_DIR, RECIPE_FILE, TRACKING_DIR, UPDATES_DIR, RunLayout,
)

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "CLIENTS_DIR", "CORRECTION_TENSORS", "CURVES_PNG", "ClientState",
    "ClientUpdate", "DATA_DIR", "DIGEST_ALGORITHM", "FORMAT_VERSION", "GLOBAL_DIR", "GLOBAL_MANIFEST",
    "GlobalCheckpoint", "GlobalManifest", "METRICS_DIR", "RECIPE_FILE", "RunLayout", "SERVER_STATE_TENSORS", "STATE_MANIFEST",
    "STATE_TENSORS", "StateManifest", "TRACKING_DIR",
    "UPDATES_DIR", "UPDATE_MANIFEST", "UPDATE_TENSORS", "UpdateManifest", "as_arrays", "as_tensors", "atomic_dir",
    "atomic_file", "check_client_id", "check_digest", "combined_digest", "digest_algorithm", "digest_matches", "global_digest", "latest_state",
    "is_arrays", "prune_states", "load_tensors", "load_verified", "read_global",
    "read_json", "read_tensor", "read_update", "round_dirname", "staged_update", "state_rounds", "save_tensors", "tensor_digest", "tensor_header",
    "valid_client_id", "write_global", "write_json", "write_state", "write_update"
]
