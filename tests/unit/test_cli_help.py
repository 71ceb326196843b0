"""What `firstcare ... --help` shows: plain text, each command its own flags, and the benchmark
time estimates the README quotes."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from bench import cli as bench_cli
from firstcare.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"
COMMANDS = [[], ["up"], ["bridge"], ["broker"], ["edge"], ["edge", "quarantine"], ["token"], ["simulate"], ["bench"],
            ["bench", "all"]]


def help_text(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            status: int | str | None = main([*argv, "--help"])
        except SystemExit as exc:
            status = exc.code
    assert status == 0
    return out.getvalue()


def flags(text: str) -> set[str]:
    """The options a help text lists (its examples left out)."""
    listed = text.split("options:", 1)[1].split("examples:", 1)[0]
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", listed))


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: " ".join(argv) or "firstcare")
def test_help_is_plain_text_without_doubled_backticks(argv: list[str]) -> None:
    text = help_text(argv)
    assert text.startswith("usage: firstcare")
    assert "``" not in text, text


def test_broker_help_lists_only_the_broker_flags() -> None:
    assert flags(help_text(["broker"])) == {"--help", "--mqtt-host", "--mqtt-port", "--log-level"}


def test_up_and_bridge_keep_their_settings_flags() -> None:
    settings = {"--mqtt-url", "--mqtt-host", "--mqtt-port", "--http-host", "--http-port", "--store-url", "--log-level"}
    assert settings <= flags(help_text(["up"])) and settings <= flags(help_text(["bridge"]))


def test_bench_time_estimates_agree_between_help_readme_and_code() -> None:
    full, quick = bench_cli.FULL_RUN_TIME, bench_cli.QUICK_RUN_TIME
    text = help_text(["bench"]) + help_text(["bench", "all"])
    assert full in text and quick in text
    assert "minute" not in text.replace(full, "").replace(quick, ""), "another estimate in the help"
    lines = [line for line in README.read_text().splitlines() if line.startswith("firstcare bench all")]
    assert any(full in line and "--quick" not in line for line in lines), lines
    assert any(quick in line and "--quick" in line for line in lines), lines
    for line in lines:
        assert "minute" not in line.replace(full, "").replace(quick, ""), line
