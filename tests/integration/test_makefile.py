"""The README's two commands: `make up` installs what the product runs on, `make test` adds the
test tools. Checked with `make -n` (what make would run for a fresh virtual environment)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def dry_run(target: str, venv: Path, *variables: str) -> list[str]:
    if shutil.which("make") is None:
        pytest.fail("make is not installed")
    # run as a top-level make even when the suite itself runs under `make test` (a nested make
    # would print "Entering/Leaving directory" lines and inherit the outer make's flags)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    result = subprocess.run(["make", "--no-print-directory", "-n", target, f"VENV={venv}", *variables], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=30, check=True, env=env)
    return result.stdout.splitlines()


def installs(lines: list[str]) -> list[str]:
    return [line for line in lines if " install " in line and "--upgrade pip" not in line]


def test_make_up_installs_the_runtime_only(tmp_path: Path) -> None:
    lines = dry_run("up", tmp_path / "venv")
    assert installs(lines) == [f"{tmp_path}/venv/bin/pip install --quiet -e ."], lines
    assert lines[-1] == f"{tmp_path}/venv/bin/firstcare up --simulate 20"


@pytest.mark.parametrize("target", ["test", "venv"])
def test_make_test_adds_the_test_tools(tmp_path: Path, target: str) -> None:
    lines = dry_run(target, tmp_path / "venv")
    assert installs(lines) == [f"{tmp_path}/venv/bin/pip install --quiet -e .",
                               f"{tmp_path}/venv/bin/pip install --quiet -e '.[dev]'"], lines
    if target == "test":  # lint and type-check first, then the suite
        assert lines[-3:-1] == [f"{tmp_path}/venv/bin/ruff check", f"{tmp_path}/venv/bin/mypy"], lines
        assert lines[-1].startswith(f"{tmp_path}/venv/bin/pytest -n 4 --dist loadfile"), lines[-1]


def test_make_test_runs_the_workers_asked_for(tmp_path: Path) -> None:
    lines = dry_run("test", tmp_path / "venv", "TEST_WORKERS=0", "PYTEST_ARGS=tests/unit")
    assert lines[-1] == f"{tmp_path}/venv/bin/pytest -n 0 --dist loadfile tests/unit"
