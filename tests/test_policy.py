"""The bundled permission policies."""

from __future__ import annotations

import pytest

from pmhub import AllowAll, StaticPolicy

pytestmark = pytest.mark.anyio

ALICE, BOB, CAROL, MALLORY = 1, 2, 3, 4


@pytest.fixture
def demo() -> StaticPolicy:
    return StaticPolicy({ALICE, BOB, CAROL, MALLORY}, only={MALLORY: {CAROL}})


@pytest.mark.parametrize(
    ("user", "peer", "allowed"),
    [
        (ALICE, BOB, True),
        (BOB, ALICE, True),
        (ALICE, CAROL, True),
        (BOB, CAROL, True),
        (MALLORY, CAROL, True),
        (CAROL, MALLORY, True),
        (MALLORY, ALICE, False),
        (ALICE, MALLORY, False),
        (MALLORY, BOB, False),
        (BOB, MALLORY, False),
    ],
)
async def test_demo_rules_mallory_only_with_carol(
    demo: StaticPolicy, user: int, peer: int, allowed: bool
) -> None:
    assert await demo.may_converse(user, peer) is allowed


@pytest.mark.parametrize("user", [ALICE, BOB, CAROL, MALLORY])
async def test_nobody_converses_with_themselves(demo: StaticPolicy, user: int) -> None:
    assert not await demo.may_converse(user, user)
    assert not await AllowAll().may_converse(user, user)


async def test_unknown_users_exist_not_and_converse_with_nobody(demo: StaticPolicy) -> None:
    assert [await demo.exists(u) for u in (ALICE, BOB, CAROL, MALLORY)] == [True] * 4
    assert not await demo.exists(5)
    assert not await demo.exists(0)
    assert not await demo.may_converse(ALICE, 5)
    assert not await demo.may_converse(5, ALICE)
    assert not await demo.may_converse(5, 6)


async def test_restricted_user_may_list_several_peers() -> None:
    policy = StaticPolicy({1, 2, 3, 4, 5}, only={4: {3, 5}, 5: {4}})
    assert await policy.may_converse(4, 5) and await policy.may_converse(5, 4)
    assert await policy.may_converse(4, 3) and await policy.may_converse(3, 4)
    assert not await policy.may_converse(5, 3)  # 5 is itself restricted to 4
    assert not await policy.may_converse(3, 5)
    assert not await policy.may_converse(4, 1)


async def test_without_restrictions_everyone_converses() -> None:
    policy = StaticPolicy([1, 2, 3])
    assert all([await policy.may_converse(a, b) for a in (1, 2, 3) for b in (1, 2, 3) if a != b])


def test_restrictions_naming_unknown_users_raise_value_error() -> None:
    with pytest.raises(ValueError, match=r"\[9\]"):
        StaticPolicy({1, 2}, only={1: {9}})
    with pytest.raises(ValueError, match=r"\[9\]"):
        StaticPolicy({1, 2}, only={9: {1}})


async def test_allow_all() -> None:
    policy = AllowAll()
    assert await policy.exists(1) and await policy.exists(10**15)
    assert not await policy.exists(0) and not await policy.exists(-1)
    assert await policy.may_converse(1, 2) and await policy.may_converse(2, 1)
