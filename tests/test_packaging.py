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


# main has since been rewritten with an anchored '/data/' and the package tracked (5fd81ac): on a branch based on
# that, this test passes and the xfail marker must go (strict=True makes the XPASS fail loudly).
@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
@pytest.mark.xfail(
    strict=True,
    reason="BUG (repository, not code): the top-level .gitignore's 'data/' pattern ignores fedlora_cli/data/, so "
    "commit 98ed2fb deleted fedlora_cli/data.py but never added the fedlora_cli/data package (examples.py, "
    "partition.py, assets.py); a fresh clone cannot import fedlora_cli.data. (A worktree of this commit only "
    "imports it because the venv's editable install maps it to /work/main's copy.)",
)
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
