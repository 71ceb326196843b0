"""The README is the user-facing reference: it must keep up with the code."""

from pathlib import Path
from typing import Any

from bridge.store_sqlite import MIGRATIONS  # noqa: F401 - the README names the schema mechanism
from firstcare.metrics import METRICS
from firstcare.settings import settings_table
from firstcare.topics import DEVICE_TYPES

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table() -> None:
    missing = [key for key, _, _ in settings_table() if f"| `{key}` |" not in README]
    assert missing == []


def test_every_metric_and_device_type_is_documented() -> None:
    assert [m for m in METRICS if f"| `{m}` |" not in README] == []
    assert [t for t in DEVICE_TYPES if f"`{t}`" not in README] == []


def test_every_edge_setting_is_documented() -> None:
    from edge.config import EdgeSettings

    assert [key for key, _, _ in EdgeSettings.table() if f"| `{key}` |" not in README] == []


def test_every_close_code_is_documented() -> None:
    from bridge.realtime import CLOSE_CODES

    assert [name for name, code in CLOSE_CODES.items() if f"| {code} | `{name}` |" not in README] == []


def test_the_stated_outage_fits_the_mosquitto_queue() -> None:
    """The README's outage length and rate are what broker-config/mosquitto.conf is sized for."""
    import re

    conf = (Path(__file__).resolve().parents[2] / "broker-config" / "mosquitto.conf").read_text()
    values = dict(line.split(None, 1) for line in conf.splitlines() if line and not line.startswith("#"))
    stated = re.search(r"outage of \*\*(\d+) minutes at ([\d,]+) readings/s\*\*", README)
    assert stated is not None, "the README states the outage the broker's queue covers"
    minutes, rate = stated.groups()
    needed = int(minutes) * 60 * int(rate.replace(",", ""))
    assert needed <= int(values["max_queued_messages"]) < 2**31
    assert int(values["max_queued_bytes"]) < 2**31
    assert f"max_queued_messages {values['max_queued_messages'].strip()}" in README


def test_every_metric_family_is_in_the_metrics_table() -> None:
    from bridge.telemetry import StatsCollector, Telemetry

    figures: dict[str, Any] = {"ingest": {}, "hub": {}, "realtime": {}, "readiness": {}}
    names = {m.name for m in StatsCollector(lambda: figures).collect()}
    names |= {m.name for m in Telemetry().registry.collect()}
    table = README[README.index("### Metrics"):]
    missing = [n for n in sorted(names) if n.removeprefix("firstcare_") not in table]
    assert missing == []


def test_every_edge_metric_family_is_in_the_metrics_table() -> None:
    from edge.telemetry import EdgeCollector

    stats = {"spool": {"depth": 0, "bytes": 0, "max_bytes": 0, "oldest_age_s": 0.0},
             "upstream": {"state": "connected", "inflight": 0}, "ward": {"state": "listening"},
             "quarantine": {"depth": 0, "oldest_age_s": 0.0, "by_reason_total": {}}}
    names = {m.name for m in EdgeCollector(lambda: stats).collect()}
    table = README[README.index("### Metrics"):]
    assert [n for n in sorted(names) if f"`{n}`" not in table and f"`{n}_total`" not in table] == []
    from edge.spool import QUARANTINE_REASONS

    edge = README[README.index("## Edge gateway"):README.index("## Brokers")]
    assert [r for r in QUARANTINE_REASONS if f"`{r}`" not in edge] == []
