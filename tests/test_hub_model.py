"""The hub against a small model, as a hypothesis state machine.

Each rule does one thing to the hub (a device connects or disconnects, sends a
message, marks messages read, syncs) and the model predicts exactly which
frames every open device gets; invariants check the store, per-device order
and presence after every step. The hub runs in a private event loop, driven
through a blocking portal.

:class:`TwoHubMachine` runs two hubs on one store, joined by a broker that
holds events bound for the other node in per-(origin, destination) queues and
delivers them when hypothesis says so: across nodes messages arrive late and
out of id order, and the invariants check that none is lost or repeated.
"""

from __future__ import annotations

import json
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import TaskStatus
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
)
from queues import drain

from pmhub import Hub, Identity, Limits, MemoryStore, Message, Rejected, StaticPolicy
from pmhub.broker import Deliver, Deliverer, Event
from pmhub.connection import Connection
from pmhub.store import Draft

USERS = [1, 2, 3, 4]
RESTRICTED, ONLY_PEER = 4, 3  # the demo: user 4 converses only with user 3
PAGE = 3
WELCOME = "welcome"

Frame = dict[str, Any]
# What the model expects a device to get: a kind ("live", "replay" or "other") and a frame.
Expected = tuple[str, Frame]
T = TypeVar("T")


def may_converse(user: int, peer: int) -> bool:
    if user == peer or user not in USERS or peer not in USERS:
        return False
    return RESTRICTED not in (user, peer) or {user, peer} == {RESTRICTED, ONLY_PEER}


@dataclass
class ModelMessage:
    id: int
    sender: int
    recipient: int
    content: str
    client_id: str | None
    is_read: bool = False

    def frame(self) -> Frame:
        message = {
            "id": self.id,
            "content": self.content,
            "sender_id": self.sender,
            "receiver_id": self.recipient,
            "is_read": self.is_read,
            "client_id": self.client_id,
        }
        return {
            "type": "private_message",
            "sender_id": self.sender,
            "recipient_id": self.recipient,
            "message": message,
        }


@dataclass(eq=False)
class Device:
    user: int
    client: Connection
    context: AbstractContextManager[Connection]
    #: The highest message id when it connected: it gets every later one of its user.
    joined_after: int
    live_ids: list[int] = field(default_factory=list)
    online_seen: set[int] = field(default_factory=set)

    def __repr__(self) -> str:
        return f"Device(user={self.user}, client={self.client.id})"


def normalize(frame: Frame) -> Frame:
    """Drop what the model cannot predict: created_at, error wording."""
    if frame["type"] == "private_message":
        message = dict(frame["message"])
        assert isinstance(message.pop("created_at"), str)
        return {**frame, "message": message}
    if frame["type"] == "error":
        return {k: v for k, v in frame.items() if k != "message"}
    return frame


