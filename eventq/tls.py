"""Transport security: tokens cross the network between machines only inside TLS.

Promises: ``eventq server`` never listens beyond loopback in clear text unless its operator
says ``--insecure`` (and it says so when it does); the CLI and ``eventq worker`` verify the
server's certificate, against the system's CAs or the one given (``--ca``, ``EVENTQ_CA``),
and a certificate they cannot verify ends them with one clear line, not a retry loop.

Standard library only: the CLI loads it (and ``ssl``) only when it meets a TLS server.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import urllib.parse
from pathlib import Path


class TlsError(Exception):
    """A TLS set-up that cannot work, said in one line."""


def server_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The server's context from ``--tls-cert`` and ``--tls-key``; None without them."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise TlsError("--tls-cert and --tls-key go together: the certificate chain and its "
                       "private key, both PEM files")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except OSError as exc:  # ssl.SSLError is an OSError
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
        raise TlsError(f"cannot use --tls-cert {cert} with --tls-key {key}: {reason} "
                       "(both must be PEM files, the key the certificate's own)") from None
    return context


def client_context(ca: str | None, pinned: bool = False) -> ssl.SSLContext:
    """Verify servers against ``ca`` (a PEM file) if given, else the system's CAs.

    ``pinned``: ``ca`` is the server's own certificate (read from its ``server.json`` on its
    machine), trusted as it is without the CA above it."""
    context = ssl.create_default_context(cafile=ca)
    if pinned:
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def ca_context(ca: str | None) -> ssl.SSLContext | None:
    """The context for ``--ca``/``EVENTQ_CA``, or None for the system's CAs."""
    if not ca:
        return None
    try:
        return client_context(ca)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise TlsError(f"cannot use the CA file {ca}: {reason}") from None


def untrusted(url: str, reason: str) -> str:
    return (f"the server at {url} presented a certificate that cannot be verified "
            f"({reason}): give the CA that signed it with --ca FILE or EVENTQ_CA, and use a "
            "host name the certificate holds")


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None


def is_wildcard(host: str) -> bool:
    """Every interface: ``0.0.0.0``, ``::`` or no host at all."""
    address = _address(host)
    return not host or (address is not None and address.is_unspecified)


def is_loopback(host: str) -> bool:
    """Only this machine can reach ``host``: a loopback address, or a name all of whose
    addresses are loopback."""
    if is_wildcard(host):
        return False
    address = _address(host)
    if address is not None:
        return address.is_loopback
    try:
        found = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addresses = [_address(str(info[4][0])) for info in found]
    return bool(addresses) and all(a is not None and a.is_loopback for a in addresses)


def check_exposure(host: str, tls: bool, insecure: bool) -> None:
    """Refuse to serve plain HTTP beyond loopback unless the operator insists."""
    if tls or insecure or is_loopback(host):
        return
    raise TlsError(f"refusing to listen on {host or 'every interface'} without TLS: tokens "
                   "would cross the network in clear text. Give --tls-cert FILE and --tls-key "
                   "FILE, or --insecure if a TLS proxy in front of it or a private network "
                   "protects it")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def host_name() -> str:
    """This machine's name as others know it (the FQDN when it has one)."""
    name = socket.getfqdn()
    return name if name and "localhost" not in name else socket.gethostname()


def advertised_url(host: str, port: int, scheme: str, given: str | None) -> str | None:
    """The URL workers on other machines use: ``--advertise-url``, else this host's name
    (or the address bound) when listening beyond loopback; None on loopback only."""
    if given:
        parts = urllib.parse.urlsplit(given)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TlsError(f"--advertise-url {given!r} must be http(s)://HOST[:PORT]")
        return given.rstrip("/")
    if is_loopback(host):
        return None
    where = host_name() if is_wildcard(host) else host
    return f"{scheme}://{_url_host(where)}:{port}"


def local_url(host: str, port: int, scheme: str, advertised: str | None) -> str:
    """The URL a client on this machine uses (``server.json``). On every interface: the
    loopback address, or with TLS the advertised host, a name the certificate holds."""
    where = host
    if is_wildcard(host):
        where = "::1" if host == "::" else "127.0.0.1"
        if scheme == "https" and advertised:
            where = urllib.parse.urlsplit(advertised).hostname or where
    return f"{scheme}://{_url_host(where)}:{port}"


def check_trusted(url: str, context: ssl.SSLContext | None, timeout: float = 10.0) -> None:
    """Before a long-running client starts: TlsError if the server's certificate cannot be
    verified. A server that cannot be reached now is not an error (it may come up later)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        return
    context = context or client_context(None)
    try:
        with socket.create_connection((parts.hostname, parts.port or 443), timeout) as sock, \
                context.wrap_socket(sock, server_hostname=parts.hostname):
            return
    except ssl.SSLCertVerificationError as exc:
        raise TlsError(untrusted(url, exc.verify_message or str(exc))) from None
    except OSError:
        return
