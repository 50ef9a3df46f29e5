"""Pushing an exported folder to the Hugging Face Hub; access is checked before anything is exported."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedlora_cli.errors import FedloraError, first_line


@dataclass(frozen=True, kw_only=True)
class HubTarget:
    """Where and how ``--push-to-hub`` uploads the exported folder."""

    repo_id: str
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None
    token: str | None = None


def check_hub_access(hub: HubTarget) -> None:
    """Refuse a push that cannot work (offline, not logged in, bad repo id) before anything is exported."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(hub.repo_id)
    except HFValidationError as exc:
        raise FedloraError(f"--push-to-hub: '{hub.repo_id}' is not a Hub repo id ({first_line(exc)})") from None
    if constants.HF_HUB_OFFLINE:
        raise FedloraError(
            "cannot push to the Hub: offline mode is on (HF_HUB_OFFLINE=1); export without --push-to-hub "
            "and upload the folder later"
        )
    if hub.token is None and get_token() is None:
        raise FedloraError("cannot push to the Hub: not logged in (run 'hf auth login', set HF_TOKEN or pass --token)")


def push_to_hub(folder: Path, hub: HubTarget, default_message: str = "fedlora export") -> str:
    """Create the repo (and branch) if needed and upload the folder as one commit; returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=hub.token)
    try:
        # private=None keeps the Hub's (or the organisation's) default for a new repo; an existing repo keeps its own.
        repo = api.create_repo(hub.repo_id, private=True if hub.private else None, exist_ok=True, repo_type="model")
        repo_id = getattr(repo, "repo_id", None) or hub.repo_id
        if hub.revision:
            api.create_branch(repo_id, branch=hub.revision, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), revision=hub.revision, repo_type="model",
            commit_message=hub.commit_message or default_message,
        )
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        reason = "not authorised (check the token and its write access)" if status in (401, 403) else first_line(exc)
        raise FedloraError(f"exported {folder}, but pushing to {hub.repo_id} failed: {reason}") from None
    except (OSError, ValueError) as exc:  # OfflineModeIsEnabled and connection errors are OSErrors
        raise FedloraError(f"exported {folder}, but pushing to {hub.repo_id} failed: {first_line(exc)}") from None
    url = getattr(commit, "commit_url", None) or str(getattr(repo, "url", "") or repo)
    return str(url)