class HubMachine(RuleBasedStateMachine):
    backend = "asyncio"
    devices = Bundle("devices")

    def __init__(self) -> None:
        super().__init__()
        self._portal_context = start_blocking_portal(self.backend)
        self.portal: BlockingPortal = self._portal_context.__enter__()
        self.store = MemoryStore()
        self.hub: Hub = self.portal.call(self._make_hub)
        self._hub_context = self.portal.wrap_async_context_manager(self.hub)
        self._hub_context.__enter__()
        self.messages: list[ModelMessage] = []
        self.keys: dict[tuple[int, str], ModelMessage] = {}
        self.open: list[Device] = []
        self.read_marks: dict[tuple[int, int], int] = {}
        self.read_ids: set[int] = set()
        self.expected: dict[Device, list[Expected]] = {}

    async def _make_hub(self) -> Hub:
        policy = StaticPolicy(USERS, only={RESTRICTED: {ONLY_PEER}})
        limits = Limits(message_burst=10_000, sync_page_size=PAGE, max_queue=PAGE + 5)
        return Hub(self.store, policy, limits=limits, welcome=WELCOME)

    def teardown(self) -> None:
        try:
            for device in reversed(self.open):
                device.context.__exit__(None, None, None)
            self._hub_context.__exit__(None, None, None)
        finally:
            self._portal_context.__exit__(None, None, None)

    # -- the model ------------------------------------------------------------------------

    def online(self) -> set[int]:
        return {device.user for device in self.open}

    def of_user(self, user: int) -> list[Device]:
        return [device for device in self.open if device.user == user]

    def expect(self, device: Device, kind: str, frame: Frame) -> None:
        self.expected.setdefault(device, []).append((kind, frame))

    def check_frames(self) -> None:
        """Every open device got exactly the frames the model expects, in order."""

        async def collect() -> list[list[Frame]]:
            return [await drain(device.client) for device in self.open]

        received = self.portal.call(collect)
        expected, self.expected = self.expected, {}
        for device, frames in zip(self.open, received, strict=True):
            assert device.client.close_code is None, device
            wanted = expected.get(device, [])
            assert [normalize(f) for f in frames] == [frame for _, frame in wanted], device
            for (kind, _), frame in zip(wanted, frames, strict=True):
                if kind == "live":
                    device.live_ids.append(frame["message"]["id"])
                if frame["type"] == "user_online_status":
                    if frame["is_online"]:
                        device.online_seen.add(frame["user_id"])
                    else:
                        device.online_seen.discard(frame["user_id"])

    # -- rules ----------------------------------------------------------------------------

    @rule(target=devices, user=st.sampled_from(USERS))
    def connect(self, user: int) -> Device:
        first = user not in self.online()
        context = self.portal.wrap_async_context_manager(self.hub.connect(Identity(user)))
        device = Device(user, context.__enter__(), context, len(self.messages))
        snapshot = sorted(u for u in self.online() if may_converse(user, u))
        self.expect(device, "other", {"type": "system", "message": WELCOME})
        for other in snapshot:
            self.expect(device, "other", presence(other, True))
        if first:
            for observer in self.open:
                if may_converse(observer.user, user):
                    self.expect(observer, "other", presence(user, True))
        self.open.append(device)
        self.check_frames()
        return device

    @rule(device=consumes(devices))
    def disconnect(self, device: Device) -> None:
        device.context.__exit__(None, None, None)
        self.open.remove(device)
        if device.user not in self.online():
            for observer in self.open:
                if may_converse(observer.user, device.user):
                    self.expect(observer, "other", presence(device.user, False))
        self.check_frames()

    @rule(
        device=devices,
        recipient=st.sampled_from([*USERS, 99]),
        content=st.text(max_size=6) | st.sampled_from([" ", "\x00", "\u2028"]),
        client_id=st.none() | st.sampled_from(["a", "b", "c"]),
    )
    def send(self, device: Device, recipient: int, content: str, client_id: str | None) -> None:
        frame: Frame = {"type": "private_message", "recipient_id": recipient, "content": content}
        if client_id is not None:
            frame["client_id"] = client_id
        self.portal.call(self.hub.receive, device.client, json.dumps(frame))

        sender = device.user
        stored = self.keys.get((sender, client_id)) if client_id is not None else None
        if stored is not None:  # first write wins, whatever the resend carries
            self.expect(device, "replay", stored.frame())
        elif not content.strip():
            self.expect(device, "other", error("too_long", client_id))
        elif not may_converse(sender, recipient):
            self.expect(device, "other", error("forbidden", client_id))
        else:
            message = ModelMessage(len(self.messages) + 1, sender, recipient, content, client_id)
            self.messages.append(message)
            if client_id is not None:
                self.keys[(sender, client_id)] = message
            for other in self.open:
                if other.user in (sender, recipient):
                    self.expect(other, "live", message.frame())
        self.check_frames()

    @rule(device=devices, peer=st.sampled_from(USERS), up_to_id=st.integers(-1, 40))
    def mark_read(self, device: Device, peer: int, up_to_id: int) -> None:
        frame = {"type": "mark_read", "peer_id": peer, "up_to_id": up_to_id}
        self.portal.call(self.hub.receive, device.client, json.dumps(frame))

        reader = device.user
        changed = [
            m
            for m in self.messages
            if (m.sender, m.recipient) == (peer, reader) and m.id <= up_to_id and not m.is_read
        ]
        for message in changed:
            message.is_read = True
        if changed:
            receipt = {
                "type": "messages_read",
                "reader_id": reader,
                "peer_id": peer,
                "up_to_id": max(m.id for m in changed),
            }
            for other in self.open:
                if other.user == peer or (other.user == reader and other is not device):
                    self.expect(other, "other", receipt)
        self.check_frames()

    @rule(device=devices, after_id=st.integers(-1, 40))
    def sync(self, device: Device, after_id: int) -> None:
        self.portal.call(
            self.hub.receive, device.client, json.dumps({"type": "sync", "after_id": after_id})
        )

        mine = [
            m for m in self.messages if device.user in (m.sender, m.recipient) and m.id > after_id
        ]
        for message in mine[:PAGE]:
            self.expect(device, "replay", message.frame())
        last_id = mine[:PAGE][-1].id if mine else after_id
        complete = {"type": "sync_complete", "last_id": last_id, "has_more": len(mine) > PAGE}
        self.expect(device, "other", complete)
        self.check_frames()

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def every_message_is_stored_exactly_once(self) -> None:
        async def everything() -> list[Message]:
            stored: dict[int, Message] = {}
            for user in USERS:
                for message in await self.store.since(user, 0, 10_000):
                    assert stored.setdefault(message.id, message) == message
            return sorted(stored.values(), key=lambda m: m.id)

        stored = self.portal.call(everything)
        assert [m.id for m in stored] == [m.id for m in self.messages]
        for got, want in zip(stored, self.messages, strict=True):
            assert (got.sender_id, got.receiver_id, got.content, got.client_id) == (
                want.sender,
                want.recipient,
                want.content,
                want.client_id,
            )
            assert got.is_read == want.is_read
        keys = [(m.sender_id, m.client_id) for m in stored if m.client_id is not None]
        assert len(keys) == len(set(keys))

    @invariant()
    def each_device_got_its_users_messages_once_in_order(self) -> None:
        for device in self.open:
            since_connect = [
                m.id
                for m in self.messages
                if m.id > device.joined_after and device.user in (m.sender, m.recipient)
            ]
            assert device.live_ids == since_connect, device

    @invariant()
    def presence_seen_is_having_an_open_connection(self) -> None:
        online = self.online()
        for device in self.open:
            visible = {u for u in online if may_converse(device.user, u)}
            assert device.online_seen == visible, device

    @invariant()
    def read_pointers_never_go_back(self) -> None:
        async def read_ids() -> set[int]:
            return {m.id for u in USERS for m in await self.store.since(u, 0, 10_000) if m.is_read}

        now_read = self.portal.call(read_ids)
        assert self.read_ids <= now_read, "a read message became unread"
        for pair, mark in self.read_marks.items():
            reader, peer = pair
            highest = max(
                m.id
                for m in self.messages
                if m.id in now_read and (m.recipient, m.sender) == (reader, peer)
            )
            assert highest >= mark
        self.read_ids = now_read
        for message in self.messages:
            if message.id in now_read:
                pair = (message.recipient, message.sender)
                self.read_marks[pair] = max(self.read_marks.get(pair, 0), message.id)

    @invariant()
    def hub_lists_the_open_connections(self) -> None:
        for user in USERS:
            clients = self.portal.call(self.hub.connections, user)
            assert {c.id for c in clients} == {d.client.id for d in self.of_user(user)}


