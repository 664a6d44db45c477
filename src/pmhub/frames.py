"""The wire protocol as msgspec schemas: one ``Struct`` per frame type.

Frames are JSON objects discriminated by ``"type"``. Client and server frames
form one tagged union per direction, each with a decoder built once. Decoding
is strict: anything that is not a valid client frame raises
:class:`~pmhub.errors.Rejected` with code ``invalid_frame`` and a message that
says what is wrong and where (``Expected `int`, got `str` - at
`$.recipient_id```). Unknown fields are ignored; a key repeated in one object
is refused, so a proxy or a log cannot read a frame differently from pmhub.

A fan-out frame is encoded once into an :class:`Outgoing` and the same bytes go
to every connection.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Annotated, Any, Final, TypeVar

import msgspec

from .errors import Rejected

__all__ = [
    "ClientFrame",
    "Conversation",
    "Error",
    "MarkRead",
    "Message",
    "MessagesRead",
    "Outgoing",
    "PrivateMessage",
    "SendMessage",
    "ServerFrame",
    "SetTyping",
    "Sync",
    "SyncComplete",
    "System",
    "TypingIndicator",
    "UserOnlineStatus",
    "decode_body",
    "decode_client_frame",
    "decode_server_frame",
    "encode",
]

T = TypeVar("T")

#: Integers on the wire stay within what a JavaScript number holds exactly.
MAX_SAFE_INT: Final = 2**53
#: JSON nested deeper than this is refused.
MAX_DEPTH: Final = 32

Id = Annotated[int, msgspec.Meta(ge=-MAX_SAFE_INT, le=MAX_SAFE_INT)]
ClientId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class Message(msgspec.Struct, frozen=True, gc=False):
    """A stored private message. ``id`` grows strictly in commit order.

    Not tracked by the garbage collector (its fields cannot form a cycle), so
    a store or cache holding many messages does not slow every collection.
    """

    id: int
    content: str
    sender_id: int
    receiver_id: int
    created_at: datetime
    is_read: bool = False
    client_id: str | None = None


class Conversation(msgspec.Struct, frozen=True):
    """One row of ``GET /api/conversations``."""

    peer_id: int
    last_message: Message
    unread_count: int


# -- client → server ---------------------------------------------------------


class SendMessage(msgspec.Struct, tag="private_message", tag_field="type", frozen=True):
    """Send ``content`` to ``recipient_id``; ``client_id`` makes resends idempotent."""

    recipient_id: Id
    content: str
    client_id: ClientId | None = None


class SetTyping(msgspec.Struct, tag="typing_indicator", tag_field="type", frozen=True):
    """Start or stop the typing indicator shown to ``recipient_id``."""

    recipient_id: Id
    is_typing: bool


class MarkRead(msgspec.Struct, tag="mark_read", tag_field="type", frozen=True):
    """Mark every message from ``peer_id`` with id ≤ ``up_to_id`` as read."""

    peer_id: Id
    up_to_id: Id


class Sync(msgspec.Struct, tag="sync", tag_field="type", frozen=True):
    """Replay every message of this user with id > ``after_id``."""

    after_id: Id


ClientFrame = SendMessage | SetTyping | MarkRead | Sync


# -- server → client ---------------------------------------------------------


class System(msgspec.Struct, tag="system", tag_field="type", frozen=True):
    """A notice: the welcome after accept, or any other server notice."""

    message: str


class PrivateMessage(
    msgspec.Struct, tag="private_message", tag_field="type", frozen=True, gc=False
):
    """A stored message, pushed to every connection of both participants."""

    sender_id: int
    recipient_id: int
    message: Message

    @classmethod
    def of(cls, message: Message) -> PrivateMessage:
        """The frame that carries ``message``."""
        return cls(message.sender_id, message.receiver_id, message)


class TypingIndicator(msgspec.Struct, tag="typing_indicator", tag_field="type", frozen=True):
    """``user_id`` (stamped by the server) is or stopped typing to ``recipient_id``."""

    user_id: int
    recipient_id: int
    is_typing: bool


class UserOnlineStatus(msgspec.Struct, tag="user_online_status", tag_field="type", frozen=True):
    """``user_id`` came online (first connection) or went offline (last one closed)."""

    user_id: int
    is_online: bool


class MessagesRead(msgspec.Struct, tag="messages_read", tag_field="type", frozen=True):
    """``reader_id`` read ``peer_id``'s messages up to ``up_to_id``."""

    reader_id: int
    peer_id: int
    up_to_id: int


class SyncComplete(msgspec.Struct, tag="sync_complete", tag_field="type", frozen=True):
    """End of one ``sync`` page; with ``has_more`` sync again from ``last_id``."""

    last_id: int
    has_more: bool


class Error(msgspec.Struct, tag="error", tag_field="type", frozen=True, omit_defaults=True):
    """A frame failed; the connection stays open."""

    code: str
    message: str
    client_id: str | None = None
    retry_after: float | None = None


ServerFrame = (
    System
    | PrivateMessage
    | TypingIndicator
    | UserOnlineStatus
    | MessagesRead
    | SyncComplete
    | Error
)

