"""The sans-I/O connection protocol, driven directly: messages in, decisions out."""

from __future__ import annotations

import pytest

from pmhub.frames import Error, MarkRead, SendMessage, Sync
from pmhub.limits import Limits
from pmhub.protocol import (
    CLOSE_POLICY_VIOLATION,
    CLOSE_TOO_LARGE,
    Close,
    ConnectionProtocol,
    Reply,
)

VALID = '{"type":"sync","after_id":0}'
INVALID = '{"type":"sync"}'


def test_valid_frame_is_returned() -> None:
    protocol = ConnectionProtocol(Limits())
    assert protocol.receive('{"type":"private_message","recipient_id":2,"content":"hi"}') == (
        SendMessage(2, "hi")
    )
    assert protocol.receive(b'{"type":"mark_read","peer_id":2,"up_to_id":5}') == MarkRead(2, 5)


def test_invalid_frame_gets_an_error_reply() -> None:
    action = ConnectionProtocol(Limits()).receive("not json")
    assert isinstance(action, Reply)
    assert action.frame.code == "invalid_frame"
    assert action.frame.client_id is None and action.frame.retry_after is None


def test_binary_frame_is_invalid_even_if_it_holds_json() -> None:
    action = ConnectionProtocol(Limits()).receive(VALID.encode(), binary=True)
    assert isinstance(action, Reply)
    assert action.frame.code == "invalid_frame"
    assert "binary" in action.frame.message


@pytest.mark.parametrize("binary", [False, True])
def test_frame_over_max_size_closes_1009(binary: bool) -> None:
    limits = Limits(max_frame_size=100)
    data = b"x" * 101
    action = ConnectionProtocol(limits).receive(data, binary=binary)
    assert isinstance(action, Close)
    assert action.code == CLOSE_TOO_LARGE == 1009


def test_frame_at_max_size_is_decoded() -> None:
    padding = " " * (100 - len(VALID))
    assert ConnectionProtocol(Limits(max_frame_size=100)).receive(VALID + padding) == Sync(0)
    assert ConnectionProtocol(Limits(max_frame_size=100)).receive((VALID + padding).encode()) == (
        Sync(0)
    )


def test_text_size_is_counted_in_utf8_bytes() -> None:
    limits = Limits(max_frame_size=100)
    frame = '{"type":"private_message","recipient_id":2,"content":"%s"}'
    room = 100 - len(frame % "")
    fits = frame % ("\u00e9" * (room // 2))  # 2 bytes each
    assert len(fits.encode()) <= 100
    assert ConnectionProtocol(limits).receive(fits) == SendMessage(2, "\u00e9" * (room // 2))

    too_big = frame % ("\U0001f600" * (room // 4 + 1))  # 4 bytes each, fewer than 100 chars
    assert len(too_big) < 100 < len(too_big.encode())
    action = ConnectionProtocol(limits).receive(too_big)
    assert isinstance(action, Close) and action.code == 1009


def test_oversize_frame_with_lone_surrogate_closes_without_crashing() -> None:
    action = ConnectionProtocol(Limits(max_frame_size=100)).receive("\ud800" * 40)
    assert isinstance(action, Close) and action.code == 1009


def test_50_invalid_frames_in_a_row_close_1008_on_the_50th() -> None:
    protocol = ConnectionProtocol(Limits())
    for n in range(1, 50):
        action = protocol.receive(INVALID)
        assert isinstance(action, Reply), n
        assert protocol.invalid_in_a_row == n
    action = protocol.receive(INVALID)
    assert isinstance(action, Close)
    assert action.code == CLOSE_POLICY_VIOLATION == 1008


def test_binary_frames_count_as_invalid() -> None:
    protocol = ConnectionProtocol(Limits(max_invalid_frames=3))
    assert isinstance(protocol.receive(b"{}", binary=True), Reply)
    assert isinstance(protocol.receive(b"{}", binary=True), Reply)
    assert isinstance(protocol.receive(b"{}", binary=True), Close)


def test_a_valid_frame_resets_the_invalid_count() -> None:
    protocol = ConnectionProtocol(Limits())
    for _ in range(49):
        assert isinstance(protocol.receive(INVALID), Reply)
    assert protocol.receive(VALID) == Sync(0)
    assert protocol.invalid_in_a_row == 0
    for _ in range(49):
        assert isinstance(protocol.receive(INVALID), Reply)
    assert isinstance(protocol.receive(INVALID), Close)


def test_max_invalid_frames_is_configurable() -> None:
    protocol = ConnectionProtocol(Limits(max_invalid_frames=2))
    assert protocol.receive(INVALID) == Reply(
        Error("invalid_frame", "Object missing required field `after_id`")
    )
    assert isinstance(protocol.receive(INVALID), Close)
