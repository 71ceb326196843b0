"""The README's layering rule, checked: the pure modules import no I/O. Each is imported alone in
a fresh interpreter (a module already loaded by another test would hide what it pulls in) and
must not have loaded an MQTT client, threads, an event loop, sockets or a database driver."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PURE = [
    "firstcare.topics", "firstcare.metrics", "firstcare.news2", "firstcare.payloads", "firstcare.events",
    "firstcare.rooms", "firstcare.permissions", "firstcare.signing", "firstcare.identity",
    "bridge.records", "bridge.sequence", "bridge.devices", "bridge.alerts", "bridge.news2_state",
    "bridge.router", "bridge.reports", "edge.stamp", "edge.packets", "simulators.physiology",
]
IO = ["paho", "amqtt", "threading", "asyncio", "socket", "ssl", "sqlite3", "psycopg", "redis", "fastapi",
      "starlette", "uvicorn"]
# the domain's records and rules do not depend on the storage interface that persists them
STORAGE = ["bridge.store", "bridge.store_sqlite", "bridge.store_postgres", "bridge.cluster"]


def loaded_after_import(module: str) -> set[str]:
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return set(json.loads(result.stdout))


@pytest.mark.parametrize("module", PURE)
def test_a_pure_module_imports_no_io(module: str) -> None:
    loaded = loaded_after_import(module)
    assert [name for name in IO if name in loaded] == []
    assert [name for name in STORAGE if name in loaded] == []
