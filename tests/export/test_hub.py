"""fedlora_cli.export.hub: pushing an export to the Hugging Face Hub (HfApi's methods replaced: no network)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from export.helpers import LAST, fails, ok


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub
    from huggingface_hub import HfApi

    calls: list[tuple[str, tuple, dict]] = []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    original_init = HfApi.__init__

    def init(self, *args, **kwargs):
        # Only fedlora's own clients: a library loading the base model (bitsandbytes' kernels) makes its own HfApi.
        if sys._getframe(1).f_globals.get("__name__") == "fedlora_cli.export.hub":
            calls.append(("init", args, kwargs))
        original_init(self, *args, **kwargs)

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", (repo_id,), kwargs))
        return SimpleNamespace(repo_id=repo_id, url=f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", (repo_id,), kwargs))

    def upload_folder(self, **kwargs):
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        calls.append(("upload_folder", (), {**kwargs, "files": files}))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc123")

    monkeypatch.setattr(HfApi, "__init__", init)
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_creates_repo_branch_and_uploads(hub, federation_of, tmp_path):
    layout = federation_of("ffa")
    out = tmp_path / "export"
    result = json.loads(ok([layout.global_checkpoint(LAST), "--out", out, "--push-to-hub", "alice/tiny-ffa", "--private",
                            "--revision", "round-2", "--commit-message", "federated ffa", "--token", "hf_test", "--json"]))
    assert [c[0] for c in hub] == ["init", "create_repo", "create_branch", "upload_folder"]
    assert hub[0][2]["token"] == "hf_test"
    assert hub[1][1] == ("alice/tiny-ffa",)
    assert hub[1][2]["private"] is True and hub[1][2]["exist_ok"] is True
    assert hub[2][1] == ("alice/tiny-ffa",) and hub[2][2]["branch"] == "round-2" and hub[2][2]["exist_ok"] is True
    upload = hub[3][2]
    assert upload["repo_id"] == "alice/tiny-ffa" and Path(upload["folder_path"]) == out
    assert upload["revision"] == "round-2" and upload["commit_message"] == "federated ffa"
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(upload["files"])
    assert result["hub_url"] == "https://huggingface.co/alice/tiny-ffa/commit/abc123"


def test_push_defaults_use_token_discovery_and_main(hub, monkeypatch, federation_of, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_saved")
    layout = federation_of("fedavg")
    ok([layout.global_checkpoint(LAST), "--out", tmp_path / "export", "--merge", "--push-to-hub", "alice/tiny"])
    assert [c[0] for c in hub] == ["init", "create_repo", "upload_folder"]
    assert hub[0][2]["token"] is None  # HfApi finds the saved token itself
    assert hub[1][2]["private"] is None  # the Hub's default visibility for a new repo
    upload = hub[2][2]
    assert upload["revision"] is None and "round 2" in upload["commit_message"]
    assert "model.safetensors" in upload["files"]


def test_push_offline_fails_before_exporting(hub, monkeypatch, federation_of, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    layout = federation_of("fedavg")
    out = tmp_path / "export"
    args = [layout.global_checkpoint(LAST), "--out", out, "--push-to-hub", "alice/tiny", "--token", "t"]
    fails(args, "offline", "HF_HUB_OFFLINE")
    assert not out.exists() and hub == []


def test_push_unauthenticated_fails_before_exporting(hub, federation_of, tmp_path):
    layout = federation_of("fedavg")
    out = tmp_path / "export"
    fails([layout.global_checkpoint(LAST), "--out", out, "--push-to-hub", "alice/tiny"], "not logged in", "--token")
    assert not out.exists() and hub == []
    fails([layout.global_checkpoint(LAST), "--out", out, "--push-to-hub", "not a repo!", "--token", "t"], "not a Hub repo id")
    assert not out.exists()


def test_push_rejected_by_the_hub_is_one_line(hub, monkeypatch, federation_of, tmp_path):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    def refuse(self, repo_id, **kwargs):
        # A stand-in for the HTTP library's response: the error reads only these fields.
        response = SimpleNamespace(status_code=401, headers={}, request=None)
        raise HfHubHTTPError("401 Client Error: Unauthorized", response=response)

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    layout = federation_of("fedavg")
    out = tmp_path / "export"
    fails([layout.global_checkpoint(LAST), "--out", out, "--push-to-hub", "alice/tiny", "--token", "bad"],
          "pushing to alice/tiny failed", "not authorised")
    assert (out / "adapter_model.safetensors").is_file()  # the export itself is complete and kept


def test_hub_options_need_push_to_hub(federation_of, tmp_path):
    layout = federation_of("fedavg")
    fails([layout.global_checkpoint(LAST), "--out", tmp_path / "x", "--private"], "--push-to-hub")
    assert not (tmp_path / "x").exists()
