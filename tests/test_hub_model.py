"""The hub against a small model, as a hypothesis state machine.

Each rule does one thing to the hub (a device connects or disconnects, sends a
message, marks messages read, syncs) and the model predicts exactly which
frames every open device gets; invariants check the store, per-device order
and presence after every step. The hub runs in a private event loop, driven
through a blocking portal.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
)

from pmhub import Hub, Identity, Limits, MemoryStore, Message, StaticPolicy
from pmhub.client import Client

USERS = [1, 2, 3, 4]
RESTRICTED, ONLY_PEER = 4, 3  # the demo: user 4 converses only with user 3
PAGE = 3
WELCOME = "welcome"

Frame = dict[str, Any]
# What the model expects a device to get: a kind ("live", "replay" or "other") and a frame.
Expected = tuple[str, Frame]


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
    client: Client
    context: AbstractContextManager[Client]
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
            got = []
            for device in self.open:
                frames = []
                while device.client._queue:
                    outgoing = await device.client.next_frame()
                    assert outgoing is not None
                    frames.append(json.loads(outgoing.data))
                got.append(frames)
            return got

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
            clients = self.portal.call(self.hub.clients, user)
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
