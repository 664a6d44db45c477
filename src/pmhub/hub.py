"""The hub: every connected device, and what happens to what they send.

The hub owns the registry user → :class:`~pmhub.connection.Connection` of this
process, and carries out the protocol: checks (policy, content, rates),
persistence, fan-out through the broker, presence, typing expiry, read
receipts and ``sync`` replay. It does no network I/O: adapters feed it frames
with :meth:`Hub.receive` and send what each connection's queue yields.

Rules it keeps:

* Persist first, fan out second: a message is published only once stored.
* Every send goes through one :class:`~pmhub.sequencer.Sequencer`: sends are
  committed in batches and published in id order, so through one node each
  connection sees live messages in id order. A WebSocket send does not hold
  its connection's reader while the batch commits; the confirmation (the
  sender's copy of the fan-out) follows the commit.
* Fan-out never awaits a connection: a frame is queued or the connection is
  closed (1013). Bulk replies a connection asks for (``sync``, resends) wait for
  room in its own queue. Background work runs in the hub's task group.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from types import TracebackType
from typing import TypeVar

import anyio
import anyio.abc

from .api import Health
from .auth import Identity
from .broker import Broker, Deliver, Event, InProcessBroker, Presence, Revoke
from .connection import Connection
from .errors import BackendError, Rejected
from .frames import (
    Conversation,
    Error,
    MarkRead,
    Message,
    MessagesRead,
    Outgoing,
    PrivateMessage,
    SendMessage,
    ServerFrame,
    SetTyping,
    Sync,
    SyncComplete,
    System,
    TypingIndicator,
    encode,
)
from .limits import Limits, TokenBucket, TypingTimers
from .metrics import Metrics, NullMetrics
from .policy import PermissionPolicy
from .presence import Roster, presence_frame
from .protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TRY_AGAIN_LATER,
    Close,
    Reply,
)
from .sequencer import Sequencer
from .store import Draft, MessageStore

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["Hub"]

logger = logging.getLogger("pmhub")
T = TypeVar("T")


class Hub:
    """Connects users' devices and carries messages between them.

    Use it as an async context manager (or through an adapter's lifespan)::

        async with Hub(SQLiteStore("chat.db"), StaticPolicy({1, 2})) as hub:
            ...

    ``broker`` defaults to an :class:`~pmhub.broker.InProcessBroker` (one
    process); pass a shared one to fan out across processes. The hub owns the
    store: it closes it when it stops.
    """

    def __init__(
        self,
        store: MessageStore,
        policy: PermissionPolicy,
        *,
        broker: Broker | None = None,
        limits: Limits | None = None,
        metrics: Metrics | None = None,
        welcome: str = "Welcome to the chat!",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.policy = policy
        self.broker: Broker = broker if broker is not None else InProcessBroker()
        self.limits = limits if limits is not None else Limits()
        self.metrics: Metrics = metrics if metrics is not None else NullMetrics()
        self._welcome = Outgoing.of(System(welcome))  # encoded once, shared by every connection
        self._clock = clock
        self._connections: dict[int, dict[str, Connection]] = {}
        self._connection_count = 0
        self._message_buckets: dict[int, TokenBucket] = {}
        self._typing_buckets: dict[int, TokenBucket] = {}
        #: The next ``sync`` page of a connection that is paging through one.
        self._read_ahead: dict[Connection, tuple[int, list[Message]]] = {}
        self._typing = TypingTimers(self.limits.typing_timeout)
        self._typing_changed = anyio.Event()
        self._roster = Roster(self.broker, policy)
        self._sequencer = Sequencer(
            lambda drafts: self._timed("save", self.store.save_many(drafts)),
            self._publish_message,
            max_batch=self.limits.max_batch_size,
        )
        self._idle = anyio.Event()
        self._stack: AsyncExitStack | None = None
        self._running = False

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> Hub:
        if self._stack is not None:
            raise RuntimeError("this Hub is already running: enter it once")
        async with AsyncExitStack() as stack:
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.push_async_callback(self._shutdown, tg)
            await tg.start(self._run_broker)
            await tg.start(self._sequencer.run)
            tg.start_soon(self._expire_typing)
            self._stack = stack.pop_all()
        self._running = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        stack, self._stack = self._stack, None
        if stack is None:
            return None
        try:
            return await stack.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            if exc is not None and group.exceptions == (exc,):
                return None  # the caller's own exception, re-raised as it was
            raise

    async def _shutdown(self, tg: anyio.abc.TaskGroup) -> None:
        await self.close_all()
        with anyio.move_on_after(5):  # commit what was submitted before the store closes
            await self._sequencer.aclose()
        await self.store.aclose()
        tg.cancel_scope.cancel()

    async def close_all(self, *, grace: float = 2.0) -> None:
        """Stop taking work, close every connection with 1001 and wait (up to
        ``grace`` seconds) until their transports let go of them."""
        self._running = False
        for connections in list(self._connections.values()):
            for connection in list(connections.values()):
                connection.close(CLOSE_GOING_AWAY, "server shutting down")
        with anyio.move_on_after(grace):
            while self._connections:
                await self._idle.wait()

    async def _run_broker(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            await self.broker.run(self._deliver, task_status=task_status)
        finally:
            # Without a broker there is no fan-out: refuse work rather than lose it.
            self._running = False

    @property
    def running(self) -> bool:
        """True between start and shutdown while the broker link is up."""
        return self._running

    def _check_running(self) -> None:
        if not self._running:
            raise RuntimeError(
                "the Hub is not running: use `async with hub:` or the adapter's lifespan"
            )

    # -- connections -------------------------------------------------------------

    @asynccontextmanager
    async def connect(self, identity: Identity) -> AsyncIterator[Connection]:
        """Register a device of ``identity`` for as long as the block runs.

        The connection gets the welcome, then the presence snapshot; the user's
        contacts learn they are online if this is their first connection. A
        user over ``Limits.max_connections_per_user`` (across nodes) gets a
        connection that is already closing with 1013.
        """
        self._check_running()
        connection = Connection(identity, self.limits)
        user_id = identity.user_id
        async with self._roster.changing(user_id):
            count = await self.broker.join(user_id)
            try:
                if count > self.limits.max_connections_per_user:
                    connection.close(
                        CLOSE_TRY_AGAIN_LATER,
                        f"too many connections: at most {self.limits.max_connections_per_user}"
                        " per user; close another one",
                    )
                else:
                    # Registered before the snapshot is taken, so a presence change
                    # that happens meanwhile reaches it live (after the snapshot).
                    self._register(connection)
                    contacts = await self._roster.online_contacts(user_id)
                    connection.prepend(
                        [self._welcome, *(presence_frame(other, True) for other in contacts)]
                    )
                    if count == 1:
                        await self._publish_presence(user_id, contacts)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._leave(connection)
                raise
        try:
            yield connection
        finally:
            with anyio.CancelScope(shield=True):
                async with self._roster.changing(user_id):
                    await self._leave(connection)

    def _register(self, connection: Connection) -> None:
        self._connections.setdefault(connection.user_id, {})[connection.id] = connection
        self._connection_count += 1
        self._count_connections()

    async def _leave(self, connection: Connection) -> None:
        self._read_ahead.pop(connection, None)
        user_id = connection.user_id
        connections = self._connections.get(user_id, {})
        if connections.pop(connection.id, None) is not None:
            self._connection_count -= 1
            self._count_connections()
        if not connections:
            self._connections.pop(user_id, None)
            if not self._connections:
                self._idle.set()
                self._idle = anyio.Event()
        if await self.broker.leave(user_id) == 0:
            for recipient in self._typing.stop_user(user_id):
                await self._publish_frame([recipient], TypingIndicator(user_id, recipient, False))
            contacts = await self._roster.online_contacts(user_id)
            await self._publish_presence(user_id, contacts)

    async def _publish_presence(self, user_id: int, viewers: list[int]) -> None:
        if viewers:
            await self.broker.publish(Presence(user_id, viewers))

    def _count_connections(self) -> None:
        self.metrics.connections(self._connection_count)
        self.metrics.users_online(len(self._connections))

    @property
    def connection_count(self) -> int:
        """How many connections this hub holds."""
        return self._connection_count

    def connections(self, user_id: int) -> list[Connection]:
        """The connections ``user_id`` has open on this hub."""
        return list(self._connections.get(user_id, {}).values())

    async def revoke(self, session_id: str) -> None:
        """Close (1008) every connection that session ``session_id`` opened, on every node."""
        await self.broker.publish(Revoke(session_id))

    # -- inbound frames ------------------------------------------------------------

    async def receive(
        self, connection: Connection, data: str | bytes, *, binary: bool = False
    ) -> None:
        """Carry out one WebSocket message ``connection`` sent.

        Bad input is answered with an ``error`` frame or a close decided by the
        protocol; an internal failure closes the connection with 1011. Frames
        from a connection the hub is closing (logged out, too slow) are ignored.
        """
        if connection.closing:
            return
        action = connection.protocol.receive(data, binary=binary)
        try:
            match action:
                case Close(code=code, reason=reason):
                    connection.close(code, reason)
                case Reply(frame=frame):
                    self._reply(connection, frame)
                case SendMessage(recipient_id=recipient, content=content, client_id=client_id):
                    try:
                        admitted = await self._admit(
                            connection.user_id, recipient, content, client_id
                        )
                    except Rejected as exc:
                        self._reply(connection, _error(exc, client_id))
                    else:
                        if isinstance(admitted, Message):
                            await self._answer_resend(connection, admitted)
                        else:  # the reader goes on while the batch commits
                            await self._sequencer.submit_then(
                                admitted, partial(self._stored, connection)
                            )
                case SetTyping(recipient_id=recipient, is_typing=is_typing):
                    await self.set_typing(connection.user_id, recipient, is_typing)
                case MarkRead(peer_id=peer, up_to_id=up_to):
                    await self.mark_read(connection.user_id, peer, up_to, origin=connection)
                case Sync(after_id=after_id):
                    try:
                        await self._sync(connection, after_id)
                    except Rejected as exc:
                        self._reply(connection, _error(exc, None))
        except Exception:
            logger.exception("internal error while handling a frame of %r", connection)
            connection.close(CLOSE_INTERNAL_ERROR, "internal error")

    def _reply(self, connection: Connection, frame: Error) -> None:
        self.metrics.error(frame.code)
        self._push(connection, Outgoing.of(frame))

    def _push(self, connection: Connection, frame: Outgoing, *, replay: bool = False) -> bool:
        was_closing = connection.closing
        if connection.push(frame, replay=replay):
            return True
        if not was_closing and connection.close_code == CLOSE_TRY_AGAIN_LATER:
            self.metrics.slow_consumer()  # this push overflowed the queue
        return False

    # -- operations (shared by WebSocket and HTTP) -------------------------------------

    async def send_message(
        self,
        sender_id: int,
        recipient_id: int,
        content: str,
        client_id: str | None = None,
        *,
        origin: Connection | None = None,
    ) -> tuple[Message, bool]:
        """Check, store and fan out a message; return it and whether it is new.

        A resend of a stored ``(sender_id, client_id)`` returns the stored
        message (to ``origin`` only) without storing or fanning out again.
        Raises :class:`~pmhub.errors.Rejected` (``too_long``, ``forbidden``,
        ``rate_limited``).
        """
        admitted = await self._admit(sender_id, recipient_id, content, client_id)
        if isinstance(admitted, Message):
            message, created = admitted, False
        else:
            message, created = await self._sequencer.submit(admitted)
        if not created and origin is not None:
            await self._answer_resend(origin, message)
        return message, created

    async def _admit(
        self, sender_id: int, recipient_id: int, content: str, client_id: str | None
    ) -> Draft | Message:
        """The draft to store, or the stored message a resend is answered with;
        raises :class:`~pmhub.errors.Rejected`."""
        self._check_running()
        self._take_message_token(sender_id)  # a resend too: answering it costs as much
        try:
            await self._check_message(sender_id, recipient_id, content)
        except Rejected:
            # A resend is answered with what was stored, whatever it carries now:
            # the first write wins. Only refused sends pay for this look-up.
            stored = (
                await self._timed("find", self.store.find(sender_id, client_id))
                if client_id is not None
                else None
            )
            if stored is None:
                raise
            return stored
        return Draft(sender_id, recipient_id, content, client_id)

    async def _answer_resend(self, connection: Connection, message: Message) -> None:
        if await connection.wait_for_room():
            self._replay(connection, message)

    def _replay(self, connection: Connection, message: Message) -> None:
        """Send ``connection`` a stored message as a reply (a resend's answer, a
        ``sync`` page): exempt from the repeat window."""
        self._push(connection, Outgoing.of(PrivateMessage.of(message)), replay=True)

    def _stored(self, connection: Connection, outcome: tuple[Message, bool] | BackendError) -> None:
        """The outcome of a WebSocket send (the new message itself reached
        ``connection`` through the fan-out)."""
        if isinstance(outcome, BackendError):
            logger.error("a message from %r was not stored: %s", connection, outcome)
            connection.close(CLOSE_INTERNAL_ERROR, "internal error: send it again")
        elif not outcome[1]:  # a resend of one stored in the same batch
            self._replay(connection, outcome[0])

    def _take_message_token(self, user_id: int) -> None:
        """Count a request against ``user_id``'s message rate, or raise ``rate_limited``."""
        bucket = self._bucket(
            self._message_buckets, user_id, self.limits.message_rate, self.limits.message_burst
        )
        wait = bucket.take(self._clock())
        if wait:
            retry_after = math.ceil(wait * 1000) / 1000
            raise Rejected(
                "rate_limited",
                f"too many requests: try again in {retry_after:g} s",
                retry_after=retry_after,
            )

    async def _publish_message(self, message: Message) -> None:
        """Fan out a newly stored message (the sequencer calls this in id order)."""
        self.metrics.message_in()
        users = [message.sender_id, message.receiver_id]
        await self.broker.publish(Deliver(users, encode(PrivateMessage.of(message)), message.id))

    async def _check_message(self, sender_id: int, recipient_id: int, content: str) -> None:
        if not content.strip():
            raise Rejected("too_long", "content is empty: send at least one visible character")
        if len(content) > self.limits.max_content_length:
            raise Rejected(
                "too_long",
                f"content is {len(content)} characters; "
                f"the limit is {self.limits.max_content_length}",
            )
        if sender_id == recipient_id:
            raise Rejected("forbidden", "you cannot message yourself")
        if not await self.policy.may_converse(sender_id, recipient_id):
            raise Rejected("forbidden", f"you may not message user {recipient_id}")

    async def set_typing(self, user_id: int, recipient_id: int, is_typing: bool) -> None:
        """Relay a typing indicator; forbidden or over-rate ones are dropped silently."""
        self._check_running()
        bucket = self._bucket(
            self._typing_buckets, user_id, self.limits.typing_rate, self.limits.typing_burst
        )
        if bucket.take(self._clock()) or not await self.policy.may_converse(user_id, recipient_id):
            return
        if is_typing:
            self._typing.start(user_id, recipient_id, self._clock())
            self._typing_changed.set()
        else:
            self._typing.stop(user_id, recipient_id)
        await self._publish_frame([recipient_id], TypingIndicator(user_id, recipient_id, is_typing))

    async def mark_read(
        self, reader_id: int, peer_id: int, up_to_id: int, *, origin: Connection | None = None
    ) -> int:
        """Mark ``peer_id``'s messages to ``reader_id`` read up to ``up_to_id``.

        Tells the author and the reader's other connections; returns how many
        messages changed (0 sends nothing).
        """
        self._check_running()
        receipt = await self._timed("mark_read", self.store.mark_read(reader_id, peer_id, up_to_id))
        if receipt.updated and receipt.up_to_id is not None:
            await self._publish_frame(
                [peer_id, reader_id],
                MessagesRead(reader_id, peer_id, receipt.up_to_id),
                exclude=origin.id if origin is not None else None,
            )
        return receipt.updated

    async def history(
        self, user_id: int, peer_id: int, *, before_id: int | None = None, limit: int = 50
    ) -> tuple[list[Message], bool]:
        """A page of the conversation, oldest first, and whether older messages exist.

        ``limit`` is clamped to 1..``Limits.max_history_page``.
        """
        limit = max(1, min(limit, self.limits.max_history_page))
        page = await self._timed(
            "history", self.store.history(user_id, peer_id, before_id, limit + 1)
        )
        return page[-limit:], len(page) > limit

    async def conversations(self, user_id: int) -> list[Conversation]:
        """Every conversation of ``user_id``, most recent first."""
        return await self._timed("conversations", self.store.conversations(user_id))

    async def health(self) -> Health:
        """Raise :class:`~pmhub.errors.BackendError` unless store and broker answer."""
        if not self._running:
            raise BackendError("the hub is not running")
        try:
            await self.store.ping()
        except Exception as exc:
            raise BackendError(f"store: {exc}") from exc
        try:
            await self.broker.ping()
        except Exception as exc:
            raise BackendError(f"broker: {exc}") from exc
        return Health(self.connection_count, len(self._connections))

    async def _sync(self, connection: Connection, after_id: int) -> None:
        size = self.limits.sync_page_size
        ahead = self._read_ahead.pop(connection, None)
        if ahead is not None and ahead[0] == after_id:
            page = ahead[1]
        else:
            page = await self._since(connection, after_id)
        if page:  # a page costs what one message does; a sync that finds nothing is free
            self._take_message_token(connection.user_id)
        for message in page[:size]:
            if not await connection.wait_for_room():
                return
            self._replay(connection, message)
        last_id = page[min(size, len(page)) - 1].id if page else after_id
        more = len(page) > size
        self._push(connection, Outgoing.of(SyncComplete(last_id, more)))
        if more:
            await self._read_next_page(connection, last_id)

    async def _read_next_page(self, connection: Connection, after_id: int) -> None:
        """Read the page the client will ask for next while this one is on its
        way: the read no longer waits for the round trip (the connection's
        next frame waits for it instead). The page is kept until that request,
        so it stays within half the connection's byte budget; a message marked
        read meanwhile is replayed as it was (its ``messages_read`` arrives live)."""
        if connection.closing:
            return
        try:
            page = await self._since(connection, after_id)
        except BackendError:
            return  # the request reads it again and reports the error
        if sum(len(message.content) for message in page) * 2 <= self.limits.max_queue_bytes:
            self._read_ahead[connection] = (after_id, page)

    async def _since(self, connection: Connection, after_id: int) -> list[Message]:
        limit = self.limits.sync_page_size + 1  # one more tells whether there is more
        return await self._timed("since", self.store.since(connection.user_id, after_id, limit))

    # -- fan-out --------------------------------------------------------------------

    async def _publish_frame(
        self, user_ids: list[int], frame: ServerFrame, *, exclude: str | None = None
    ) -> None:
        await self.broker.publish(Deliver(user_ids, encode(frame), None, exclude))

    async def _deliver(self, event: Event) -> None:
        """Push a broker event to the connections of this hub it concerns."""
        match event:
            case Deliver(user_ids=user_ids, frame=data, message_id=message_id, exclude=exclude):
                self._fan_out(user_ids, Outgoing(data, message_id), exclude)
            case Presence(user_id=subject, viewers=viewers):
                if any(viewer in self._connections for viewer in viewers):
                    online = bool(await self.broker.online([subject]))  # now, not then
                    self._fan_out(viewers, presence_frame(subject, online))
            case Revoke(session_id=session_id):
                for connections in list(self._connections.values()):
                    for connection in connections.values():
                        if connection.identity.session_id == session_id:
                            connection.close(CLOSE_POLICY_VIOLATION, "session logged out")

    def _fan_out(self, user_ids: list[int], frame: Outgoing, exclude: str | None = None) -> None:
        count = 0
        for user_id in dict.fromkeys(user_ids):
            connections = self._connections.get(user_id)
            if connections is None:
                continue
            for connection in connections.values():
                if connection.id != exclude and self._push(connection, frame):
                    count += 1
        if count:
            self.metrics.frames_out(count)

    async def _expire_typing(self) -> None:
        while True:
            deadline = self._typing.next_deadline()
            delay = math.inf if deadline is None else max(0.0, deadline - self._clock())
            with anyio.move_on_after(delay):
                await self._typing_changed.wait()
            self._typing_changed = anyio.Event()
            for user_id, recipient in self._typing.expire(self._clock()):
                await self._publish_frame([recipient], TypingIndicator(user_id, recipient, False))

    # -- helpers ----------------------------------------------------------------------

    def _bucket(
        self, buckets: dict[int, TokenBucket], user_id: int, rate: float, burst: int
    ) -> TokenBucket:
        bucket = buckets.get(user_id)
        if bucket is None:
            now = self._clock()
            if len(buckets) > 10_000:  # forget users whose bucket refilled
                for key in [k for k, b in buckets.items() if b.full(now)]:
                    del buckets[key]
            bucket = buckets[user_id] = TokenBucket(rate, burst, now)
        return bucket

    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        start = time.perf_counter()
        try:
            return await call
        except Exception as exc:
            raise BackendError(f"the store failed in {operation}: {exc!r}") from exc
        finally:
            self.metrics.store_latency(operation, time.perf_counter() - start)


def _error(exc: Rejected, client_id: str | None) -> Error:
    return Error(exc.code, exc.message, client_id, exc.retry_after)
