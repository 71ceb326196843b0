"""Drive a fleet of simulated devices: ``firstcare simulate`` and ``firstcare up --simulate N``.

One scheduler thread ticks every device at its rate (staggered, so a thousand devices at 1 Hz
do not publish in one burst), each device talks to the broker on its own paho thread, and a
stop event ends the run from anywhere: Ctrl-C in the CLI, the ``up`` command's shutdown, a test.

Patients are ``p-001``, ``p-002``...; each gets one device per type, ``monitor-001`` and so on,
all sharing that patient's physiology, so a monitor and an oximeter agree on the heart rate.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import heapq
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TextIO

from firstcare.errors import BrokerError, ConfigError
from firstcare.tls import ClientTls, warn_if_insecure
from firstcare.topics import DEFAULT_ROOT, DEVICE_TYPES, check_root, is_valid_id
from simulators.devices import FAULTS, DeviceSpec, SimulatedDevice, parse_endpoint
from simulators.physiology import DEVICE_METRICS, SCENARIOS, Patient

SCENARIO_NAMES: tuple[str, ...] = (*SCENARIOS, *FAULTS)
"""Clinical scenarios move a patient's physiology; faults make the patient's devices misbehave."""
DEFAULT_MQTT_URL = "mqtt://127.0.0.1:1884"
MQTT_URL_ENV = "FC_SIMULATE_MQTT_URL"
CONNECT_TIMEOUT_SECONDS = 10.0
DRAIN_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class SimulationConfig:
    """What to simulate. ``scenario`` is one name for every patient or a mapping
    ``{patient_id: name}`` (others stay stable); ``mix`` deals :data:`SCENARIO_NAMES` out to
    the patients in turn. The run ends after ``duration`` seconds, after ``count`` readings
    per device, or when stopped, whichever comes first."""

    mqtt_url: str = DEFAULT_MQTT_URL
    hospital_id: str = "h1"
    patients: int = 1
    devices: tuple[str, ...] = ("monitor",)
    rate: float = 1.0
    seed: int = 0
    scenario: str | Mapping[str, str] = "stable"
    mix: bool = False
    duration: float | None = None
    count: int | None = None
    root: str = DEFAULT_ROOT
    patient_prefix: str = "p-"
    device_prefix: str = ""
    ramp_seconds: float = 30.0
    fault_after: float = 10.0
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    certs_dir: str | None = None
    sign: bool = False
    tls_insecure: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))
        endpoint = parse_endpoint(self.mqtt_url)
        tls_options = {"ca_file": self.ca_file, "cert_file": self.cert_file, "key_file": self.key_file,
                       "certs_dir": self.certs_dir, "tls_insecure": self.tls_insecure or None}
        for key, value in tls_options.items():
            _require(value is None or endpoint.tls is not None, key, value, "only with an mqtts:// URL")
        _require((self.cert_file is None) == (self.key_file is None), "cert_file", self.cert_file,
                 "a certificate and its key (--cert-file with --key-file)")
        _require(not (self.certs_dir and self.cert_file), "certs_dir", self.certs_dir,
                 "either --certs (a certificate per device) or --cert-file (one for all)")
        _require(not self.sign or self.certs_dir is not None, "sign", self.sign,
                 "--certs DIR as well (each device's signing key lives there)")
        check_root(self.root)
        _require(self.patients >= 1, "patients", self.patients, "at least 1")
        _require(bool(self.devices), "devices", self.devices, "at least one device type")
        for device_type in self.devices:
            _require(
                device_type in DEVICE_TYPES and device_type in DEVICE_METRICS, "devices", device_type,
                f"one of {', '.join(sorted(DEVICE_TYPES))}",
            )
        _require(len(set(self.devices)) == len(self.devices), "devices", self.devices, "each type once")
        _require(math.isfinite(self.rate) and self.rate > 0, "rate", self.rate, "a positive number of Hz")
        _require(self.duration is None or self.duration > 0, "duration", self.duration, "positive seconds")
        _require(self.count is None or self.count >= 1, "count", self.count, "at least 1")
        _require(self.ramp_seconds >= 0, "ramp_seconds", self.ramp_seconds, "0 or more seconds")
        _require(self.fault_after > 0, "fault_after", self.fault_after, "positive seconds")
        _require(is_valid_id(self.hospital_id), "hospital_id", self.hospital_id, "[A-Za-z0-9_-]{1,64}")
        ids = [("patient_prefix", self.patient_id(self.patients))]
        ids += [("device_prefix", self.device_id(t, self.patients)) for t in self.devices]
        for key, value in ids:
            _require(is_valid_id(value), key, value, "ids that match [A-Za-z0-9_-]{1,64}")
        if isinstance(self.scenario, str):
            _require(self.scenario in SCENARIO_NAMES, "scenario", self.scenario, f"one of {', '.join(SCENARIO_NAMES)}")
        else:
            known = {self.patient_id(n) for n in range(1, self.patients + 1)}
            for patient_id, name in self.scenario.items():
                _require(patient_id in known, "scenario", patient_id, f"a simulated patient ({self.patient_id(1)}..)")
                _require(name in SCENARIO_NAMES, "scenario", name, f"one of {', '.join(SCENARIO_NAMES)}")
        _require(not (self.mix and self.scenario != "stable"), "mix", self.mix, "not combined with a scenario")

    def patient_id(self, number: int) -> str:
        return f"{self.patient_prefix}{number:03d}"

    def device_id(self, device_type: str, number: int) -> str:
        return f"{self.device_prefix}{device_type}-{number:03d}"

    def bindings(self) -> list[tuple[str, str, str]]:
        """``(device_type, device_id, patient_id)`` of every simulated device: what ward staff
        would bind (``PUT /api/devices/{type}/{id}/binding``) so a patient keeps their devices,
        and their place on the dashboard, while a device is offline."""
        return [(t, self.device_id(t, n), self.patient_id(n))
                for n in range(1, self.patients + 1) for t in self.devices]

    def scenario_for(self, number: int) -> str:
        """The scenario of patient ``number`` (1-based)."""
        if self.mix:
            return SCENARIO_NAMES[(number - 1) % len(SCENARIO_NAMES)]
        if isinstance(self.scenario, str):
            return self.scenario
        return self.scenario.get(self.patient_id(number), "stable")


def _require(ok: bool, key: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} is invalid, expected {expected}", "simulation_config_invalid")


@dataclass(frozen=True, slots=True)
class SimulationSummary:
    """Counts over vitals messages (status messages excluded); ``published`` includes the
    duplicates and malformed messages that faults send on purpose."""

    published: int = 0
    acknowledged: int = 0
    errors: int = 0
    duplicates_sent: int = 0
    malformed_sent: int = 0
    devices: int = 0
    connected: int = 0
    elapsed: float = 0.0

    def __str__(self) -> str:
        return (
            f"devices {self.devices} ({self.connected} connected), published {self.published}, "
            f"acknowledged {self.acknowledged}, errors {self.errors}, duplicates {self.duplicates_sent}, "
            f"malformed {self.malformed_sent}, {self.elapsed:.1f} s"
        )


Progress = Callable[[SimulationSummary], None]


def device_identities(config: SimulationConfig) -> list[tuple[str, str, str]]:
    """(hospital, device type, device id) of every simulated device."""
    return [(config.hospital_id, t, config.device_id(t, n)) for n in range(1, config.patients + 1)
            for t in config.devices]


def _credentials(config: SimulationConfig, spec: DeviceSpec) -> tuple[ClientTls | None, object]:
    """The device's TLS settings and signing key: from ``certs_dir`` (issued there from its CA
    when missing, for development), else the one client certificate for all."""
    if config.certs_dir is None:
        return ClientTls(config.ca_file, config.cert_file, config.key_file, config.tls_insecure), None
    from firstcare.certs import Pki
    from firstcare.certs_cli import ensure_device_credentials
    from firstcare.identity import device_identity
    from firstcare.signing import load_private

    pki = Pki(config.certs_dir)
    identity = device_identity(spec.hospital_id, spec.device_type, spec.device_id)
    pair = pki.client(identity)
    if not (pair.cert.exists() or pki.has_ca()):
        raise ConfigError(f"no certificate for {identity} in {pki.dir} and no CA key there to issue one "
                          f"(firstcare certs device ...)", "certificate_missing")
    cert, key, _ = ensure_device_credentials(pki, identity, config.sign)
    tls = ClientTls(config.ca_file or str(pki.ca_file), cert, key, config.tls_insecure)
    signing_key = load_private(pki.signing_key(identity).read_bytes()) if config.sign else None
    return tls, signing_key


def build_fleet(config: SimulationConfig) -> list[SimulatedDevice]:
    """One device per patient and type; devices of a patient share its :class:`Patient`."""
    endpoint = parse_endpoint(config.mqtt_url)
    if endpoint.tls is not None:
        warn_if_insecure(config.tls_insecure, "the simulated devices", "--tls-insecure")
    fleet = []
    for number in range(1, config.patients + 1):
        patient_id = config.patient_id(number)
        scenario = config.scenario_for(number)
        fault = scenario if scenario in FAULTS else None
        patient = Patient(f"{config.seed}:{patient_id}", "stable" if fault else scenario, config.ramp_seconds)
        for device_type in config.devices:
            spec = DeviceSpec(
                config.hospital_id, device_type, config.device_id(device_type, number), patient_id,
                config.root, fault, config.fault_after, config.seed,
            )
            if endpoint.tls is None:
                fleet.append(SimulatedDevice(spec, endpoint, patient))
                continue
            tls, signing_key = _credentials(config, spec)
            fleet.append(SimulatedDevice(spec, dataclasses.replace(endpoint, tls=tls), patient,
                                         signing_key))  # type: ignore[arg-type]
    return fleet


def summarize(fleet: Sequence[SimulatedDevice], elapsed: float) -> SimulationSummary:
    stats = [device.stats() for device in fleet]
    totals = {
        f.name: sum(getattr(s, f.name) for s in stats)
        for f in fields(SimulationSummary) if f.name not in ("devices", "connected", "elapsed")
    }
    return SimulationSummary(**totals, devices=len(fleet), connected=sum(s.connected for s in stats), elapsed=elapsed)


def run_simulation(
    config: SimulationConfig, progress: Progress | None = None, stop_event: threading.Event | None = None
) -> SimulationSummary:
    """Run until ``duration``, ``count`` or ``stop_event``; report to ``progress`` every second.

    Raises :class:`BrokerError` when the broker cannot be reached or refuses a device; every
    device is shut down before this returns or raises.
    """
    stop = stop_event or threading.Event()
    fleet = build_fleet(config)
    connected = False
    try:
        _connect(fleet, stop)
        connected = True
        started = time.monotonic()
        _schedule(fleet, config, stop, started, progress)
        _wait_acknowledged(fleet, DRAIN_SECONDS)
        return summarize(fleet, time.monotonic() - started)
    finally:
        _shut_down(fleet, goodbye=connected)


def _connect(fleet: Sequence[SimulatedDevice], stop: threading.Event) -> None:
    for device in fleet:
        if stop.is_set():
            return
        device.connect()
    deadline = time.monotonic() + CONNECT_TIMEOUT_SECONDS
    for device in fleet:
        while not device.wait_connected(0.05):
            if device.refused:
                raise BrokerError(
                    f"{device.endpoint} refused device {device.spec.device_id}: {device.refused}", "broker_refused"
                )
            if stop.is_set():
                return
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"{device.endpoint} did not answer device {device.spec.device_id}'s CONNECT "
                    f"within {CONNECT_TIMEOUT_SECONDS:g} s",
                    "broker_timeout",
                )


def _schedule(
    fleet: Sequence[SimulatedDevice], config: SimulationConfig, stop: threading.Event, started: float,
    progress: Progress | None,
) -> None:
    period = 1.0 / config.rate
    queue = [(started + period * i / len(fleet), i) for i in range(len(fleet))]
    ticks = [0] * len(fleet)
    deadline = started + config.duration if config.duration is not None else math.inf
    next_report = started + 1.0 if progress else math.inf
    while queue and not stop.is_set():
        now = time.monotonic()
        if now >= deadline:
            return
        if now >= next_report:
            progress(summarize(fleet, now - started))  # type: ignore[misc]
            next_report = max(next_report + 1.0, now)
        due, i = queue[0]
        if due > now:
            stop.wait(min(due, next_report, deadline) - now)
            continue
        fleet[i].tick(now - started)
        ticks[i] += 1
        if config.count is not None and ticks[i] >= config.count:
            heapq.heappop(queue)
        else:
            heapq.heapreplace(queue, (max(due + period, now - period), i))


def _wait_acknowledged(fleet: Sequence[SimulatedDevice], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(s.dead or not s.unacknowledged for s in (d.stats() for d in fleet)):
            return
        time.sleep(0.02)


def _shut_down(fleet: Sequence[SimulatedDevice], goodbye: bool) -> None:
    """Say goodbye, then disconnect everyone before joining anyone: paho's network thread
    notices a stop request only once a second, so joining one by one would take N seconds."""
    if goodbye:
        for device in fleet:
            device.say_goodbye()
        _wait_acknowledged(fleet, 2.0)
    for device in fleet:
        device.disconnect()
    for device in fleet:
        device.join()


class _ProgressLine:
    """Progress on stderr: rewritten in place on a terminal, one line a second otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._written = False

    def __call__(self, s: SimulationSummary) -> None:
        text = f"{s.elapsed:5.0f} s  published {s.published}  acknowledged {s.acknowledged}  errors {s.errors}"
        self._stream.write(f"\r{text}\033[K" if self._tty else f"{text}\n")
        self._stream.flush()
        self._written = True

    def close(self) -> None:
        if self._tty and self._written:
            self._stream.write("\n")