_client_decoder: Final = msgspec.json.Decoder(ClientFrame)
_server_decoder: Final = msgspec.json.Decoder(ServerFrame)
_untyped_decoder: Final = msgspec.json.Decoder()
_encoder: Final = msgspec.json.Encoder()
# An unterminated string runs to the end, so a match never fails once started:
# a failed match retried from every later quote would make this quadratic.
_strings: Final = re.compile(rb'"(?:[^"\\]|\\.)*(?:"|\\?\Z)', re.DOTALL)
_brackets: Final = re.compile(rb"[\[\]{}]")


def _too_deep(data: bytes, containers: int) -> bool:
    # Counting brackets is cheap and almost every frame stops here.
    if containers <= MAX_DEPTH:
        return False
    depth = 0
    for match in _brackets.finditer(_strings.sub(b"", data)):
        if match.group() in (b"[", b"{"):
            depth += 1
            if depth > MAX_DEPTH:
                return True
        else:
            depth -= 1
    return False


def _pairs(value: object) -> int:
    """How many key/value pairs the objects in a decoded JSON value hold."""
    if isinstance(value, dict):
        return len(value) + sum(_pairs(item) for item in value.values() if _nested(item))
    if isinstance(value, list):
        return sum(_pairs(item) for item in value if _nested(item))
    return 0


def _nested(value: object) -> bool:
    return isinstance(value, (dict, list))


def _duplicate_key(data: bytes, containers: int) -> str | None:
    """The first key that some object in ``data`` (valid JSON) holds twice, if any.

    Every pair has one ``:`` outside strings; a decoded object keeps one pair
    per distinct key, so fewer pairs than such colons means a repeated key.
    """
    colons = data.count(b":")
    if not colons:
        return None
    tree = _untyped_decoder.decode(data)
    pairs = len(tree) if containers == 1 and isinstance(tree, dict) else _pairs(tree)
    if colons == pairs or _strings.sub(b"", data).count(b":") == pairs:
        return None
    repeated: list[str] = []

    def pairs_hook(items: list[tuple[str, object]]) -> dict[str, object]:
        keys = [key for key, _ in items]
        if not repeated and len(set(keys)) < len(keys):
            repeated.append(next(key for key in keys if keys.count(key) > 1))
        return dict(items)

    json.loads(data, object_pairs_hook=pairs_hook)
    return repeated[0] if repeated else "?"


def _decode(data: str | bytes, decoder: msgspec.json.Decoder[T]) -> T:
    """Decode strictly: depth, schema, and no key twice in one object."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    containers = raw.count(b"[") + raw.count(b"{")
    if _too_deep(raw, containers):
        raise Rejected("invalid_frame", f"JSON is nested deeper than {MAX_DEPTH} levels")
    try:
        value = decoder.decode(raw)
        # Also reads the unknown fields the typed decoder skipped.
        key = _duplicate_key(raw, containers)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise Rejected("invalid_frame", _describe(exc)) from None
    if key is not None:
        raise Rejected("invalid_frame", f"JSON object has the key {key!r} more than once")
    return value


def decode_client_frame(data: str | bytes) -> ClientFrame:
    """Decode one client frame, or raise ``Rejected("invalid_frame", ...)``."""
    return _decode(data, _client_decoder)


def decode_body(data: bytes, schema: type[T]) -> T:
    """Decode an HTTP request body into ``schema`` with the rules frames follow.

    Raises ``Rejected("invalid_frame", ...)`` like :func:`decode_client_frame`.
    """
    decoder: msgspec.json.Decoder[T] | None = _body_decoders.get(schema)
    if decoder is None:
        decoder = _body_decoders[schema] = msgspec.json.Decoder(schema)
    return _decode(data, decoder)


_body_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def _describe(exc: Exception) -> str:
    if isinstance(exc, msgspec.ValidationError):
        return str(exc)
    if isinstance(exc, RecursionError):
        return f"JSON is nested deeper than {MAX_DEPTH} levels"
    text = str(exc)
    if text == "Input data was truncated" or "UTF-8" in text:
        # msgspec reports a lone surrogate escape (\ud800) as truncation.
        return f"{text} (or contains an invalid string such as a lone surrogate)"
    return text


def decode_server_frame(data: str | bytes) -> ServerFrame:
    """Decode one server frame (for clients and tests); raises ``msgspec.DecodeError``."""
    return _server_decoder.decode(data)


def encode(frame: object) -> bytes:
    """Encode a frame (or any msgspec-encodable value) to JSON bytes."""
    return _encoder.encode(frame)


class Outgoing:
    """One encoded server frame, shared by every connection it goes to.

    ``message_id`` is set for live ``private_message`` frames so a connection
    can keep them in id order and drop a repeat.
    """

    __slots__ = ("_text", "data", "message_id")

    def __init__(self, data: bytes, message_id: int | None = None) -> None:
        self.data = data
        self.message_id = message_id
        self._text: str | None = None

    @classmethod
    def of(cls, frame: ServerFrame) -> Outgoing:
        message_id = frame.message.id if isinstance(frame, PrivateMessage) else None
        return cls(_encoder.encode(frame), message_id)

    @property
    def text(self) -> str:
        """The frame as ``str``, decoded once for transports that send text."""
        if self._text is None:
            self._text = self.data.decode()
        return self._text

    def __repr__(self) -> str:
        return f"Outgoing({self.data!r})"
