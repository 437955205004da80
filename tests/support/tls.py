"""A test certificate authority (`trustme`) and a server certificate it signed, as PEM files.

    certs = make_certificates(tmp_path)                   # for 127.0.0.1, 127.0.0.2, localhost
    with running_server(app, host="127.0.0.2", tls=certs.server) as upstream:   # https://…
        proxy = DurableProxy(..., verify=certs.ca)        # Python clients trust the CA file
        env = {"NODE_EXTRA_CA_CERTS": str(certs.ca)}      # and so does Node

The CA exists only in these files: nothing is installed on the machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .servers import TLS

__all__ = ["HOSTS", "Certificates", "make_certificates"]

HOSTS = ("127.0.0.1", "127.0.0.2", "localhost")
"""What the server certificate is valid for: the loopback addresses the tests serve on."""


@dataclass(frozen=True)
class Certificates:
    ca: Path
    """The CA certificate (PEM): what clients trust."""
    server: TLS
    """The server's certificate chain and key, for `running_server(tls=)`."""


def make_certificates(directory: Path, hosts: tuple[str, ...] = HOSTS) -> Certificates:
    """A fresh CA and a server certificate for `hosts` (IP addresses become IP SANs), written
    to `directory` as ``ca.pem``, ``server.pem`` (the chain) and ``server.key``."""
    import trustme  # the test extra; imported here so that tests without TLS don't need it

    ca = trustme.CA()
    issued = ca.issue_cert(*hosts)
    ca_file, chain, key = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca.cert_pem.write_to_path(str(ca_file))
    issued.private_key_pem.write_to_path(str(key))
    chain.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    return Certificates(ca_file, TLS(str(chain), str(key)))
