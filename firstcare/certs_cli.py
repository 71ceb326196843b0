"""``firstcare certs``: provisioning. A development CA, server certificates, a certificate per
device and gateway (its common name is its broker identity, see :mod:`firstcare.identity`), an
Ed25519 signing key per device or gateway, and the registration of its public half.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

from firstcare.certs import DEFAULT_DIR, LEAF_DAYS, Pki, write_private, write_public
from firstcare.errors import ConfigError, FirstCareError
from firstcare.identity import Identity, device_identity, gateway_identity, parse_identity
from firstcare.signing import b64url, load_private, new_signing_key, private_pem, public_raw
from firstcare.topics import DEVICE_TYPES

EPILOG = f"""\
step by step (development CA; for production use your own CA and keep its key offline):
  firstcare certs init --host broker.example --host bridge.example
  firstcare certs device --hospital h1 --type monitor --id monitor-7
      -> clients/h1.monitor.monitor-7.pem, -key.pem (TLS), .sign-key.pem (Ed25519), .sign.pub
  firstcare certs gateway --hospital h1 --id ward-3 --acl broker-config/acl
  firstcare certs register --bridge-url https://bridge.example:8000 --token $ADMIN_TOKEN
      -> PUT /api/devices/{{type}}/{{id}}/key for every signing key in the directory

The directory (default {DEFAULT_DIR}) is 0700; private keys are 0600 and never leave it (copy a device's
files onto that device only).
"""


def gateway_acl(identity: Identity, root: str = "fc") -> str:
    """Mosquitto ACL lines for a gateway: any device topic of its hospital, its own status."""
    h, g = identity.hospital_id, identity.gateway_id
    return (f"user {identity.name}\n"
            f"topic write {root}/v1/{h}/+/+/vitals\n"
            f"topic write {root}/v1/{h}/+/+/status\n"
            f"topic readwrite {root}/edge/{h}/{g}/status\n")


def bridge_acl(identity: Identity, root: str = "fc") -> str:
    return f"user {identity.name}\ntopic read {root}/#\n"


def _signing_pair(pki: Pki, identity: str) -> str:
    key = new_signing_key()
    write_private(pki.signing_key(identity), private_pem(key))
    public = b64url(public_raw(key))
    write_public(pki.signing_pub(identity), (public + "\n").encode())
    return public


def _print_pair(pki: Pki, identity: str) -> None:
    pair = pki.bridge if identity == "bridge" else pki.client(identity)
    print(f"  certificate  {pair.cert}\n  key          {pair.key}  (0600: copy it to its owner only)")


def cmd_init(args: argparse.Namespace) -> int:
    pki = Pki(args.dir)
    if args.exist_ok and pki.has_ca():
        pki.ensure_dev(tuple(args.host))
        print(f"{pki.dir} has a CA already; kept it (and any certificate it had)")
        return 0
    pki.init_ca(args.ca_name, args.ca_days)
    pki.issue_server(tuple(args.host), args.days)
    pki.issue_client("bridge", args.days)
    names = "localhost, 127.0.0.1, ::1" + "".join(", " + h for h in args.host)
    print(f"""CAs and certificates in {pki.dir}:
  ca.pem          the trust bundle: give it to every client (devices, gateways, bridges, browsers for HTTPS)
  site-ca.pem     the CA of servers and devices ({'site-ca-key.pem'}: keep it offline)
  service-ca.pem  the CA of bridges and gateways (service-ca-key.pem: keep it offline); Mosquitto's
                  service listener (8884) trusts only this one, so no device can connect there
  server.pem      brokers (Mosquitto 8883/8884, embedded) and HTTPS; names: {names}
  bridge.pem      the bridge's client certificate (identity "bridge")
