"""The proxy's error hierarchy. Messages never carry raw frames or card data."""

from __future__ import annotations


class ProxyError(Exception):
    """Base of every error the proxy raises on purpose."""


class ConfigError(ProxyError):
    """A configuration file is unusable; `problems` lists every problem by key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"{len(problems)} configuration problem(s)")
        self.problems = problems

    def __str__(self) -> str:
        return "\n".join(self.problems)


class MissingKeyField(ProxyError):
    """A request lacks a field of the match key, so its answer could never be matched."""

    def __init__(self, field: str) -> None:
        super().__init__(f"request has no field {field}")
        self.field = field


class KeyInFlight(ProxyError):
    """A request with the same match key is already waiting for its answer."""


class UpstreamError(ProxyError):
    """A request could not be completed by a switch (`switch`, when one was involved)."""

    def __init__(self, message: str, *, switch: str | None = None) -> None:
        super().__init__(message)
        self.switch = switch


class NotWritten(UpstreamError):
    """No byte of the request reached the link: it is safe to try another link."""


class NoLinkAvailable(UpstreamError):
    """No link is up (or every up link refused the write)."""


class LinkLost(UpstreamError):
    """The link failed after the request was written: the outcome is unknown."""


class UpstreamTimeout(UpstreamError):
    """The switch did not answer before the deadline."""


class UnencodableMessage(UpstreamError):
    """The request cannot be encoded with the chosen switch's spec."""
