"""The firstcare command: one entry point, a subcommand per job.

    firstcare up [--simulate N]   broker + bridge + REST in one process, on embedded defaults
    firstcare bridge              the bridge alone, against FC_MQTT_URL
    firstcare broker              the embedded amqtt broker alone
    firstcare edge                a hospital edge gateway (store and forward)
    firstcare simulate ...        simulated devices (QA)
    firstcare token ...           mint a JWT for a role and scope
    firstcare audit verify        check the audit trail's hash chain
    firstcare certs ...           CA, server, device and gateway certificates; signing keys
    firstcare bench ...           benchmarks (ingest, fan-out, end to end, peers)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from firstcare.errors import FirstCareError
from firstcare.logs import install_redaction
from firstcare.settings import Settings

EPILOGS = {
    "up": """examples:
  firstcare up                       broker on :1884, API on http://127.0.0.1:8000
  firstcare up --simulate 20         ... with 20 simulated patients publishing
  firstcare up --tls --simulate 20   mqtts with a certificate per device, HTTPS/WSS, signed readings
  FC_HTTP_PORT=9000 firstcare up --mqtt-port 1885""",
    "bridge": """examples:
  FC_MQTT_URL=mqtts://mosquitto:8884 FC_MQTT_CA_FILE=certs/ca.pem FC_MQTT_CERT_FILE=certs/bridge.pem \\
    FC_MQTT_KEY_FILE=certs/bridge-key.pem FC_JWT_SECRET=... firstcare bridge
  FC_MQTT_URL=mqtt://bridge:secret@mosquitto:1883 FC_JWT_SECRET=... firstcare bridge
  firstcare bridge --mqtt-url mqtt://127.0.0.1:1883 --http-port 8001
  FC_STORE_URL=postgresql://firstcare:secret@db/firstcare FC_MQTT_CLIENT_ID=bridge-2 ... firstcare bridge
                                     one of several bridges sharing one PostgreSQL""",
    "broker": """examples:
  firstcare broker                   embedded amqtt broker on 127.0.0.1:1884
  FC_BROKER_CERT_FILE=certs/server.pem FC_BROKER_KEY_FILE=certs/server-key.pem FC_MQTT_CA_FILE=certs/ca.pem \\
    firstcare broker                 the same with TLS only and a certificate per client
  firstcare broker --mqtt-host 0.0.0.0 --mqtt-port 1884""",
    "edge": """examples:
  firstcare edge --upstream-url mqtts://uplink:8884 --hospital h1 --gateway-id ward-3 --ca-file certs/ca.pem \\
      --cert-file certs/clients/gateway.h1.ward-3.pem --key-file certs/clients/gateway.h1.ward-3-key.pem \\
      --local-cert-file certs/server.pem --local-key-file certs/server-key.pem
  firstcare edge --upstream-url mqtt://gateway:secret@uplink:1883 --hospital h1 --gateway-id ward-3
  firstcare edge --local-port 1885 --bed-map beds.yaml --drain-rate 200
  firstcare edge quarantine list|retry|drop           messages the upstream refused for good
  (devices of the ward publish to this gateway's broker, port 1885 by default)""",
    "token": """examples:
  firstcare token --role admin
  firstcare token --role clinician --hospital h1 --hospital h2 --ttl 28800
  firstcare token --role patient --patient p-001 --sub alice""",
    "audit": """examples:
  firstcare audit verify                           the trail beside FC_STORE_URL's database
  firstcare audit verify --audit-url sqlite:////var/lib/firstcare/firstcare-audit.db
  firstcare audit verify --anchor 1042:9f86d08...  also prove record 1042 still has that hash
exit status: 0 intact, 1 tampered (each problem is named), 2 no trail or bad arguments""",
}


