"""One WebSocket connection, from handshake to close, for every adapter.

An adapter owns the socket; this module owns the rules. For each handshake
the adapter builds a :class:`~pmhub.auth.Request` and calls :func:`admit`,
which checks the ``Origin``, authenticates and answers with the identity or
raises :class:`~pmhub.errors.Rejected` carrying the HTTP status to refuse
with. Once it has accepted the WebSocket, the adapter wraps it in a
:class:`Transport` and calls :func:`run`, which registers the connection
with the hub, reads frames into it and has what it queues written, until
either side closes. The close code is the hub's (1000, 1001, 1008, 1009,
1011, 1013).

Writing takes one of two shapes. A transport that can write to its socket
without waiting takes the connection's frames itself when the hub queues
them (:meth:`Transport.attach`, :meth:`~pmhub.connection.Connection.on_ready`):
no task per connection, a fan-out writes each socket in the same turn of the
event loop. Otherwise (ASGI, whose ``send`` must be awaited) a writer task
awaits the frames and sends them.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import Protocol

import anyio

from .auth import Authenticator, Identity, Request, origin_allowed
from .connection import Connection
from .errors import BackendError, Rejected
from .frames import Outgoing
from .hub import Hub
from .protocol import CLOSE_INTERNAL_ERROR, CLOSE_NORMAL

__all__ = ["Transport", "admit", "run"]

logger = logging.getLogger("pmhub")


class Transport(Protocol):
    """An accepted WebSocket, as an adapter exposes it.

    ``receive`` returns ``None`` once the peer has gone; ``send`` and
    ``close`` raise :class:`OSError` when it has.
    """

    def attach(self, connection: Connection) -> bool:
        """Write what ``connection`` queues from now on, without a task (through
        ``connection.on_ready``), and start the closing handshake once it is
        closing; or return False, and :func:`run` sends with :meth:`send`."""
        ...

    async def receive(self) -> tuple[str | bytes, bool] | None:
        """The next message and whether it came in a binary frame. A text
        message may come as ``str`` or as its UTF-8 ``bytes``."""
        ...

    async def send(self, frames: Sequence[Outgoing]) -> None:
        """Send encoded frames, in order, each as a text message (at once if it can)."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Close the WebSocket with ``code`` and ``reason``."""
        ...


async def admit(
    hub: Hub, authenticator: Authenticator, request: Request, allowed_origins: Collection[str]
) -> Identity:
    """Who may open this WebSocket, or raise ``Rejected`` with the status to refuse with.

    Refusals are normal traffic: they are counted (``metrics.error``), not
    logged as errors. A store or hub that is down refuses with 503.
    """
    headers = request.headers
    try:
        if not origin_allowed(headers.get("origin"), headers.get("host"), allowed_origins):
            raise Rejected("forbidden", "this Origin may not connect")
        identity = await authenticator.authenticate(request)
        if not hub.running:
            raise BackendError("the hub is not running")
    except Rejected as exc:
        hub.metrics.error(exc.code)
        raise
    except BackendError as exc:
        logger.warning("refused a WebSocket: %s", exc)
        hub.metrics.error("unavailable")
        raise Rejected("unavailable", "the service is unavailable: try again", status=503) from None
    return identity


async def run(hub: Hub, identity: Identity, transport: Transport) -> None:
    """Serve one accepted WebSocket of ``identity`` until it closes.

    This task reads frames into the hub; the transport writes what the hub
    queues, or a writer task sends it and then the close frame. A failure
    here closes only this connection, with 1011.
    """
    async with hub.connect(identity) as connection:
        if transport.attach(connection):
            try:
                await _read(hub, connection, transport)
                if connection.closing:  # the hub's close: its close frame, then the end
                    await transport.close(
                        connection.close_code or CLOSE_NORMAL, connection.close_reason
                    )
            except OSError:  # the peer went away
                pass
            finally:
                connection.on_ready(None)
            return
        async with anyio.create_task_group() as tg:

            async def write() -> None:
                try:
                    while frames := await connection.next_frames():
                        await transport.send(frames)
                    # The close code is set once next_frames() has ended.
                    await transport.close(
                        connection.close_code or CLOSE_NORMAL, connection.close_reason
                    )
                except OSError:  # the peer went away; the reader sees it too
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(write)
            await _read(hub, connection, transport)
            if not connection.closing:  # else the writer sends the close frame, then ends
                tg.cancel_scope.cancel()


async def _read(hub: Hub, connection: Connection, transport: Transport) -> None:
    """Feed what the peer sends to the hub until it goes (or the socket fails)."""
    try:
        while (message := await transport.receive()) is not None:
            await hub.receive(connection, message[0], binary=message[1])
    except OSError:  # the server lost the socket
        pass
    except Exception:
        logger.exception("WebSocket of %r failed", connection)
        connection.close(CLOSE_INTERNAL_ERROR, "internal error")
