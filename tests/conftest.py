"""Shared pytest fixtures. Keep each group in its own section."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.brokers import MosquittoInstance, require_mosquitto, start_mosquitto
from tests.support.http import share_default_tls_context
from tests.support.pki import Certs, gateway_acl_lines
from tests.support.probe import Probe
from tests.support.services import missing

# httpx clients share one default TLS context instead of loading the CA bundle each (tests/support/http.py)
share_default_tls_context()

# --------------------------------------------------------------------------
# Mosquitto (real broker, built from broker-config/; see tests/support/brokers.py)
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoInstance]:
    """Dev-mode broker (broker-config/mosquitto-dev.conf): anonymous, no ACL."""
    require_mosquitto()
    broker = start_mosquitto(tmp_path_factory.mktemp("mosquitto-dev"), dev=True)
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA, a server certificate for 127.0.0.1, client certificates on demand (tests/support/pki.py)."""
    return Certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def mosquitto_secure(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[MosquittoInstance]:
    """Production broker (broker-config/mosquitto.conf): TLS only, a client certificate per
    identity, the ACL enforced; plus the test gateway's ACL block and a second bridge."""
    require_mosquitto()
    broker = start_mosquitto(tmp_path_factory.mktemp("mosquitto-secure"), dev=False, certs=certs.dir,
                             acl_lines=[*gateway_acl_lines(), "user bridge-2", "topic read fc/#"])
    yield broker
    broker.stop()



@pytest.fixture
def probes() -> Iterator[Any]:
    """Factory for MQTT probes (tests/support/probe.py) on a broker (anything with ``host`` and
    ``port``), all closed after the test."""
    made: list[Probe] = []

    def make(broker: Any, client_id: str | None = None, username: str | None = None,
             password: str | None = None, **kwargs: Any) -> Probe:
        probe = Probe(broker.host, broker.port, client_id or f"t-{uuid.uuid4().hex[:10]}", username, password,
                      **kwargs)
        made.append(probe)
        return probe

    yield make
    for probe in made:
        probe.close()


# --------------------------------------------------------------------------
# Redis (the machine's service; FC_TEST_REDIS_URL overrides)
# --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def redis_url() -> str:
    """A reachable Redis; skipped when absent, except in CI where that is a failure."""
    import os

    import redis

    url = os.environ.get("FC_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        message = f"Redis is not reachable at {url}: {exc}"
        missing(message)
    return url


# --------------------------------------------------------------------------
# PostgreSQL (the machine's service as admin connection; FC_TEST_POSTGRES_URL overrides)
# --------------------------------------------------------------------------

def require_postgres() -> None:
    """Skip when PostgreSQL is absent, except in CI where that is a failure."""

    from tests.support.postgres import admin_url, reachable

    problem = reachable(admin_url())
    if problem is not None:
        message = f"PostgreSQL is not reachable at {admin_url()}: {problem}"
        missing(message)


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A fresh database for this test module, dropped afterwards."""
    from tests.support.postgres import create_database, drop_database

    require_postgres()
    url = create_database()
    yield url
    drop_database(url)


# --------------------------------------------------------------------------
# Product processes (tests/support/process.py): none outlives its test
# --------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _stop_leftover_processes() -> Iterator[None]:
    yield
    from tests.support.process import ChildProcess

    for child in list(ChildProcess.live):
        child.stop()
