"""The runtime endpoint's certificate, replaced without a restart (`SIGHUP`).

Certificates are rotated (ACME, cert-manager) far more often than a gateway holding thousands of
sessions should restart. The listener keeps the context it started with; the server-name callback
that OpenSSL calls in every handshake, with or without SNI, moves the new connection onto the
newest context that loaded cleanly. A reload builds a whole new context, so a key that does not
match, a file caught half-written or a missing one leaves the served certificate as it was, and
connections already open keep theirs either way.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509


class TlsError(Exception):
    """The certificate or key cannot be loaded (the message names the files, never their text)."""


class _KeyIsEncrypted(Exception):
    pass


def _refuse_passphrase() -> bytes:
    # Without a password callback OpenSSL asks for the passphrase on the terminal, which blocks
    # the event loop (a SIGHUP reload hung the whole gateway, SIGTERM included); raising makes
    # load_cert_chain fail at once with this exception instead.
    raise _KeyIsEncrypted


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context holding this certificate chain and key, or TlsError saying why not."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key, password=_refuse_passphrase)
    except _KeyIsEncrypted:
        raise TlsError(
            f"cannot use certificate {cert} with key {key}: the key is encrypted"
            " (passphrase-protected) and the gateway takes no passphrase; give it an"
            " unencrypted key (e.g. openssl pkey -in KEY -out PLAIN_KEY)"
        ) from None
    except ssl.SSLError as problem:
        # OpenSSL's reason (KEY_VALUES_MISMATCH) says what is wrong, never what the files hold;
        # unparsable PEM comes without one.
        reason = problem.reason or "not a PEM certificate chain and its private key"
        raise TlsError(f"cannot use certificate {cert} with key {key}: {reason}") from None
    except OSError as problem:
        raise TlsError(f"cannot read certificate {cert} or key {key}: {problem.strerror}") from None
    return context


def expires_at(cert: Path, chain: bytes | None = None) -> float:
    """When the chain's first (leaf) certificate expires, as a Unix time (for the metric).

    `chain` is the file's text when the caller has read it already (so both describe one file).
    """
    try:
        leaf = x509.load_pem_x509_certificates(cert.read_bytes() if chain is None else chain)[0]
    except (OSError, ValueError) as problem:
        raise TlsError(f"cannot read the expiry of certificate {cert}: {problem}") from None
    return leaf.not_valid_after_utc.timestamp()


LOAD_ATTEMPTS = 3


def load(cert: Path, key: Path) -> tuple[ssl.SSLContext, float]:
    """A server context and its certificate's expiry, both from the same text of `cert`.

    OpenSSL reads the files by name, and a rotation may replace them between that read and ours:
    the expiry reported (and alerted on) would then be another certificate's. Reading the chain
    before and after the context is built, and trying again if it changed, rules that out.
    """
    for _ in range(LOAD_ATTEMPTS):
        before = _read(cert)
        context = server_context(cert, key)
        if _read(cert) == before:
            return context, expires_at(cert, before)
    raise TlsError(
        f"certificate {cert} kept changing while it was loaded; reload once it is written"
    )


def _read(cert: Path) -> bytes:
    try:
        return cert.read_bytes()
    except OSError as problem:
        raise TlsError(f"cannot read certificate {cert}: {problem.strerror}") from None


WARN_BEFORE_S = 14 * 86_400  # ACME renews at 30 days left: 14 means renewal has been failing


def expiry_warning(cert: Path, expiry: float, now: float) -> str | None:
    """What to tell the operator about a certificate close to (or past) its expiry, if anything."""
    left = expiry - now
    if left <= 0:
        return f"certificate {cert} expired {(-left) / 86_400:.1f} days ago: runtimes refuse it"
    if left < WARN_BEFORE_S:
        return f"certificate {cert} expires in {left / 86_400:.1f} days: rotate it (then SIGHUP)"
    return None


class ReloadableTls:
    """The context the runtime listener holds, serving whichever certificate loaded last."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key
        self.listening, self.expires_at = load(cert, key)
        self.listening.sni_callback = self._choose
        self.current = self.listening

    def reload(self) -> float:
        """Serve the files' certificate to new connections; return its expiry (TlsError: kept)."""
        self.current, self.expires_at = load(self.cert, self.key)
        return self.expires_at

    def _choose(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
        listening: ssl.SSLContext,
    ) -> None:
        # Called by OpenSSL inside every handshake; it must not raise, and only swaps contexts.
        current = self.current
        if current is not listening:
            connection.context = current
