"""One throwaway CA per bench run, so the gateway and the echo server pay for the same TLS."""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme
from attrs import frozen


@frozen
class TlsFiles:
    """Where the server certificate chain, its key and the clients' trust anchor were written."""

    cert: Path
    key: Path
    ca: Path

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting only this run's CA (what every load generator uses)."""
        return ssl.create_default_context(cafile=str(self.ca))



def make_tls(directory: Path) -> TlsFiles:
    """Issue a localhost certificate from a fresh CA and write the PEM files into `directory`."""
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    files = TlsFiles(directory / "cert.pem", directory / "key.pem", directory / "ca.pem")
    leaf.private_key_pem.write_to_path(str(files.key))
    with files.cert.open("wb") as chain:
        for blob in leaf.cert_chain_pems:
            chain.write(blob.bytes())
    ca.cert_pem.write_to_path(str(files.ca))
    return files
