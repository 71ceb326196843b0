"""Simulation settings and fleet layout, without a broker."""

from __future__ import annotations

import pytest

from firstcare.errors import ConfigError
from firstcare.topics import is_valid_id
from simulators.runner import SCENARIO_NAMES, SimulationConfig, build_fleet, main


def test_fleet_layout() -> None:
    config = SimulationConfig(patients=2, devices=("monitor", "oximeter"), scenario={"p-002": "flaky"})
    fleet = build_fleet(config)
    assert [(d.spec.device_id, d.spec.patient_id, d.spec.fault) for d in fleet] == [
        ("monitor-001", "p-001", None), ("oximeter-001", "p-001", None),
        ("monitor-002", "p-002", "flaky"), ("oximeter-002", "p-002", "flaky"),
    ]
    assert all(is_valid_id(d.spec.device_id) for d in fleet)


def test_bindings_name_every_device_of_the_fleet_with_its_patient() -> None:
    config = SimulationConfig(patients=2, devices=("monitor", "oximeter"), device_prefix="qa-")
    assert config.bindings() == [(d.spec.device_type, d.spec.device_id, d.spec.patient_id) for d in build_fleet(config)]
    assert config.bindings()[-1] == ("oximeter", "qa-oximeter-002", "p-002")


def test_a_patients_devices_share_its_physiology() -> None:
    monitor, oximeter = build_fleet(SimulationConfig(devices=("monitor", "oximeter")))
    assert monitor._patient is oximeter._patient


def test_mix_deals_every_scenario_in_turn() -> None:
    config = SimulationConfig(patients=len(SCENARIO_NAMES) + 1, mix=True)
    assert [config.scenario_for(n) for n in range(1, config.patients + 1)] == [*SCENARIO_NAMES, SCENARIO_NAMES[0]]


def test_one_scenario_for_all_or_some() -> None:
    assert SimulationConfig(patients=3, scenario="sepsis").scenario_for(3) == "sepsis"
    some = SimulationConfig(patients=3, scenario={"p-002": "sepsis"})
    assert [some.scenario_for(n) for n in (1, 2, 3)] == ["stable", "sepsis", "stable"]


def test_prefixes_let_two_simulators_share_a_broker() -> None:
    config = SimulationConfig(patients=1000, device_prefix="qa2-", patient_prefix="ward7-")
    assert config.patient_id(1) == "ward7-001" and config.patient_id(1000) == "ward7-1000"
    assert config.device_id("bp", 12) == "qa2-bp-012"


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"patients": 0}, "patients"),
        ({"devices": ()}, "devices"),
        ({"devices": ("monitor", "toaster")}, "devices"),
        ({"devices": ("monitor", "monitor")}, "devices"),
        ({"rate": 0}, "rate"),
        ({"rate": float("inf")}, "rate"),
        ({"duration": -1}, "duration"),
        ({"count": 0}, "count"),
        ({"scenario": "zombie"}, "scenario"),
        ({"scenario": {"p-009": "sepsis"}}, "scenario"),
        ({"scenario": {"p-001": "zombie"}}, "scenario"),
        ({"mix": True, "scenario": "sepsis"}, "mix"),
        ({"hospital_id": "h 1"}, "hospital_id"),
        ({"device_prefix": "a/b"}, "device_prefix"),
        ({"patient_prefix": "x" * 70}, "patient_prefix"),
        ({"ramp_seconds": -1}, "ramp_seconds"),
        ({"fault_after": 0}, "fault_after"),
    ],
)
def test_bad_settings_name_the_key(changes: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}: "):
        SimulationConfig(**changes)


@pytest.mark.parametrize(
    "argv",
    [
        ["--patients", "0"],
        ["--rate", "fast"],
        ["--devices", "monitor,toaster"],
        ["--mqtt-url", "http://broker:1883"],
        ["--scenario", "sepsis", "--mix"],
        ["--scenario", "p-001=sepsis,oops"],
        ["--no-such-flag"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv, environ={}) == 2
    assert "error" in capsys.readouterr().err


def test_help_exits_0_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"], environ={"FC_SIMULATE_MQTT_URL": "mqtt://from-env:1999"}) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "firstcare simulate --patients" in out
    assert "mqtt://from-env:1999" in out
    for name in SCENARIO_NAMES:
        assert name in out
