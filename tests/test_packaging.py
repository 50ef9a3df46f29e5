"""The repository itself: every package pyproject.toml ships must be tracked by git, or a fresh clone (and CI)
lacks it."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tracked_files(folder: Path) -> set[str]:
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--", str(folder.relative_to(ROOT))],
                         capture_output=True, text=True, check=True).stdout
    return {line for line in out.splitlines() if line}


# A top-level '.gitignore' rule 'data/' once kept fedlora_cli/data/ out of git: a fresh clone lacked it.
@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_every_package_in_pyproject_is_tracked_by_git():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    untracked = []
    for package in setuptools["packages"]:
        folder = ROOT / setuptools.get("package-dir", {}).get(package, package.replace(".", "/"))
        files = tracked_files(folder)
        on_disk = {str(p.relative_to(ROOT)) for p in folder.glob("*.py")} if folder.is_dir() else set()
        if not files or on_disk - files:
            untracked.append(package)
    assert untracked == []