def _settings_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mqtt-url", help="FC_MQTT_URL: 'embedded' or mqtt://user:pass@host:port")
    p.add_argument("--mqtt-host", help="FC_MQTT_HOST: embedded broker bind address")
    p.add_argument("--mqtt-port", type=int, help="FC_MQTT_PORT: embedded broker port (default 1884)")
    p.add_argument("--http-host", help="FC_HTTP_HOST: HTTP bind address (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, help="FC_HTTP_PORT: HTTP port (default 8000)")
    p.add_argument("--store-url", help="FC_STORE_URL: sqlite:///path or postgresql://user:password@host/database")
    p.add_argument("--log-level", help="FC_LOG_LEVEL")


def _settings(args: argparse.Namespace, **forced: Any) -> Settings:
    keys = ("mqtt_url", "mqtt_host", "mqtt_port", "http_host", "http_port", "store_url", "log_level")
    overrides = {k: getattr(args, k, None) for k in keys}
    overrides.update(forced)
    return Settings.from_env(**overrides)


def secret_file(settings: Settings) -> Path:
    return Path(settings.sqlite_path).resolve().parent / "jwt-secret"


def ensure_secret(settings: Settings) -> Settings:
    """Development convenience: keep one generated secret next to the database, so tokens
    printed by ``firstcare up`` or ``firstcare token`` survive restarts."""
    if settings.jwt_secret or settings.jwt_public_key or settings.jwks_url:
        return settings
    path = secret_file(settings)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return settings.replace(jwt_secret=path.read_text().strip())


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_redaction()


def run_loop(main: Any) -> Any:
    """uvloop when it is installed (it is a dependency on Linux): the fan-out and the MQTT
    hand-over are event-loop bound, and uvloop runs them measurably faster."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def _serve(settings: Settings, on_ready: Any = None, on_stopping: Any = None) -> None:
    import uvicorn

    from bridge.app import create_app
    from bridge.server import server_config
    from firstcare.broker import check_port_free

    if settings.mqtt_url == "embedded":
        check_port_free(settings.mqtt_host, settings.mqtt_port, "MQTT", "--mqtt-port", "FC_MQTT_PORT")
    check_port_free(settings.http_host, settings.http_port, "HTTP", "--http-port", "FC_HTTP_PORT")
    settings.check_bridge_client()
    app = create_app(settings)
    config = server_config(app, settings)
    install_redaction()

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            if on_stopping is not None:  # e.g. simulated devices say goodbye while the bridge still listens
                await asyncio.to_thread(on_stopping)
            # tell live streams first, so a WebSocket closes with 4001 (reconnect) rather than
            # the bare 1012 uvicorn sends when it tears connections down
            runtime = getattr(app.state, "runtime", None)
            realtime = getattr(runtime, "realtime", None)
            if realtime is not None and realtime.connections:
                realtime.shut()  # each stream's close frame goes out behind what it has buffered
                await asyncio.sleep(0.5)
            await super().shutdown(sockets)

    server = Server(config)

    async def serve() -> None:
        try:
            await server.serve()
        except SystemExit:  # uvicorn exits 3 when the lifespan fails: say why below, with our status
            if server.started:
                raise

    serving = asyncio.create_task(serve())
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)
    if server.started and on_ready is not None:
        on_ready(app)
    await serving
    if not server.started:
        start_error = getattr(getattr(app.state, "runtime", None), "start_error", None)
        raise FirstCareError(start_error or "the server did not start; see the messages above")


async def _report_progress(app: Any, every_s: float = 10.0) -> None:
    """One line of what the system is doing, so a person watching the terminal sees it live."""
    while True:
        await asyncio.sleep(every_s)
        s = app.state.runtime.stats()
        ingest, rt = s["ingest"], s["realtime"]
        print(f"[{time.strftime('%H:%M:%S')}] stored {ingest.get('readings_stored', 0)} readings, "
              f"{ingest.get('dead_letters', 0)} dead letters, {ingest.get('alerts_active', 0)} active alerts, "
              f"{ingest.get('devices_online', 0)}/{ingest.get('devices', 0)} devices online, "
              f"{rt['connections']} live connections, MQTT {ingest.get('mqtt_state')}", flush=True)


async def _bind_simulated(runtime: Any, bindings: list[tuple[str, str, str]], hospital_id: str) -> None:
    """Bind each simulated device to its patient through the core, as ward staff do with
    ``PUT /api/devices/{type}/{id}/binding``: a patient whose monitor goes offline keeps their
    tile, and the device's technical alarms name the patient."""
    from bridge.core import PatientConflict

    for device_type, device_id, patient_id in bindings:
        try:
            _, events = await runtime.writer.run(runtime.core.set_binding, device_type, device_id, patient_id,
                                                 hospital_id)
        except PatientConflict as exc:
            print(f"firstcare up: {device_type}/{device_id} not bound: {exc}", file=sys.stderr, flush=True)
            continue
        await runtime.publish(events)


def with_dev_tls(settings: Settings, directory: Path) -> Settings:
    """``firstcare up --tls``: a development CA and certificates in ``directory`` (made once),
    TLS on the embedded broker (a certificate per device required), the bridge's own
    certificate for it, and HTTPS/WSS. Settings already given win."""
    from firstcare.certs import Pki

    pki = Pki(directory)
    pki.ensure_dev()
    defaults = {
        "broker_cert_file": pki.server.cert, "broker_key_file": pki.server.key, "mqtt_ca_file": pki.ca_file,
        "mqtt_cert_file": pki.bridge.cert, "mqtt_key_file": pki.bridge.key,
        "http_cert_file": pki.server.cert, "http_key_file": pki.server.key,
    }
    return settings.replace(**{k: str(v) for k, v in defaults.items() if getattr(settings, k) is None})


def _register_simulated_keys(app: Any, config: Any, loop: asyncio.AbstractEventLoop) -> None:
    """Provision the simulated devices as an operator would: a certificate and a signing key
    each (issued from the development CA), public keys registered with the bridge (on its
    writer thread, like the key API). Runs on the simulator's thread."""
    from firstcare.certs import Pki
    from firstcare.certs_cli import ensure_device_credentials
    from firstcare.identity import device_identity
    from firstcare.signing import KeyRecord
    from simulators.runner import device_identities

    runtime = app.state.runtime
    pki = Pki(config.certs_dir)
    for hospital, device_type, device_id in device_identities(config):
        identity = device_identity(hospital, device_type, device_id)
        _, _, public = ensure_device_credentials(pki, identity, signing=True)
        assert public is not None
        key = KeyRecord(identity, public, "device", hospital, device_type, device_id)
        if runtime.core.keys.get(identity) != key:
            asyncio.run_coroutine_threadsafe(runtime.writer.run(runtime.core.register_key, key), loop).result(30)


def up_banner(settings: Settings, hospital: str, broker_url: str | None = None,
              tls_dir: Path | None = None) -> str:
    """What ``firstcare up`` prints once it serves. It mints an admin token only when it holds
    the HS256 secret: with FC_JWT_PUBLIC_KEY or FC_JWKS_URL the tokens come from the identity
    provider that holds the private key, and the banner says so. ``broker_url`` names an
    external broker; ``tls_dir`` is the development CA's folder when ``--tls`` is on."""
    from firstcare.auth import mint_token

    scheme = "https" if settings.http_cert_file else "http"
    host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "::") else settings.http_host
    base = f"{scheme}://{host}:{settings.http_port}"
    mqtt_scheme = "mqtts" if settings.mqtt_tls else "mqtt"
    broker = (f"{mqtt_scheme}://{settings.mqtt_host}:{settings.mqtt_port} (embedded"
              f"{', a certificate per device' if settings.broker_cert_file else ''})"
              if settings.mqtt_url == "embedded" else (broker_url or settings.mqtt_url))
    if settings.jwt_secret:
        token = mint_token(settings.jwt_secret, "admin", "admin", ttl_seconds=7 * 86400)
        dashboard, admin = f"{base}/#token={token}&hospital={hospital}", token
    else:
        source = "FC_JWT_PUBLIC_KEY" if settings.jwt_public_key else "FC_JWKS_URL"
        dashboard = f"{base}/#hospital={hospital}   (paste a token from your identity provider)"
        admin = (f"none minted: tokens are verified with {source}, so they are signed by your identity "
                 f"provider (set FC_JWT_SECRET to have `up` mint HS256 ones)")
    curl = f"curl --cacert {settings.mqtt_ca_file} " if settings.http_cert_file and settings.mqtt_ca_file else "curl "
    tls_note = (f"\n  TLS           development CA {tls_dir / 'ca.pem'} (trust it in the browser, or accept"
                f" the warning)" if tls_dir is not None else "")
    return f"""
FirstCare Realtime is up.
  dashboard     {dashboard}
  MQTT broker   {broker}
  REST API      {base}/api   (OpenAPI: {base}/docs)
  health        {base}/healthz   {base}/readyz
  admin token   {admin}{tls_note}
  try           {curl}-H "Authorization: Bearer $TOKEN" {base}/api/devices
Press Ctrl-C to stop.
"""


