"""Certificates for tests, made with the product's own ``firstcare.certs``.

``Certs(tmp)`` lays out a directory as ``firstcare certs init`` does (CA, server certificate
for localhost/127.0.0.1, the bridge's client certificate) and issues, on demand:

* ``client(identity)``: a valid client certificate (a device, a gateway, a bridge);
* ``expired(identity)``: one from the right CA whose validity ended yesterday;
* ``foreign(identity)``: one with the right name from another CA;
* ``rogue``: that other CA's directory, with a server certificate for 127.0.0.1 (a broker
  impersonating ours).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from firstcare.certs import Pki, cert_pem, issue, key_pem, write_private, write_public
from firstcare.identity import file_stem
from firstcare.tls import ClientTls

TEST_GATEWAY = "gateway/h1/gw-test"


def gateway_acl_lines(identity: str = TEST_GATEWAY, root: str = "fc") -> list[str]:
    from firstcare.certs_cli import gateway_acl
    from firstcare.identity import parse_identity

    return gateway_acl(parse_identity(identity), root).splitlines()


class Certs:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.pki = Pki(self.root / "main")
        self.pki.ensure_dev()
        self.rogue = Pki(self.root / "rogue")
        self.rogue.ensure_dev()

    @property
    def dir(self) -> Path:
        return self.pki.dir

    @property
    def ca_file(self) -> str:
        return str(self.pki.ca_file)

    def client(self, identity: str) -> ClientTls:
        pair = self.pki.ensure_client(identity)
        return ClientTls(self.ca_file, str(pair.cert), str(pair.key))

    def server_only(self) -> ClientTls:
        """Trusts our CA, presents no certificate."""
        return ClientTls(self.ca_file)

    def expired(self, identity: str) -> ClientTls:
        ca_cert, ca_key = self.pki.load_ca()
        start = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
        cert, key = issue(ca_cert, ca_key, identity, client=True, days=29, not_before=start)
        return self._write(self.root / "expired", identity, cert_pem(cert), key_pem(key))

    def foreign(self, identity: str) -> ClientTls:
        pair = self.rogue.ensure_client(identity)
        return ClientTls(self.ca_file, str(pair.cert), str(pair.key))

    def _write(self, directory: Path, identity: str, cert: bytes, key: bytes) -> ClientTls:
        stem = file_stem(identity)
        write_public(directory / f"{stem}.pem", cert)
        write_private(directory / f"{stem}-key.pem", key)
        return ClientTls(self.ca_file, str(directory / f"{stem}.pem"), str(directory / f"{stem}-key.pem"))
