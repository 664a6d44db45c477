"""What the hub queued for a :class:`~pmhub.connection.Connection`, for the tests that
drive the hub without sockets."""

from __future__ import annotations

import json
from typing import Any

from pmhub.connection import Connection

__all__ = ["drain"]


async def drain(client: Connection) -> list[dict[str, Any]]:
    """Every frame queued for ``client`` so far, decoded, without waiting."""
    frames = []
    while client._queue:
        outgoing = await client.next_frame()
        assert outgoing is not None
        frames.append(json.loads(outgoing.data))
    return frames
