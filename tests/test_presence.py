"""Presence: who learns that a user is online, what it costs, and the per-user cap.

A :class:`~pmhub.policy.ContactPolicy` scopes presence to contacts and must
make connect/disconnect cost O(contacts): the counting policies here record
every call the hub makes.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest
from queues import drain

from pmhub import ContactPolicy, Hub, Identity, Limits, MemoryStore
from pmhub.connection import Connection
from pmhub.policy import PermissionPolicy

pytestmark = pytest.mark.anyio

Frame = dict[str, Any]
ALICE, BOB, CAROL, DAVE, ERIN = 1, 2, 3, 4, 5
USERS = {ALICE, BOB, CAROL, DAVE, ERIN}
#: A friends list, symmetric: alice/bob, alice/carol, bob/dave. Erin has no friends.
FRIENDS = {ALICE: {BOB, CAROL}, BOB: {ALICE, DAVE}, CAROL: {ALICE}, DAVE: {BOB}, ERIN: set()}


class WalkPolicy:
    """Everyone may converse with everyone; counts ``may_converse`` calls. No contacts()."""

    def __init__(self, allowed: Mapping[int, Collection[int]] | None = None) -> None:
        self.allowed = allowed
        self.may_converse_calls: list[tuple[int, int]] = []

    async def exists(self, user_id: int) -> bool:
        return user_id in USERS

    async def may_converse(self, user_id: int, peer_id: int) -> bool:
        self.may_converse_calls.append((user_id, peer_id))
        if user_id == peer_id:
            return False
        return self.allowed is None or peer_id in self.allowed.get(user_id, ())


class FriendsPolicy(WalkPolicy):
    """Anyone may message anyone, but presence is scoped to FRIENDS (a contact list)."""

    def __init__(self) -> None:
        super().__init__()
        self.contacts_calls: list[int] = []
        self.hold: dict[int, anyio.Event] = {}  # contacts(user) waits on hold[user] once

    async def contacts(self, user_id: int) -> Collection[int]:
        self.contacts_calls.append(user_id)
        gate = self.hold.pop(user_id, None)
        if gate is not None:
            await gate.wait()
        return sorted(FRIENDS[user_id])


def online(user_id: int, is_online: bool = True) -> Frame:
    return {"type": "user_online_status", "user_id": user_id, "is_online": is_online}


WELCOME: Frame = {"type": "system", "message": "hi"}


def make_hub(policy: PermissionPolicy, **limits: Any) -> Hub:
    return Hub(MemoryStore(), policy, limits=Limits(**limits), welcome="hi")


def test_the_counting_policies_are_what_they_claim() -> None:
    assert isinstance(FriendsPolicy(), ContactPolicy)
    assert not isinstance(WalkPolicy(), ContactPolicy)


# -- with a ContactPolicy -----------------------------------------------------------------------


async def test_contact_policy_connect_costs_one_contacts_call_and_no_may_converse() -> None:
    policy = FriendsPolicy()
    async with make_hub(policy) as hub, AsyncExitStack() as stack:
        bob = await stack.enter_async_context(hub.connect(Identity(BOB)))
        assert policy.contacts_calls == [BOB]
        async with hub.connect(Identity(ALICE)) as alice:
            assert policy.contacts_calls == [BOB, ALICE]  # once for snapshot and broadcast
            async with hub.connect(Identity(ALICE)) as alice2:
                # A second device: the snapshot needs contacts again, nothing is broadcast.
                assert policy.contacts_calls == [BOB, ALICE, ALICE]
                assert await drain(alice2) == [WELCOME, online(BOB)]
            # Not the last connection: presence does not change, contacts() is not asked.
            assert policy.contacts_calls == [BOB, ALICE, ALICE]
            assert await drain(alice) == [WELCOME, online(BOB)]
        assert policy.contacts_calls == [BOB, ALICE, ALICE, ALICE]  # the last close
        assert await drain(bob) == [WELCOME, online(ALICE), online(ALICE, False)]
        assert policy.may_converse_calls == [], "presence walked may_converse"


async def test_snapshot_lists_only_online_contacts() -> None:
    policy = FriendsPolicy()
    async with make_hub(policy) as hub, AsyncExitStack() as stack:
        # bob (a friend) and dave, erin (strangers to alice, though she may message them)
        for user in (BOB, DAVE, ERIN):
            await stack.enter_async_context(hub.connect(Identity(user)))
        async with hub.connect(Identity(ALICE)) as alice:
            assert await drain(alice) == [WELCOME, online(BOB)]  # carol is offline
            async with hub.connect(Identity(CAROL)) as carol:
                assert await drain(carol) == [WELCOME, online(ALICE)]
                assert await drain(alice) == [online(CAROL)]
            assert await drain(alice) == [online(CAROL, False)]
        assert policy.may_converse_calls == []


async def test_presence_broadcasts_reach_only_online_contacts() -> None:
    policy = FriendsPolicy()
    async with make_hub(policy) as hub, AsyncExitStack() as stack:
        clients = {
            user: await stack.enter_async_context(hub.connect(Identity(user)))
            for user in (BOB, DAVE, ERIN)
        }
        for client in clients.values():
            await drain(client)
        async with hub.connect(Identity(ALICE)):
            pass
        assert await drain(clients[BOB]) == [online(ALICE), online(ALICE, False)]
        assert await drain(clients[DAVE]) == []
        assert await drain(clients[ERIN]) == []
        # erin has no contacts: nothing is broadcast, the snapshot is empty
        async with hub.connect(Identity(ERIN)) as erin2:
            assert await drain(erin2) == [WELCOME]
        for client in clients.values():
            assert await drain(client) == []
        assert policy.may_converse_calls == []


# -- without contacts(): the may_converse walk --------------------------------------------------


async def test_policy_without_contacts_walks_may_converse() -> None:
    allowed = {ALICE: {BOB, CAROL}, BOB: {ALICE}, CAROL: {ALICE}, DAVE: set(), ERIN: set()}
    policy = WalkPolicy(allowed)
    async with make_hub(policy) as hub, AsyncExitStack() as stack:
        bob = await stack.enter_async_context(hub.connect(Identity(BOB)))
        dave = await stack.enter_async_context(hub.connect(Identity(DAVE)))
        await drain(bob)
        await drain(dave)
        policy.may_converse_calls.clear()
        async with hub.connect(Identity(ALICE)) as alice:
            assert await drain(alice) == [WELCOME, online(BOB)]
            # the walk asks about every online user but the one connecting
            assert sorted(policy.may_converse_calls) == [(ALICE, BOB), (ALICE, DAVE)]
            assert await drain(bob) == [online(ALICE)]
            assert await drain(dave) == []
        assert await drain(bob) == [online(ALICE, False)]
        assert await drain(dave) == []


# -- the per-user connection cap ----------------------------------------------------------------


async def test_third_connection_is_closed_1013_without_touching_presence() -> None:
    policy = FriendsPolicy()
    async with (
        make_hub(policy, max_connections_per_user=2) as hub,
        hub.connect(Identity(BOB)) as bob,
    ):
        await drain(bob)
        first = hub.connect(Identity(ALICE))
        alice1 = await first.__aenter__()
        async with hub.connect(Identity(ALICE)) as alice2:
            assert await drain(bob) == [online(ALICE)]
            calls = list(policy.contacts_calls)
            async with hub.connect(Identity(ALICE)) as alice3:
                assert alice3.close_code == 1013
                assert "too many connections" in alice3.close_reason
                assert "2" in alice3.close_reason
                assert await alice3.next_frame() is None  # no welcome, nothing
                assert await drain(bob) == []
                assert {c.id for c in hub.connections(ALICE)} == {alice1.id, alice2.id}
                assert hub.connection_count == 3  # bob, alice1, alice2
            assert await drain(bob) == [], "closing the refused connection changed presence"
            assert policy.contacts_calls == calls, "a refused connection looked up contacts"
            assert await hub.broker.online([ALICE]) == {ALICE}
            assert hub.connection_count == 3
            # Close one of the first two: alice stays online, and a new one fits.
            await first.__aexit__(None, None, None)
            assert await drain(bob) == []
            async with hub.connect(Identity(ALICE)) as alice4:
                assert alice4.close_code is None
                assert await drain(alice4) == [WELCOME, online(BOB)]
                assert {c.id for c in hub.connections(ALICE)} == {alice2.id, alice4.id}
                # and the cap still holds
                async with hub.connect(Identity(ALICE)) as alice5:
                    assert alice5.close_code == 1013
            assert await drain(bob) == []
        assert await drain(bob) == [online(ALICE, False)]
        assert await hub.broker.online([ALICE]) == set()
        assert hub.connections(ALICE) == []
        # all counts are back to zero: two fresh connections fit again
        async with hub.connect(Identity(ALICE)) as a, hub.connect(Identity(ALICE)) as b:
            assert a.close_code is None and b.close_code is None
            assert await drain(bob) == [online(ALICE)]


# -- ordering at connect ----------------------------------------------------------------------


async def test_live_frames_during_setup_come_after_welcome_and_snapshot() -> None:
    policy = FriendsPolicy()
    async with make_hub(policy) as hub, hub.connect(Identity(BOB)) as bob:
        await drain(bob)
        gate = policy.hold[ALICE] = anyio.Event()
        connected: list[Connection] = []
        ready, done = anyio.Event(), anyio.Event()
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:

                async def connect_alice() -> None:
                    async with hub.connect(Identity(ALICE)) as alice:
                        connected.append(alice)
                        ready.set()
                        await done.wait()

                tg.start_soon(connect_alice)
                await anyio.wait_all_tasks_blocked()
                assert policy.contacts_calls[-1] == ALICE and not connected  # held in setup
                # Live frames for alice arrive meanwhile: a message and a typing indicator.
                message, _ = await hub.send_message(BOB, ALICE, "early bird")
                await hub.set_typing(BOB, ALICE, True)
                gate.set()
                await ready.wait()
                frames = await drain(connected[0])
                done.set()
        assert frames[0] == WELCOME, "the welcome is not the first frame"
        assert frames[1] == online(BOB)
        assert [f["type"] for f in frames[2:]] == ["private_message", "typing_indicator"]
        assert frames[2]["message"]["id"] == message.id
