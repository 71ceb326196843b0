"""The README's Prerequisites say what `make up` and `make test` need; `.ci/run`, the Makefile and
pyproject.toml must agree with it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
CI_RUN = (ROOT / ".ci" / "run").read_text()


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    return README[start:README.index("\n## ", start + 1)]


def test_prerequisites_come_before_the_quick_start() -> None:
    assert README.index("\n## Prerequisites\n") < README.index("\n## Quick start\n")


def test_the_python_version_is_the_one_the_project_requires() -> None:
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert required == ">=3.11"
    assert "Python 3.11+ with `venv`" in section("Prerequisites")
    assert "sys.version_info >= (3, 11)" in (ROOT / "Makefile").read_text()


def test_ci_run_installs_every_debian_package_the_tests_need() -> None:
    needed = {"mosquitto", "mosquitto-clients", "redis-server", "postgresql", "chromium", "docker-compose",
              "nginx-light"}
    installed = set(re.findall(r"missing\+=\(([\w-]+)\)", CI_RUN))
    assert needed <= installed, needed - installed
    prerequisites = section("Prerequisites")
    for name in ("mosquitto", "mosquitto-clients", "Redis", "PostgreSQL", "chromium", "docker-compose", "nginx-light"):
        assert name in prerequisites, name


def test_ci_run_starts_the_services_the_tests_reach_by_default() -> None:
    assert "redis-server --daemonize yes --bind 127.0.0.1 --port 6379" in CI_RUN
    assert "pg_ctlcluster" in CI_RUN and "pg_isready" in CI_RUN
    assert CI_RUN.rstrip().endswith('exit "$rc"') and "\nmake test\n" in CI_RUN


def test_the_suite_duration_is_stated() -> None:
    assert re.search(r"about \d+ minutes on 2 cores", section("Prerequisites"))