def cmd_up(args: argparse.Namespace) -> int:
    settings = ensure_secret(_settings(args, mqtt_url=args.mqtt_url or None))
    certs_dir = Path(settings.sqlite_path).resolve().parent / "certs"
    if args.tls:
        settings = with_dev_tls(settings, certs_dir)
    _configure_logging(settings.log_level)
    stop_sim = threading.Event()
    sim_thread: list[threading.Thread] = []
    progress: list[asyncio.Task[None]] = []

    def ready(app: Any) -> None:
        broker_url = None if settings.mqtt_url == "embedded" else str(app.state.runtime.mqtt_target)
        print(up_banner(settings, args.hospital, broker_url, certs_dir if args.tls else None), flush=True)
        progress.append(asyncio.get_running_loop().create_task(_report_progress(app)))
        if args.simulate:
            from simulators.runner import SimulationConfig, run_simulation

            target = app.state.runtime.mqtt_target
            tls = target.tls is not None
            config = SimulationConfig(mqtt_url=f"{'mqtts' if tls else 'mqtt'}://{target.host}:{target.port}",
                                      patients=args.simulate, hospital_id=args.hospital, mix=True, seed=args.seed,
                                      certs_dir=str(certs_dir) if tls else None, sign=tls,
                                      ca_file=settings.mqtt_ca_file if tls else None)
            loop = asyncio.get_running_loop()

            def simulate() -> None:
                try:
                    if tls:
                        _register_simulated_keys(app, config, loop)
                    summary = run_simulation(config, stop_event=stop_sim)
                    print(f"simulation finished: {summary}", flush=True)
                except FirstCareError as exc:
                    print(f"firstcare up: simulated devices stopped: {exc}", file=sys.stderr, flush=True)

            async def bind_then_simulate() -> None:
                await _bind_simulated(app.state.runtime, config.bindings(), config.hospital_id)
                if not stop_sim.is_set():
                    t = threading.Thread(target=simulate, name="fc-simulate", daemon=True)
                    t.start()
                    sim_thread.append(t)

            progress.append(asyncio.get_running_loop().create_task(bind_then_simulate()))

    def stop_simulation() -> None:
        stop_sim.set()
        for t in sim_thread:
            t.join(10)

    try:
        run_loop(_serve(settings, ready, stop_simulation))
    except KeyboardInterrupt:
        pass
    finally:
        stop_simulation()
    return 0