def presence(user: int, is_online: bool) -> Frame:
    return {"type": "user_online_status", "user_id": user, "is_online": is_online}


def error(code: str, client_id: str | None) -> Frame:
    frame: Frame = {"type": "error", "code": code}
    if client_id is not None:
        frame["client_id"] = client_id
    return frame


class TrioHubMachine(HubMachine):
    backend = "trio"


HubMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=30, deadline=None)
TrioHubMachine.TestCase.settings = HubMachine.TestCase.settings
TestHubModelAsyncio = HubMachine.TestCase
TestHubModelTrio = TrioHubMachine.TestCase


# -- two hubs, one store, a broker that delays and reorders ------------------------------------

NODES = ("a", "b")
PAIRS = [(origin, dest) for origin in NODES for dest in NODES if origin != dest]
KEYS = ["k1", "k2", "k3"]


class Network:
    """The bus the brokers of every node share.

    It counts connections per user across nodes (like :class:`InProcessBroker`)
    and carries events: an event reaches its own node at once, and every other
    node through a FIFO queue per (origin, destination) that the test flushes
    when hypothesis says so. So events from one origin arrive everywhere in
    publish order, while deliveries from different origins interleave in any
    order.
    """

    def __init__(self) -> None:
        self.connections: Counter[int] = Counter()
        self.deliverers: dict[str, Deliverer] = {}
        self.queues: dict[tuple[str, str], deque[Event]] = {pair: deque() for pair in PAIRS}

    def broker(self, node: str) -> DelayingBroker:
        return DelayingBroker(self, node)

    def in_flight(self, dest: str) -> list[Event]:
        return [event for (_, to), queue in self.queues.items() if to == dest for event in queue]

    async def deliver(self, origin: str, dest: str, count: int) -> None:
        """Hand up to ``count`` queued events from ``origin`` to ``dest``, in order."""
        queue = self.queues[(origin, dest)]
        for _ in range(count):
            if not queue:
                return
            event = queue.popleft()
            await anyio.lowlevel.checkpoint()  # a real bus is a network away
            deliver = self.deliverers.get(dest)
            if deliver is not None:
                await deliver(event)


