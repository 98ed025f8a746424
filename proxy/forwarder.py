"""From a terminal's decoded message to the answer it gets."""

from __future__ import annotations

import logging

import trio

from codec import Message
from proxy import decisions
from proxy.errors import ProxyError
from proxy.keys import match_key
from proxy.pool import Pool
from proxy.responses import answer

log = logging.getLogger("iso_proxy.transactions")


class Forwarder:
    """Applies the policy table to one message and returns the answer, if any."""

    def __init__(self, pool: Pool, match_fields: tuple[str, ...]) -> None:
        self._pool = pool
        self._match_fields = match_fields

    async def handle(self, message: Message) -> Message | None:
        decision = decisions.from_terminal(message)
        if decision.action is decisions.Action.DROP:
            log.warning("dropped %s from a terminal: %s", message.mti, decision.reason)
            return None
        if decision.action is decisions.Action.ANSWER and decision.rc is not None:
            return answer(message, decision.rc)
        started = trio.current_time()
        try:
            response = await self._pool.forward(message, match_key(message, self._match_fields))
        except ProxyError as error:
            rc = decisions.failure_rc(error)
            log.info(
                "%s stan=%r tid=%r rc=%s (%s) %.1fms",
                message.mti,
                message.get("11"),
                message.get("41"),
                rc,
                error,
                (trio.current_time() - started) * 1000,
            )
            return answer(message, rc)
        log.info(
            "%s stan=%r tid=%r rc=%r %.1fms",
            message.mti,
            message.get("11"),
            message.get("41"),
            response.get("39"),
            (trio.current_time() - started) * 1000,
        )
        return response
