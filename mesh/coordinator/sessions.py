"""The coordinator's live sessions: one inbox each, fed with what the stages send about it.

A session's frames (Tokens, Acquired, Errors) reach its inbox through ``deliver``; a failure
that is not any one stage's answer (a stage went down, a message could not leave) reaches every
affected inbox through ``fail``, as a ``SessionFailed``. ``next`` is how a request waits for its
session's next frame.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, overload

from mesh.config import COORDINATOR_TIMEOUTS
from mesh.errors import MeshError, StageError, StageUnavailableError
from mesh.transport.messages import Acquired, Error, Token

# The last resort: liveness catches dead stages and links, progress deadlines lost frames on an
# idle chain; this bounds a wait for a frame lost while other sessions keep the chain busy.


@dataclass(frozen=True, slots=True)
class SessionFailed:
    """The session ended here, not at a stage: no stage frame says so."""

    exc: Exception  # a MeshError, or what acting on a delivered Token raised


InboxFrame = Token | Acquired | Error  # what a stage says about one session
Wanted = TypeVar("Wanted", Token, Acquired)


class Inbox:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[InboxFrame | SessionFailed] = asyncio.Queue()
        self.waiting: float | None = None  # since when its request waits on an empty inbox
        # Called with each Token as it is delivered, before it is queued (the request acts on
        # it at once; ``mesh.coordinator.generation``). What it raises ends the session.
        self.on_token: Callable[[Token], None] | None = None


class Sessions:
    def __init__(self) -> None:
        self._live: dict[int, Inbox] = {}

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, session: int) -> bool:
        return session in self._live

    def open(self) -> tuple[int, Inbox]:
        session = int.from_bytes(os.urandom(8), "little") >> 1
        inbox = self._live[session] = Inbox()
        return session, inbox

    def close(self, session: int) -> None:
        self._live.pop(session, None)

    def deliver(self, msg: InboxFrame) -> bool:
        """Hand a stage's frame to its session; False when no such session is live here."""
        inbox = self._live.get(msg.session) if msg.session is not None else None
        if inbox is None:
            return False
        if inbox.on_token is not None and isinstance(msg, Token):
            try:
                inbox.on_token(msg)
            except Exception as exc:  # the request's failure, raised where it waits
                inbox.on_token = None
                inbox.queue.put_nowait(SessionFailed(exc))
                return True
        inbox.queue.put_nowait(msg)
        return True

    def fail(self, sessions: list[int], exc: MeshError) -> None:
        """End these sessions with ``exc`` (a stage went down, or a message could not leave)."""
        for session in sessions:
            inbox = self._live.get(session)
            if inbox is not None:
                inbox.queue.put_nowait(SessionFailed(exc))

    def ids(self) -> list[int]:
        return list(self._live)

    def fail_all(self, exc: MeshError) -> None:
        self.fail(list(self._live), exc)

    def waiting(self) -> dict[int, float]:
        """Sessions whose request waits for a frame, and since when."""
        return {session: inbox.waiting for session, inbox in self._live.items()
                if inbox.waiting is not None}

    @overload
    @staticmethod
    async def next(inbox: Inbox) -> Token: ...

    @overload
    @staticmethod
    async def next(inbox: Inbox, want: type[Wanted]) -> Wanted: ...

    @staticmethod
    async def next(inbox: Inbox, want: type[Wanted] | type[Token] = Token
                   ) -> Wanted | Token:
        """The session's next ``want`` frame (others, e.g. a late Acquired, are skipped)."""
        while True:
            if inbox.queue.empty():
                inbox.waiting = time.monotonic()
            try:
                async with asyncio.timeout(COORDINATOR_TIMEOUTS.token_s):
                    msg = await inbox.queue.get()
            except TimeoutError:
                raise StageUnavailableError(
                    f"no token within {COORDINATOR_TIMEOUTS.token_s:.0f} s from the final "
                    "stage") from None
            finally:
                inbox.waiting = None
            if isinstance(msg, want):
                return msg
            if isinstance(msg, SessionFailed):
                raise msg.exc
            if isinstance(msg, Error):
                raise StageError(msg.code, msg.message, msg.stage)