def cmd_bridge(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _configure_logging(settings.log_level)
    with contextlib.suppress(KeyboardInterrupt):
        run_loop(_serve(settings))
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from firstcare.broker import BrokerTls, EmbeddedBroker, check_port_free

    settings = _settings(args)
    _configure_logging(settings.log_level)
    check_port_free(settings.mqtt_host, settings.mqtt_port, "MQTT", "--mqtt-port", "FC_MQTT_PORT")

    tls = (BrokerTls(settings.broker_cert_file, settings.broker_key_file or "", settings.mqtt_ca_file or "",
                     root=settings.topic_root) if settings.broker_cert_file else None)

    async def run() -> None:
        broker = EmbeddedBroker(settings.mqtt_host, settings.mqtt_port, tls=tls)
        await broker.start()
        print(f"embedded MQTT broker listening on {broker.url}"
              f"{' (TLS; a client certificate from FC_MQTT_CA_FILE required)' if tls else ''} (Ctrl-C to stop)",
              flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await broker.stop()

    asyncio.run(run())
    return 0


def cmd_edge(args: argparse.Namespace) -> int:
    import uvicorn

    from edge.config import EdgeSettings
    from edge.gateway import create_app
    from firstcare.broker import check_port_free

    keys = ("upstream_url", "local_url", "local_host", "local_port", "hospital_id", "gateway_id", "spool_path",
            "spool_max_mb", "bed_map", "drain_rate", "http_host", "http_port", "log_level", "ca_file", "cert_file",
            "key_file", "local_cert_file", "local_key_file", "signing_key", "signing_kid", "upstream_protocol",
            "upstream_max_packet_bytes", "status_seconds")
    settings = EdgeSettings.from_env(**{k: getattr(args, k, None) for k in keys},
                                     tls_insecure=True if args.tls_insecure else None)
    _configure_logging(settings.log_level)
    if settings.local_url == "embedded":
        check_port_free(settings.local_host, settings.local_port, "ward MQTT", "--local-port", "FC_EDGE_LOCAL_PORT")
    check_port_free(settings.http_host, settings.http_port, "HTTP", "--http-port", "FC_EDGE_HTTP_PORT")
    scheme = "mqtts" if settings.ward_tls else "mqtt"
    ward = (f"{scheme}://{settings.local_host}:{settings.local_port} (embedded)" if settings.local_url == "embedded"
            else settings.local_url)
    print(f"edge gateway {settings.gateway_id} for hospital {settings.hospital_id}: ward broker {ward}, "
          f"upstream {settings.upstream_url}, stats http://{settings.http_host}:{settings.http_port}/stats", flush=True)
    config = uvicorn.Config(create_app(settings), host=settings.http_host, port=settings.http_port,
                            log_level=settings.log_level.lower(), access_log=False, timeout_graceful_shutdown=5)
    install_redaction()
    uvicorn.Server(config).run()
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from firstcare.auth import mint_token

    settings = Settings.from_env(store_url=args.store_url)
    secret = args.secret or settings.jwt_secret
    if not secret and secret_file(settings).exists():
        secret = secret_file(settings).read_text().strip()
    if not secret:
        raise FirstCareError(
            f"no signing secret: set FC_JWT_SECRET, pass --secret, or run where `firstcare up` keeps "
            f"{secret_file(settings)} (or point --store-url at its database)")
    print(mint_token(secret, args.sub or args.role, args.role, args.hospital, args.patient, args.ttl))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from bridge.audit import parse_anchor
    from bridge.audit_log import audit_path, verify_file

    settings = Settings.from_env(store_url=args.store_url, audit_url=args.audit_url)
    try:
        anchors = [parse_anchor(a) for a in args.anchor]
    except ValueError as exc:
        raise FirstCareError(str(exc)) from exc
    path = audit_path(settings.audit_url, settings.sqlite_path)
    result = verify_file(path, anchors)
    if result.ok:
        print(f"audit trail {path}: {result.records} records, hash chain intact")
        print(f"head {result.head_seq}:{result.head_hash}  (keep it; check later with --anchor)")
        return 0
    print(f"audit trail {path}: TAMPERED ({len(result.problems)} problem(s) in {result.records} records)")
    for problem in result.problems:
        print(f"  {problem.kind}: {problem.message}")
    return 1


def cmd_simulate(argv: list[str]) -> int:
    from simulators.runner import main as simulate_main

    return simulate_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="firstcare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, epilog=EPILOGS.get(name),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    up = add("up", "run broker, bridge and REST API in one process on embedded defaults")
    _settings_flags(up)
    up.add_argument("--simulate", type=int, default=0, metavar="N", help="also run N simulated patients")
    up.add_argument("--hospital", default="h1", help="hospital id of the simulated patients (default h1)")
    up.add_argument("--seed", type=int, default=1, help="simulation seed")
    up.add_argument("--tls", action="store_true",
                    help="TLS everywhere with a development CA in the data folder's certs/ (made once): mqtts with a "
                         "certificate per device, HTTPS/WSS, signed simulated readings")
    up.set_defaults(func=cmd_up)

    bridge = add("bridge", "run the bridge (ingest, store, alerts, API) against an MQTT broker")
    _settings_flags(bridge)
    bridge.set_defaults(func=cmd_bridge)

    broker = add("broker", "run the embedded amqtt broker alone")
    broker.add_argument("--mqtt-host", help="FC_MQTT_HOST: bind address (default 127.0.0.1)")
    broker.add_argument("--mqtt-port", type=int, help="FC_MQTT_PORT: port (default 1884)")
    broker.add_argument("--log-level", help="FC_LOG_LEVEL")
    broker.set_defaults(func=cmd_broker)

    edge = add("edge", "run a hospital edge gateway: ward broker -> spool on disk -> upstream broker")
    edge.add_argument("--upstream-url", help="FC_EDGE_UPSTREAM_URL: mqtt://user:pass@host:port of the uplink broker")
    edge.add_argument("--local-url", help="FC_EDGE_LOCAL_URL: 'embedded' (default) or mqtt://... of the ward broker")
    edge.add_argument("--local-host", help="FC_EDGE_LOCAL_HOST: embedded ward broker bind address")
    edge.add_argument("--local-port", type=int, help="FC_EDGE_LOCAL_PORT: embedded ward broker port (default 1885)")
    edge.add_argument("--hospital", dest="hospital_id", help="FC_EDGE_HOSPITAL_ID: the gateway's hospital")
    edge.add_argument("--gateway-id", help="FC_EDGE_GATEWAY_ID")
    edge.add_argument("--spool", dest="spool_path", help="FC_EDGE_SPOOL_PATH: SQLite spool file")
    edge.add_argument("--spool-max-mb", type=float, help="FC_EDGE_SPOOL_MAX_MB")
    edge.add_argument("--bed-map", help="FC_EDGE_BED_MAP: YAML 'device_type/device_id: patient_id'")
    edge.add_argument("--drain-rate", type=float, help="FC_EDGE_DRAIN_RATE: most messages/s upstream")
    edge.add_argument("--http-host", help="FC_EDGE_HTTP_HOST")
    edge.add_argument("--http-port", type=int, help="FC_EDGE_HTTP_PORT (default 8010)")
    edge.add_argument("--log-level", help="FC_EDGE_LOG_LEVEL")
    edge.add_argument("--ca-file",
                      help="FC_EDGE_CA_FILE: CA of the brokers' (and, ward side, the devices') certificates")
    edge.add_argument("--cert-file", help="FC_EDGE_CERT_FILE: the gateway's client certificate")
    edge.add_argument("--key-file", help="FC_EDGE_KEY_FILE: its private key")
    edge.add_argument("--local-cert-file", help="FC_EDGE_LOCAL_CERT_FILE: TLS for the embedded ward broker")
    edge.add_argument("--local-key-file", help="FC_EDGE_LOCAL_KEY_FILE")
    edge.add_argument("--signing-key",
                      help="FC_EDGE_SIGNING_KEY: sign unsigned devices' readings with this Ed25519 key")
    edge.add_argument("--signing-kid", help="FC_EDGE_SIGNING_KID")
    edge.add_argument("--upstream-protocol", choices=["auto", "5", "3.1.1"],
                      help="FC_EDGE_UPSTREAM_PROTOCOL: MQTT version upstream "
                           "(default auto: 5 where the broker speaks it)")
    edge.add_argument("--upstream-max-packet-bytes", type=int,
                      help="FC_EDGE_UPSTREAM_MAX_PACKET_BYTES: the upstream's packet limit "
                           "when it does not advertise one")
    edge.add_argument("--status-seconds", type=float, help="FC_EDGE_STATUS_SECONDS: status upstream every N s")
    edge.add_argument("--tls-insecure", action="store_true",
                      help="FC_EDGE_TLS_INSECURE: DEVELOPMENT ONLY, do not verify the brokers' certificates")
    edge.set_defaults(func=cmd_edge)

    token = add("token", "mint a JWT (HS256) for a role and scope")
    token.add_argument("--role", required=True, choices=["admin", "clinician", "patient", "service"])
    token.add_argument("--sub", help="subject (user id); defaults to the role")
    token.add_argument("--hospital", action="append", default=[], help="hospital a clinician may see (repeat)")
    token.add_argument("--patient", action="append", default=[], help="patient a patient token may see (repeat)")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    token.add_argument("--secret", help="HS256 secret (default FC_JWT_SECRET, else the one `up` created)")
    token.add_argument("--store-url", help="locates the secret `up` created (FC_STORE_URL)")
    token.set_defaults(func=cmd_token)

    audit = add("audit", "the audit trail: verify its hash chain")
    audit.add_argument("action", choices=["verify"], help="verify: detect edited, deleted or reordered records")
    audit.add_argument("--store-url", help="FC_STORE_URL: the trail is <store file>-audit.db unless --audit-url")
    audit.add_argument("--audit-url", help="FC_AUDIT_URL: sqlite:///path of the audit trail")
    audit.add_argument("--anchor", action="append", default=[], metavar="SEQ:HASH",
                       help="a head printed earlier (repeat): proves the trail was not rewritten since")
    audit.set_defaults(func=cmd_audit)

    add("simulate", "simulated devices publishing over MQTT (see `firstcare simulate --help`)")
    add("certs", "certificates and signing keys for TLS and signed readings (see `firstcare certs --help`)")
    add("bench", "benchmarks side by side with the limits and the peers (see `firstcare bench --help`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "simulate":
        return cmd_simulate(argv[1:])
    if argv[:2] == ["edge", "quarantine"]:
        from edge.quarantine_cli import main as quarantine_main

        return quarantine_main(argv[2:])
    if argv and argv[0] == "certs":
        from firstcare.certs_cli import main as certs_main

        return certs_main(argv[1:])
    if argv and argv[0] == "bench":
        from bench.cli import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        command: Callable[[argparse.Namespace], int] = args.func
        return command(args)
    except FirstCareError as exc:
        print(f"firstcare {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
