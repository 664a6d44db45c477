"""The HTTP API's bodies as msgspec Structs, shared by the server, the client and the docs.

The ASGI adapter decodes requests into these and encodes its answers from
them; :mod:`pmhub.client` decodes with them; the OpenAPI document in
``docs/openapi.json`` is generated from them (``python -m pmhub.schemas``).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from .errors import ErrorCode
from .frames import ClientId, Id, Message

__all__ = [
    "ErrorBody",
    "ErrorDetail",
    "Health",
    "HistoryPage",
    "PostMessage",
    "PostRead",
    "ReadResult",
    "Unhealthy",
]


class PostMessage(msgspec.Struct, frozen=True):
    """``POST /api/messages``: send ``content`` to ``recipient_id``."""

    recipient_id: Id
    content: str
    client_id: ClientId | None = None


class PostRead(msgspec.Struct, frozen=True):
    """``POST /api/messages/{peer_id}/read``: read the peer's messages up to an id."""

    up_to_id: Id


class ReadResult(msgspec.Struct, frozen=True):
    """How many messages ``POST .../read`` marked read."""

    updated: int


class HistoryPage(msgspec.Struct, frozen=True):
    """``GET /api/messages/{peer_id}``: a page, oldest first; ``has_more`` if older exist."""

    messages: list[Message]
    has_more: bool


class Health(msgspec.Struct, frozen=True):
    """``GET /healthz`` when the store and the broker answer."""

    connections: int
    users_online: int
    status: Literal["ok"] = "ok"


class Unhealthy(msgspec.Struct, frozen=True):
    """``GET /healthz`` (503) when the store or the broker does not answer."""

    error: str
    status: Literal["unavailable"] = "unavailable"


class ErrorDetail(msgspec.Struct, frozen=True):
    code: ErrorCode
    message: str


class ErrorBody(msgspec.Struct, frozen=True):
    """Every 4xx and 5xx answer: ``{"error": {"code", "message"}}``."""

    error: ErrorDetail
