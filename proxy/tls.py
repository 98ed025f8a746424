"""TLS contexts for the terminal listener and the switch links, built once at startup.

Certificates and keys are read from files; an encrypted key's passphrase comes from the
environment (`Secrets.tls_key_password`), never from the config. A file that cannot be
used is a `ConfigError` naming the config key, without the passphrase or key material.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from proxy.config import ClientTls, Config, ServerTls
from proxy.errors import ConfigError

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_context(tls: ServerTls, key_password: str | None) -> ssl.SSLContext:
    """The listener's context; with `client_ca`, a client certificate is required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[tls.min_version]
    _load_chain(context, tls.cert, tls.key, key_password, "listen.tls")
    if tls.client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        _load_ca(context, tls.client_ca, "listen.tls.client_ca")
    return context


def client_context(tls: ClientTls, key_password: str | None, where: str) -> ssl.SSLContext:
    """A switch link's context: chain and host name verified, optional client certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies chain and host name
    context.minimum_version = _VERSIONS[tls.min_version]
    if tls.ca is not None:
        _load_ca(context, tls.ca, f"{where}.ca")
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.cert is not None and tls.key is not None:
        _load_chain(context, tls.cert, tls.key, key_password, where)
    return context


def check(config: Config, key_password: str | None) -> None:
    """Build every context the config names once; a `ConfigError` lists each that fails."""
    problems = []
    if config.listen.tls is not None:
        try:
            server_context(config.listen.tls, key_password)
        except ConfigError as error:
            problems += error.problems
    for index, switch in enumerate(config.switches):
        if switch.tls is not None:
            try:
                client_context(switch.tls, key_password, f"switches[{index}].tls")
            except ConfigError as error:
                problems += error.problems
    if problems:
        raise ConfigError(problems)


def cert_names(peer: dict[str, Any] | None) -> frozenset[str]:
    """A verified peer certificate's subject CNs and DNS subject alternative names,
    case-folded (DNS names are case-insensitive; so are profiles' `cert_cn`)."""
    if not peer:
        return frozenset()
    names = {value for rdn in peer.get("subject", ()) for key, value in rdn if key == "commonName"}
    names.update(value for kind, value in peer.get("subjectAltName", ()) if kind == "DNS")
    return frozenset(names)


def _load_chain(
    context: ssl.SSLContext, cert: Path, key: Path, password: str | None, where: str
) -> None:
    try:
        # A callable, so OpenSSL never prompts on a terminal for an encrypted key.
        context.load_cert_chain(cert, key, password=lambda: password or "")
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            [f"{where}: cannot use certificate {cert} with key {key}: {_why(exc)}"]
        ) from None


def _load_ca(context: ssl.SSLContext, ca: Path, where: str) -> None:
    try:
        context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError([f"{where}: cannot use CA file {ca}: {_why(exc)}"]) from None


def _why(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or "not PEM, or the key's passphrase is wrong or missing"
        return str(reason).lower().replace("_", " ")
    if isinstance(exc, OSError):
        return exc.strerror or "unreadable"
    return "the passphrase is too long"
