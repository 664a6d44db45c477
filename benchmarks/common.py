"""What the servers and the load generator must agree on: users, contacts, frames."""

from __future__ import annotations

import resource

import msgspec

#: Environment variable carrying the secret that signs pmhub session cookies.
SECRET_ENV = "PMHUB_BENCH_SECRET"
#: Each user's contacts: this many ids on each side of them in a ring.
RING_SIDE = 10
#: The content of every benchmark message (a short chat line).
CONTENT = "The quick brown fox jumps over the lazy dog, 0123456789."


def contacts(user_id: int, users: int) -> list[int]:
    """The ``2 * RING_SIDE`` users next to ``user_id`` in a ring of ids ``1..users``."""
    side = min(RING_SIDE, (users - 1) // 2)
    return [(user_id - 1 + d) % users + 1 for d in range(-side, side + 1) if d]


def is_contact(user_id: int, peer_id: int, users: int) -> bool:
    """``peer_id in contacts(user_id, users)`` in O(1): the ring is symmetric."""
    if not (1 <= user_id <= users and 1 <= peer_id <= users) or user_id == peer_id:
        return False
    side = min(RING_SIDE, (users - 1) // 2)
    distance = (peer_id - user_id) % users
    return distance <= side or distance >= users - side


def raise_nofile() -> int:
    """Raise the soft file-descriptor limit to the hard one (2,000+ sockets); return it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Send(msgspec.Struct):
    """What a client sends: the shape of pmhub's ``private_message`` client frame."""

    recipient_id: int
    content: str
    client_id: str
    type: str = "private_message"


class Body(msgspec.Struct):
    """The ``message`` object of a delivered frame (only the fields we read)."""

    id: int
    sender_id: int
    receiver_id: int
    client_id: str | None = None


class Frame(msgspec.Struct):
    """Any server frame, with the fields the generator reads; others are ignored."""

    type: str
    message: Body | str | None = None
    code: str | None = None
    client_id: str | None = None
    last_id: int | None = None
    has_more: bool | None = None