next: firstcare certs device --hospital H --type T --id D --dir {pki.dir}""")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    pair = Pki(args.dir).issue_server(tuple(args.host), args.days)
    print(f"server certificate {pair.cert} (key {pair.key}); names: localhost, 127.0.0.1, ::1"
          + "".join(", " + h for h in args.host))
    return 0


def cmd_device(args: argparse.Namespace) -> int:
    pki = Pki(args.dir)
    identity = device_identity(args.hospital, args.type, args.id)
    pki.issue_client(identity, args.days)
    print(f"device {identity} (MQTT identity and client id)")
    _print_pair(pki, identity)
    if not args.no_signing_key:
        public = _signing_pair(pki, identity)
        print(f"  signing key  {pki.signing_key(identity)}  (Ed25519, 0600: stays on the device)\n"
              f"  public key   {public}")
        body = json.dumps({"public_key": public, "hospital_id": args.hospital})
        print(f"register it (admin or service token), or run `firstcare certs register`:\n"
              f"  curl --cacert {pki.ca_file} -X PUT -H \"Authorization: Bearer $TOKEN\" "
              f"-H 'Content-Type: application/json' \\\n    https://BRIDGE:8000/api/devices/{args.type}/{args.id}/key"
              f" -d '{body}'")
    print("Mosquitto needs no new ACL line: `pattern write fc/v1/%u/...` already covers this identity.")
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    pki = Pki(args.dir)
    identity = gateway_identity(args.hospital, args.id)
    if args.exist_ok and pki.client(identity).cert.exists():
        print(f"gateway {identity}: certificate exists, kept")
        return 0
    pki.issue_client(identity, args.days)
    print(f"gateway {identity}")
    _print_pair(pki, identity)
    if args.signing_key:
        public = _signing_pair(pki, identity)
        print(f"  signing key  {pki.signing_key(identity)} (FC_EDGE_SIGNING_KEY)\n  public key   {public}")
    _acl(gateway_acl(parse_identity(identity), args.root), args.acl)
    return 0


def cmd_bridge(args: argparse.Namespace) -> int:
    pki = Pki(args.dir)
    identity = parse_identity(args.name).name
    if parse_identity(identity).kind != "bridge":
        raise ConfigError(f"{identity!r} is not a bridge identity (bridge or bridge-NAME)", "identity_invalid")
    pki.issue_client(identity, args.days)
    print(f"bridge {identity}")
    _print_pair(pki, identity)
    if identity != "bridge":
        _acl(bridge_acl(parse_identity(identity), args.root), args.acl)
    return 0


def _acl(lines: str, path: str | None) -> None:
    if path:
        with open(path, "a") as f:
            f.write("\n" + lines)
        print(f"appended to {path} (reload Mosquitto: kill -HUP):\n{lines}", end="")
    else:
        print(f"add to the Mosquitto ACL (broker-config/acl), then reload it (kill -HUP):\n{lines}", end="")


def register_keys(pki: Pki, bridge_url: str, token: str, cafile: str | None) -> list[tuple[str, int, str]]:
    """PUT every public signing key of the directory to the bridge; (identity, status, body)."""
    context = ssl.create_default_context(cafile=cafile) if bridge_url.startswith("https") else None
    results = []
    for pub in sorted((pki.dir / "clients").glob("*.sign.pub")):
        identity = parse_identity(pub.name[: -len(".sign.pub")].replace(".", "/"))
        if identity.kind == "device":
            path = f"/api/devices/{identity.device_type}/{identity.device_id}/key"
        elif identity.kind == "gateway":
            path = f"/api/gateways/{identity.hospital_id}/{identity.gateway_id}/key"
        else:
            continue
        body = json.dumps({"public_key": pub.read_text().strip(), "hospital_id": identity.hospital_id}).encode()
        request = urllib.request.Request(bridge_url.rstrip("/") + path, body, method="PUT", headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=15, context=context) as response:
                results.append((identity.name, response.status, response.read().decode()))
        except urllib.error.HTTPError as exc:
            results.append((identity.name, exc.code, exc.read().decode()))
    return results


def cmd_register(args: argparse.Namespace) -> int:
    pki = Pki(args.dir)
    try:
        results = register_keys(pki, args.bridge_url, args.token, args.cacert or str(pki.ca_file))
    except (urllib.error.URLError, OSError) as exc:
        raise FirstCareError(f"cannot reach {args.bridge_url}: {getattr(exc, 'reason', exc)}",
                             "bridge_unreachable") from exc
    failed = 0
    for identity, status, body in results:
        print(f"{status}  {identity}" + ("" if status == 200 else f"  {body}"))
        failed += status != 200
    if not results:
        print(f"no *.sign.pub in {pki.dir / 'clients'}")
    return 1 if failed else 0


def ensure_device_credentials(pki: Pki, identity: str, signing: bool) -> tuple[str, str, bytes | None]:
    """For simulators and ``firstcare up --tls``: the device's certificate, key and public
    signing key, issued from the directory's CA when missing (development only)."""
    pair = pki.ensure_client(identity)
    public = None
    if signing:
        if not pki.signing_key(identity).exists():
            _signing_pair(pki, identity)
        public = public_raw(load_private(pki.signing_key(identity).read_bytes()))
    return str(pair.cert), str(pair.key), public


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="firstcare certs", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--dir", default=DEFAULT_DIR, help=f"certificate directory (default {DEFAULT_DIR})")
        return p

    p = add("init", "a development CA, a server certificate and the bridge's client certificate")
    p.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="another DNS name or IP address the server certificate is for (repeat)")
    p.add_argument("--ca-name", default="FirstCare development CA")
    p.add_argument("--ca-days", type=int, default=3650)
    p.add_argument("--days", type=int, default=LEAF_DAYS,
                   help=f"validity of the leaf certificates (default {LEAF_DAYS})")
    p.add_argument("--exist-ok", action="store_true", help="keep a CA that is there already (containers restarting)")
    p.set_defaults(func=cmd_init)

    p = add("server", "(re)issue the server certificate, e.g. for more host names")
    p.add_argument("--host", action="append", default=[], metavar="NAME")
    p.add_argument("--days", type=int, default=LEAF_DAYS)
    p.set_defaults(func=cmd_server)

    p = add("device", "a device's certificate (CN hospital/type/id) and Ed25519 signing key")
    p.add_argument("--hospital", required=True)
    p.add_argument("--type", required=True, choices=sorted(DEVICE_TYPES))
    p.add_argument("--id", required=True)
    p.add_argument("--no-signing-key", action="store_true", help="a device that does not sign its readings")
    p.add_argument("--days", type=int, default=LEAF_DAYS)
    p.set_defaults(func=cmd_device)

    p = add("gateway", "an edge gateway's certificate (CN gateway/hospital/id) and its Mosquitto ACL lines")
    p.add_argument("--hospital", required=True)
    p.add_argument("--id", required=True)
    p.add_argument("--signing-key", action="store_true", help="also an Ed25519 key to sign for unsigned devices")
    p.add_argument("--acl", metavar="FILE", help="append the ACL lines to this file instead of printing them")
    p.add_argument("--root", default="fc", help="topic root (default fc)")
    p.add_argument("--days", type=int, default=LEAF_DAYS)
    p.add_argument("--exist-ok", action="store_true", help="keep the gateway's certificate when it exists")
    p.set_defaults(func=cmd_gateway)

    p = add("bridge", "a bridge's client certificate (bridge, or bridge-NAME for more bridges)")
    p.add_argument("--name", default="bridge")
    p.add_argument("--acl", metavar="FILE")
    p.add_argument("--root", default="fc")
    p.add_argument("--days", type=int, default=LEAF_DAYS)
    p.set_defaults(func=cmd_bridge)

    p = add("register", "register every public signing key of the directory with a bridge")
    p.add_argument("--bridge-url", required=True, metavar="URL", help="e.g. https://bridge.example:8000")
    p.add_argument("--token", required=True, help="an admin or service JWT (firstcare token --role service)")
    p.add_argument("--cacert", help="CA to check the bridge's HTTPS certificate (default DIR/ca.pem)")
    p.set_defaults(func=cmd_register)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        command: Callable[[argparse.Namespace], int] = args.func
        return command(args)
    except FirstCareError as exc:
        print(f"firstcare certs {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
