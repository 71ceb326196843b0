"""Load generator: simulated devices publishing QoS 1 vitals over MQTT (paho, like firmware).

Runs as its own process (``python -m bench.loadgen ...``) so it never shares a GIL with what it
measures, and prints one JSON summary line on stdout when done::

    python -m bench.loadgen --port 1883 --devices 50 --count 20000          # full speed, fixed count
    python -m bench.loadgen --port 1883 --devices 500 --rate 1000 --duration 10
    python -m bench.loadgen --port 1883 --devices 20 --batch 50 --count 2000  # gateway batches

Every reading carries ``ts`` = the wall clock when it was published (ISO-8601, milliseconds, as
the contract spells it), so a client on the same machine measures publish-to-receive latency
from the message alone. Device ``i`` is ``monitor/{prefix}{i}`` for patient ``p{i % patients}``
in hospital ``h{(i % patients) // per_hospital}``; each device's ``seq`` starts at 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from datetime import UTC, datetime

import paho.mqtt.client as mqtt

_ts_cache: list = [0, ""]


def iso_now() -> str:
    ms = int(time.time() * 1000)
    if _ts_cache[0] != ms:
        _ts_cache[0] = ms
        _ts_cache[1] = datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.") + \
            f"{ms % 1000:03d}Z"
    return _ts_cache[1]


def patient_id(i: int) -> str:
    return f"p{i:04d}"


def hospital_of(patient_index: int, per_hospital: int) -> str:
    return f"h{patient_index // per_hospital + 1}"


def reading(seq: int, ts: str, pid: str) -> str:
    hr = 60 + seq % 30
    return (f'{{"seq":{seq},"ts":"{ts}","patient_id":"{pid}","metrics":{{"heart_rate":{hr},"spo2":{95 + seq % 4},'
            f'"respiratory_rate":{12 + seq % 6}}}}}')


class Devices:
    def __init__(self, devices: int, patients: int, per_hospital: int, prefix: str, batch: int,
                 root: str = "fc") -> None:
        self.batch = batch
        self.topics = []
        self.pids = []
        for i in range(devices):
            p = i % patients
            self.topics.append(f"{root}/v1/{hospital_of(p, per_hospital)}/monitor/{prefix}{i}/vitals")
            self.pids.append(patient_id(p))
        self.seq = [0] * devices
        self.next = 0

    def message(self) -> tuple[str, str]:
        i = self.next
        self.next = (i + 1) % len(self.topics)
        ts = iso_now()
        pid = self.pids[i]
        if self.batch <= 1:
            self.seq[i] += 1
            return self.topics[i], reading(self.seq[i], ts, pid)
        start = self.seq[i]
        self.seq[i] += self.batch
        items = ",".join(reading(start + k + 1, ts, pid) for k in range(self.batch))
        return self.topics[i], '{"readings":[' + items + "]}"


class Publisher:
    """``connections`` paho clients; messages are spread over them round robin."""

    def __init__(self, host: str, port: int, connections: int, qos: int, client_prefix: str) -> None:
        self.qos = qos
        self.acked = 0
        self.lock = threading.Lock()
        self.clients = []
        for c in range(connections):
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{client_prefix}-{c}",
                                 protocol=mqtt.MQTTv311, clean_session=True)
            client.max_inflight_messages_set(1000)
            client.max_queued_messages_set(0)
            client.on_publish = self._on_publish
            client.connect(host, port, keepalive=60)
            client.loop_start()
            self.clients.append(client)
        deadline = time.monotonic() + 15
        while not all(c.is_connected() for c in self.clients):
            if time.monotonic() > deadline:
                raise SystemExit("loadgen: could not connect to the broker")
            time.sleep(0.01)
        self.n = 0

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, rc: object, props: object) -> None:
        with self.lock:
            self.acked += 1

    def publish(self, topic: str, payload: str) -> None:
        client = self.clients[self.n % len(self.clients)]
        self.n += 1
        client.publish(topic, payload, qos=self.qos)

    def wait_acked(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.acked < n:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self) -> None:
        for client in self.clients:
            client.disconnect()
            client.loop_stop()


def run(args: argparse.Namespace) -> dict:
    devices = Devices(args.devices, args.patients or args.devices, args.per_hospital or 10**9, args.prefix,
                      args.batch, args.root)
    pub = Publisher(args.host, args.port, args.connections, args.qos, f"{args.prefix}lg")
    if args.start_at:
        delay = args.start_at - time.time()
        if delay > 0:
            time.sleep(delay)
    t0 = time.time()
    sent = 0
    if args.rate:
        total = int(args.rate * args.duration)
        start = time.monotonic()
        while sent < total:
            due = min(total, int((time.monotonic() - start) * args.rate) + 1)
            while sent < due:
                pub.publish(*devices.message())
                sent += 1
            time.sleep(0.0005)
    else:
        for _ in range(args.count):
            pub.publish(*devices.message())
            sent += 1
    t_sent = time.time()
    ok = pub.wait_acked(sent, args.ack_timeout)
    t_acked = time.time()
    pub.close()
    return {"published": sent, "readings": sent * max(1, args.batch), "acked": pub.acked, "all_acked": ok,
            "t0": t0, "t_sent": t_sent, "t_acked": t_acked,
            "publish_rate": sent / max(1e-9, t_sent - t0)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--devices", type=int, default=50)
    p.add_argument("--patients", type=int, default=0, help="distinct patients (default: one per device)")
    p.add_argument("--per-hospital", type=int, default=0, help="patients per hospital (default: all in h1)")
    p.add_argument("--prefix", default="bench-", help="device id prefix (fresh ids per phase: seq starts at 1)")
    p.add_argument("--root", default="fc")
    p.add_argument("--batch", type=int, default=1, help="readings per message (gateway batches when > 1)")
    p.add_argument("--qos", type=int, default=1, choices=[0, 1])
    p.add_argument("--connections", type=int, default=4, help="MQTT connections to spread the devices over")
    p.add_argument("--count", type=int, default=1000, help="messages to publish at full speed")
    p.add_argument("--rate", type=float, default=0.0, help="messages per second (fixed rate) instead of --count")
    p.add_argument("--duration", type=float, default=5.0, help="seconds, with --rate")
    p.add_argument("--start-at", type=float, default=0.0, help="wall-clock time to start publishing")
    p.add_argument("--ack-timeout", type=float, default=120.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