class DelayingBroker:
    """One node's handle on the :class:`Network` (implements :class:`pmhub.Broker`)."""

    def __init__(self, network: Network, node: str) -> None:
        self.network = network
        self.node = node

    async def run(
        self, deliver: Deliverer, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        self.network.deliverers[self.node] = deliver
        try:
            task_status.started()
            await anyio.sleep_forever()
        finally:
            del self.network.deliverers[self.node]

    async def publish(self, event: Event) -> None:
        # Queue, never wait for delivery: the sequencer awaits this inside send_message.
        await anyio.lowlevel.checkpoint()
        for dest, deliver in list(self.network.deliverers.items()):
            if dest == self.node:
                await deliver(event)  # through one node: no cross-node queue
            else:
                self.network.queues[(self.node, dest)].append(event)

    async def join(self, user_id: int) -> int:
        await anyio.lowlevel.checkpoint()
        self.network.connections[user_id] += 1
        return self.network.connections[user_id]

    async def leave(self, user_id: int) -> int:
        await anyio.lowlevel.checkpoint()
        count = self.network.connections[user_id]
        assert count > 0, f"leave({user_id}) without a matching join()"
        self.network.connections[user_id] = count - 1
        if count == 1:
            del self.network.connections[user_id]
        return count - 1

    async def online(self, user_ids: Iterable[int] | None = None) -> set[int]:
        await anyio.lowlevel.checkpoint()
        if user_ids is None:
            return set(self.network.connections)
        return {user for user in user_ids if user in self.network.connections}

    async def ping(self) -> None:
        return None


class YieldingStore(MemoryStore):
    """A MemoryStore whose commits take a moment, so sends pile up into batches
    and the two hubs' writers interleave on the one store."""

    async def save_many(self, drafts: Sequence[Draft]) -> list[tuple[Message, bool]]:
        await anyio.lowlevel.checkpoint()
        return await super().save_many(drafts)


@dataclass
class Sent:
    """A confirmed message, as the model knows it."""

    id: int
    sender: int
    recipient: int
    content: str
    client_id: str | None
    node: str  # the hub that committed and published it


@dataclass(eq=False)
class NodeDevice:
    user: int
    node: str
    client: Connection
    context: AbstractContextManager[Connection]
    #: The highest message id when it connected: it must get every later one of its user …
    joined_after: int
    #: … and may also get those still in flight to its node when it connected.
    may_get: set[int]
    live: list[int] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"NodeDevice(user={self.user}, node={self.node}, client={self.client.id})"


class TwoHubMachine(RuleBasedStateMachine):
    """Two hubs on one MemoryStore, joined by a broker that delays and reorders."""

    backend = "asyncio"
    devices = Bundle("node_devices")

    def __init__(self) -> None:
        super().__init__()
        self._portal_context = start_blocking_portal(self.backend)
        self.portal: BlockingPortal = self._portal_context.__enter__()
        self.store = YieldingStore()
        self.network = Network()
        self.hubs: dict[str, Hub] = {}
        self._hub_contexts: list[AbstractContextManager[Hub]] = []
        for node in NODES:
            hub = self.portal.call(self._make_hub, node)
            context = self.portal.wrap_async_context_manager(hub)
            context.__enter__()
            self.hubs[node] = hub
            self._hub_contexts.append(context)
        self.sent: dict[int, Sent] = {}
        self.keys: dict[tuple[int, str], int] = {}
        self.open: list[NodeDevice] = []
        self.counter = 0

    async def _make_hub(self, node: str) -> Hub:
        policy = StaticPolicy(USERS, only={RESTRICTED: {ONLY_PEER}})
        limits = Limits(message_burst=10_000)
        broker = self.network.broker(node)
        return Hub(self.store, policy, broker=broker, limits=limits, welcome=WELCOME)

    def teardown(self) -> None:
        try:
            for device in reversed(self.open):
                device.context.__exit__(None, None, None)
            for context in reversed(self._hub_contexts):
                context.__exit__(None, None, None)
        finally:
            self._portal_context.__exit__(None, None, None)

    # -- the model ------------------------------------------------------------------------

    def online(self) -> set[int]:
        return {device.user for device in self.open}

    def last_id(self) -> int:
        return max(self.sent, default=0)

    def pending_ids(self, node: str, user: int) -> set[int]:
        """Ids of ``user``'s messages whose event is still queued to ``node``."""
        return {
            event.message_id
            for event in self.network.in_flight(node)
            if isinstance(event, Deliver) and event.message_id is not None
            if user in event.user_ids
        }

    def required(self, device: NodeDevice) -> set[int]:
        return {
            m.id
            for m in self.sent.values()
            if m.id > device.joined_after and device.user in (m.sender, m.recipient)
        }

    def collect(self, replays: dict[NodeDevice, int] | None = None) -> None:
        """Drain every open device and check each frame: its private messages are
        filed as live (or as the one replay ``replays`` names), presence goes to
        contacts only, and nothing else arrives."""

        async def drain_all() -> list[list[Frame]]:
            return [await drain(device.client) for device in self.open]

        replays = dict(replays or {})
        for device, frames in zip(self.open, self.portal.call(drain_all), strict=True):
            assert device.client.close_code is None, (device, device.client.close_reason)
            for frame in frames:
                if frame["type"] == "private_message":
                    message = frame["message"]
                    want = self.sent.get(message["id"])
                    assert want is not None, f"{device} got unconfirmed message {message}"
                    assert (
                        message["sender_id"],
                        message["receiver_id"],
                        message["content"],
                        message["client_id"],
                    ) == (want.sender, want.recipient, want.content, want.client_id)
                    assert device.user in (want.sender, want.recipient), (device, message)
                    if replays.get(device) == message["id"]:
                        del replays[device]
                    else:
                        device.live.append(message["id"])
                elif frame["type"] == "user_online_status":
                    # presence never leaks to strangers
                    assert may_converse(device.user, frame["user_id"]), (device, frame)
                else:
                    raise AssertionError(f"{device} got an unexpected frame {frame}")
        assert not replays, f"resends were not answered: {replays}"

    async def _send(
        self,
        sender: int,
        node: str,
        recipient: int,
        content: str,
        client_id: str | None,
        origin: Connection | None,
    ) -> tuple[Message, bool] | str:
        try:
            return await self.hubs[node].send_message(
                sender, recipient, content, client_id, origin=origin
            )
        except Rejected as exc:
            return exc.code

    def check_same_node(self, message_id: int) -> None:
        """Through one node a message needs no queue: its node's devices have it at once."""
        m = self.sent[message_id]
        for device in self.open:
            if device.node == m.node and device.user in (m.sender, m.recipient):
                assert message_id in device.live, (device, m)

    # -- rules ----------------------------------------------------------------------------

    @initialize(target=devices, first=st.sampled_from(USERS), second=st.sampled_from(USERS))
    def one_device_on_each_node(self, first: int, second: int) -> Any:
        return multiple(self.connect(first, "a", None), self.connect(second, "b", None))

    @rule(
        target=devices,
        user=st.sampled_from(USERS),
        node=st.sampled_from(NODES),
        during=st.none() | st.tuples(st.sampled_from(PAIRS), st.integers(1, 4)),
    )
    def connect(
        self, user: int, node: str, during: tuple[tuple[str, str], int] | None
    ) -> NodeDevice:
        snapshot = [presence(u, True) for u in sorted(self.online()) if may_converse(user, u)]
        may_get = self.pending_ids(node, user)
        joined_after = self.last_id()
        context = self.portal.wrap_async_context_manager(self.hubs[node].connect(Identity(user)))
        if during is None:
            client = context.__enter__()
        else:  # deliveries race the connection's setup
            (origin, dest), count = during
            delivering = self.portal.start_task_soon(self.network.deliver, origin, dest, count)
            client = context.__enter__()
            delivering.result()
        device = NodeDevice(user, node, client, context, joined_after, may_get)

        frames = self.portal.call(drain, client)
        assert frames[0] == {"type": "system", "message": WELCOME}, frames  # always first
        if during is None:
            assert frames == [frames[0], *snapshot], frames
        for frame in frames[1:]:
            if frame["type"] == "private_message":
                assert frame["message"]["id"] in may_get, (device, frame)
                device.live.append(frame["message"]["id"])
            else:
                assert frame["type"] == "user_online_status", frame
                assert may_converse(user, frame["user_id"]), frame
        self.open.append(device)
        self.collect()
        return device

    @rule(device=consumes(devices))
    def disconnect(self, device: NodeDevice) -> None:
        device.context.__exit__(None, None, None)
        self.open.remove(device)
        self.collect()

    @rule(
        device=devices,
        recipient=st.sampled_from(USERS),
        content=st.sampled_from(["hi", "yo", " ", "\u2028x"]),
        client_id=st.none() | st.sampled_from(KEYS),
    )
    def send(self, device: NodeDevice, recipient: int, content: str, client_id: str | None) -> None:
        result = self.portal.call(
            self._send, device.user, device.node, recipient, content, client_id, device.client
        )
        stored = self.keys.get((device.user, client_id)) if client_id is not None else None
        if stored is not None:  # a resend: the stored message, to this device only
            assert not isinstance(result, str), result
            assert result[0].id == stored and not result[1], result
            self.collect({device: stored})
            return
        if not content.strip():
            assert result == "too_long"
        elif not may_converse(device.user, recipient):
            assert result == "forbidden"
        else:
            assert not isinstance(result, str), result
            message, created = result
            assert created and message.id > self.last_id(), (message, self.last_id())
            self.sent[message.id] = Sent(
                message.id, device.user, recipient, content, client_id, device.node
            )
            if client_id is not None:
                self.keys[(device.user, client_id)] = message.id
            self.collect()
            self.check_same_node(message.id)
            return
        self.collect()

    @rule(
        sends=st.lists(
            st.tuples(devices, st.integers(0, 9), st.none() | st.sampled_from(KEYS)),
            min_size=2,
            max_size=6,
        )
    )
    def burst(self, sends: list[tuple[NodeDevice, int, str | None]]) -> None:
        """Concurrent sends from devices on both hubs: batches form and interleave."""
        plan = []
        for device, pick, client_id in sends:
            peers = [u for u in USERS if may_converse(device.user, u)]
            self.counter += 1
            plan.append((device, peers[pick % len(peers)], f"b{self.counter}", client_id))

        async def run() -> list[tuple[Message, bool] | str]:
            results: list[tuple[Message, bool] | str] = [""] * len(plan)

            async def one(i: int) -> None:
                device, recipient, content, client_id = plan[i]
                # origin=None: answered like HTTP, so no replay frame to tell apart
                results[i] = await self._send(
                    device.user, device.node, recipient, content, client_id, None
                )

            async with anyio.create_task_group() as tg:
                for i in range(len(plan)):
                    tg.start_soon(one, i)
            return results

        before = self.last_id()
        results = self.portal.call(run)
        new: list[int] = []
        for (device, recipient, content, client_id), result in zip(plan, results, strict=True):
            assert not isinstance(result, str), result
            message, created = result
            key = (device.user, client_id) if client_id is not None else None
            if created:
                assert message.id > before and message.id not in self.sent, message
                assert key is None or key not in self.keys, f"{key} stored twice"
                self.sent[message.id] = Sent(
                    message.id, device.user, recipient, content, client_id, device.node
                )
                if key is not None:
                    self.keys[key] = message.id
                new.append(message.id)
        for (device, _, _, client_id), result in zip(plan, results, strict=True):
            assert not isinstance(result, str)
            message = result[0]
            if client_id is not None:  # every send of one key got the one stored message
                stored = self.keys[(device.user, client_id)]
                assert message.id == stored, (message, stored)
                want = self.sent[stored]
                assert message.content == want.content
        self.collect()
        for message_id in new:
            self.check_same_node(message_id)

    @rule(pick=st.integers(0, len(PAIRS) - 1), count=st.integers(1, 4))
    def deliver_some(self, pick: int, count: int) -> None:
        """Deliver the next few events of one (origin, destination) queue."""
        busy = [pair for pair, queue in self.network.queues.items() if queue]
        if busy:
            self.portal.call(self.network.deliver, *busy[pick % len(busy)], count)
            self.collect()

    @rule(rnd=st.randoms(use_true_random=False))
    def flush_all(self, rnd: random.Random) -> None:
        """Empty every queue, interleaving the origins in an order hypothesis picks."""

        async def flush() -> None:
            while busy := [pair for pair, queue in self.network.queues.items() if queue]:
                await self.network.deliver(*rnd.choice(busy), rnd.randint(1, 3))

        self.portal.call(flush)
        self.collect()
        for device in self.open:
            required = self.required(device)
            got = set(device.live)
            assert required <= got, (device, "lost", sorted(required - got))
            assert got - required <= device.may_get, (device, "extra", sorted(got - required))

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def live_messages_arrive_once_and_are_never_lost(self) -> None:
        for device in self.open:
            assert len(device.live) == len(set(device.live)), (device, device.live)
            required = self.required(device)
            got = set(device.live)
            assert got <= required | device.may_get, (device, sorted(got - required))
            missing = required - got
            # What has not arrived yet is still on its way to the device's node.
            assert missing <= self.pending_ids(device.node, device.user), (device, missing)

    @invariant()
    def through_one_node_ids_arrive_in_order(self) -> None:
        for device in self.open:
            for node in NODES:
                ids = [i for i in device.live if self.sent[i].node == node]
                assert ids == sorted(ids), (device, node, device.live)

    @invariant()
    def every_confirmed_message_is_stored_once_in_id_order(self) -> None:
        async def everything() -> list[list[Message]]:
            return [await self.store.since(user, 0, 10_000) for user in USERS]

        per_user = self.portal.call(everything)
        stored: dict[int, Message] = {}
        for user, messages in zip(USERS, per_user, strict=True):
            ids = [m.id for m in messages]
            assert ids == sorted(set(ids)), (user, ids)  # strictly increasing
            for message in messages:
                assert stored.setdefault(message.id, message) == message
        assert sorted(stored) == sorted(self.sent), "stored ≠ confirmed"
        for message in stored.values():
            want = self.sent[message.id]
            assert (message.sender_id, message.receiver_id, message.content) == (
                want.sender,
                want.recipient,
                want.content,
            )
            assert message.client_id == want.client_id
        keys = [(m.sender_id, m.client_id) for m in stored.values() if m.client_id is not None]
        assert len(keys) == len(set(keys))

    @invariant()
    def connections_are_counted_across_nodes(self) -> None:
        assert self.network.connections == Counter(device.user for device in self.open)

        def listed() -> dict[str, set[str]]:
            return {
                node: {c.id for user in USERS for c in hub.connections(user)}
                for node, hub in self.hubs.items()
            }

        assert self.portal.call(_sync_call, listed) == {
            node: {d.client.id for d in self.open if d.node == node} for node in NODES
        }


async def _sync_call(function: Callable[[], T]) -> T:
    return function()


class TrioTwoHubMachine(TwoHubMachine):
    backend = "trio"


TwoHubMachine.TestCase.settings = settings(max_examples=20, stateful_step_count=30, deadline=None)
TrioTwoHubMachine.TestCase.settings = TwoHubMachine.TestCase.settings
TestTwoHubModelAsyncio = TwoHubMachine.TestCase
TestTwoHubModelTrio = TrioTwoHubMachine.TestCase


# -- presence across nodes -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_cross_node_presence_settles_on_the_truth() -> None:
    """Presence events of two nodes arrive out of order; each hub reads the
    state when an event arrives, so the viewer ends with the truth."""
    network, store = Network(), MemoryStore()
    policy = StaticPolicy(USERS, only={RESTRICTED: {ONLY_PEER}})
    async with (
        Hub(store, policy, broker=network.broker("a")) as hub_a,
        Hub(store, policy, broker=network.broker("b")) as hub_b,
        hub_b.connect(Identity(2)) as viewer,
    ):
        async with hub_a.connect(Identity(1)):
            pass  # user 1 comes online on a and goes offline again: both queued a → b
        async with hub_b.connect(Identity(1)):  # … then comes online on b (told at once)
            await network.deliver("a", "b", 10)  # the old news from a arrives late
            seen = [
                frame["is_online"]
                for frame in await drain(viewer)
                if frame["type"] == "user_online_status" and frame["user_id"] == 1
            ]
            assert await hub_b.broker.online([1]) == {1}
            assert seen[-1] is True, f"user 1 is online, but the viewer was told {seen}"