@contextlib.contextmanager
def _stop_on_interrupt(stop: threading.Event) -> Iterator[None]:
    """The first Ctrl-C asks for a clean stop (summary included); a second one interrupts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT) or signal.default_int_handler

    def request_stop(signum: int, frame: object) -> None:
        stop.set()
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


EPILOG = f"""\
scenarios (per patient):
  clinical  {', '.join(SCENARIOS)}
  faults    {', '.join(FAULTS)}
  --scenario NAME applies to every patient; --scenario p-002=sepsis,p-004=flaky to some
  (the others stay stable); --mix deals all of them out to the patients in turn.

examples:
  firstcare simulate --patients 10
  firstcare simulate --patients 3 --devices monitor,oximeter,bp --scenario sepsis --duration 120
  firstcare simulate --patients 8 --mix --rate 2 --mqtt-url mqtt://qa:secret@broker.example:1883
  firstcare simulate --patients 5 --scenario p-002=tachycardia,p-005=malformed --count 100

exit status: 0 done (or stopped with Ctrl-C), 1 the broker could not be reached, 2 bad arguments.
"""


def _positive(kind: type) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return value

    return parse


def _scenario(text: str) -> str | dict[str, str]:
    if "=" not in text:
        return text
    try:
        return dict(item.split("=", 1) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME or PATIENT=NAME,...") from None


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="firstcare simulate",
        description="Simulate patients' devices publishing vitals over MQTT, with clinical scenarios and faults.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    default_url = environ.get(MQTT_URL_ENV, DEFAULT_MQTT_URL)
    add = parser.add_argument
    try:
        shown_url = str(parse_endpoint(default_url))
    except ConfigError:
        shown_url = default_url
    add("--mqtt-url", default=default_url, metavar="URL",
        help=f"broker, mqtt[s]://[user:pass@]host[:port] (env {MQTT_URL_ENV}; default {shown_url})")
    add("--hospital", default="h1", metavar="ID", help="hospital id in the topics (default %(default)s)")
    add("--patients", type=_positive(int), default=1, metavar="N", help="number of patients (default %(default)s)")
    add("--devices", default="monitor", metavar="TYPES",
        help=f"comma list of device types per patient: {', '.join(DEVICE_METRICS)} (default %(default)s)")
    add("--rate", type=_positive(float), default=1.0, metavar="HZ",
        help="readings per second per device (default %(default)s)")
    add("--seed", type=int, default=0, metavar="N", help="same seed, same patients (default %(default)s)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--scenario", type=_scenario, default="stable", metavar="NAME",
                       help="NAME, or PATIENT=NAME,... (default stable)")
    which.add_argument("--mix", action="store_true", help="give the patients every scenario in turn")
    add("--duration", type=_positive(float), metavar="SECONDS", help="stop after this many seconds")
    add("--count", type=_positive(int), metavar="N", help="stop after this many readings per device")
    add("--root", default=DEFAULT_ROOT, metavar="ROOT", help="topic root (default %(default)s)")
    add("--ramp", type=float, default=30.0, metavar="SECONDS",
        help="seconds a clinical scenario takes to set in (default %(default)s)")
    add("--fault-after", type=_positive(float), default=10.0, metavar="SECONDS",
        help="seconds before device-offline drops, and between flaky reconnects (default %(default)s)")
    add("--patient-prefix", default="p-", metavar="PREFIX", help="patient ids are PREFIX001... (default %(default)s)")
    add("--device-prefix", default="", metavar="PREFIX",
        help="prefix for device (client) ids, so two simulators can share a broker")
    add("--ca-file", metavar="PEM", help="mqtts://: CA the broker's certificate must chain to (default: system)")
    add("--cert-file", metavar="PEM", help="mqtts://: one client certificate for every device (QA brokers only)")
    add("--key-file", metavar="PEM", help="the key of --cert-file")
    add("--certs", dest="certs_dir", metavar="DIR",
        help="mqtts://: a certificate per device from DIR/clients (firstcare certs); missing ones are issued "
             "from DIR's CA when its key is there (development)")
    add("--sign", action="store_true", help="sign every reading with the device's Ed25519 key from --certs DIR")
    add("--tls-insecure", action="store_true",
        help="DEVELOPMENT ONLY: do not verify the broker's certificate (logged as a WARNING)")
    add("--quiet", action="store_true", help="no progress on stderr, only the summary")
    return parser


def config_from_args(args: argparse.Namespace) -> SimulationConfig:
    return SimulationConfig(
        mqtt_url=args.mqtt_url, hospital_id=args.hospital, patients=args.patients,
        devices=tuple(t.strip() for t in args.devices.split(",") if t.strip()), rate=args.rate, seed=args.seed,
        scenario=args.scenario, mix=args.mix, duration=args.duration, count=args.count, root=args.root,
        patient_prefix=args.patient_prefix, device_prefix=args.device_prefix, ramp_seconds=args.ramp,
        fault_after=args.fault_after, ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file,
        certs_dir=args.certs_dir, sign=args.sign, tls_insecure=args.tls_insecure,
    )


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """``firstcare simulate``; returns the exit status."""
    parser = build_parser(os.environ if environ is None else environ)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    endpoint = parse_endpoint(config.mqtt_url)
    fleet_size = config.patients * len(config.devices)
    if not args.quiet:
        print(f"{parser.prog}: {fleet_size} devices for {config.patients} patients on {endpoint} "
              "(Ctrl-C to stop)", file=sys.stderr)
    reporter = None if args.quiet else _ProgressLine(sys.stderr)
    stop = threading.Event()
    try:
        with _stop_on_interrupt(stop):
            summary = run_simulation(config, reporter, stop)
    except BrokerError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        if reporter:
            reporter.close()
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
