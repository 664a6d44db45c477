"""The wire frames: codecs round-trip, and decoding never fails in an undocumented way."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import msgspec
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pmhub.errors import Rejected
from pmhub.frames import (
    MAX_DEPTH,
    MAX_SAFE_INT,
    ClientFrame,
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
    UserOnlineStatus,
    decode_client_frame,
    decode_server_frame,
    encode,
)

CLIENT_FRAMES = (SendMessage, SetTyping, MarkRead, Sync)

# -- strategies built from the Structs ------------------------------------------------

ids = st.integers(min_value=-MAX_SAFE_INT, max_value=MAX_SAFE_INT)
# Hypothesis' default alphabet has no surrogates, so this is any text JSON can carry.
texts = st.text()
client_ids = st.none() | st.text(min_size=1, max_size=128)
times = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(9999, 1, 1), timezones=st.just(timezone.utc)
)
seconds = st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False)

messages = st.builds(
    Message,
    id=ids,
    content=texts,
    sender_id=ids,
    receiver_id=ids,
    created_at=times,
    is_read=st.booleans(),
    client_id=client_ids,
)

client_frames: st.SearchStrategy[ClientFrame] = st.one_of(
    st.builds(SendMessage, recipient_id=ids, content=texts, client_id=client_ids),
    st.builds(SetTyping, recipient_id=ids, is_typing=st.booleans()),
    st.builds(MarkRead, peer_id=ids, up_to_id=ids),
    st.builds(Sync, after_id=ids),
)

server_frames: st.SearchStrategy[ServerFrame] = st.one_of(
    st.builds(System, message=texts),
    st.builds(PrivateMessage, sender_id=ids, recipient_id=ids, message=messages),
    st.builds(TypingIndicator, user_id=ids, recipient_id=ids, is_typing=st.booleans()),
    st.builds(UserOnlineStatus, user_id=ids, is_online=st.booleans()),
    st.builds(MessagesRead, reader_id=ids, peer_id=ids, up_to_id=ids),
    st.builds(SyncComplete, last_id=ids, has_more=st.booleans()),
    st.builds(
        Error,
        code=texts,
        message=texts,
        client_id=st.none() | texts,
        retry_after=st.none() | seconds,
    ),
)

# JSON values shaped like frames: a known or unknown type, fields of any JSON type.
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)
field_names = st.sampled_from(
    [
        *["type", "recipient_id", "content", "client_id", "is_typing", "peer_id", "up_to_id"],
        *["after_id", "user_id"],
    ]
)
frame_types = st.sampled_from(
    ["private_message", "typing_indicator", "mark_read", "sync", "system", "error", "x"]
)
frame_like = st.builds(
    lambda fields, type_: {**fields, "type": type_} if type_ is not None else fields,
    st.dictionaries(field_names, json_values, max_size=5),
    st.none() | frame_types | json_values,
)


def assert_invalid(data: str | bytes) -> Rejected:
    with pytest.raises(Rejected) as info:
        decode_client_frame(data)
    assert info.value.code == "invalid_frame"
    assert info.value.status == 400
    assert info.value.message
    return info.value


# -- round trips ----------------------------------------------------------------------------


@given(client_frames)
def test_client_frames_round_trip(frame: ClientFrame) -> None:
    data = encode(frame)
    assert decode_client_frame(data) == frame
    assert decode_client_frame(data.decode()) == frame


@given(server_frames)
def test_server_frames_round_trip(frame: ServerFrame) -> None:
    data = encode(frame)
    assert decode_server_frame(data) == frame
    assert json.loads(data)["type"] == type(frame).__struct_config__.tag


# -- decoding anything ----------------------------------------------------------------------


def decodes_or_is_invalid(data: str | bytes) -> None:
    try:
        frame = decode_client_frame(data)
    except Rejected as exc:
        assert exc.code == "invalid_frame"
    else:
        assert isinstance(frame, CLIENT_FRAMES)


@given(st.binary())
@example(b"")
@example(b"\xff")
@example(b"[" * 100_000)
@example(b'{"type":"sync","after_id":1}\x00')
def test_any_bytes_decode_or_are_invalid_frame(data: bytes) -> None:
    decodes_or_is_invalid(data)


@given(st.text(alphabet=st.characters(codec=None, categories=None)))
@example("\ud800")
@example('{"type":"sync","after_id":1,"x":"\udfff"}')
def test_any_text_decodes_or_is_invalid_frame(data: str) -> None:
    decodes_or_is_invalid(data)


@given(frame_like)
def test_frame_shaped_json_decodes_or_is_invalid_frame(value: object) -> None:
    decodes_or_is_invalid(json.dumps(value))
    decodes_or_is_invalid(json.dumps(value).encode())


# -- each invalid_frame cause of the protocol ---------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param("", id="empty"),
        pytest.param("hello", id="not-json"),
        pytest.param('{"type":"sync","after_id":1', id="truncated"),
        pytest.param('{"type":"sync","after_id":1} {}', id="trailing-data"),
        pytest.param(b"\xff\xfe{}", id="not-utf8"),
    ],
)
def test_not_json_is_invalid(data: str | bytes) -> None:
    assert_invalid(data)


@pytest.mark.parametrize("data", ["[]", "1", '"sync"', "null", "true", '[{"type":"sync"}]'])
def test_not_an_object_is_invalid(data: str) -> None:
    assert "object" in assert_invalid(data).message


@pytest.mark.parametrize(
    "data",
    [
        '{"type":"user_online_status","user_id":1,"is_online":true}',
        '{"type":"PRIVATE_MESSAGE","recipient_id":1,"content":"x"}',
        '{"type":"","after_id":1}',
        '{"type":1,"after_id":1}',
    ],
)
def test_unknown_type_is_invalid(data: str) -> None:
    assert_invalid(data)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ('{"after_id":1}', "type"),
        ('{"type":"sync"}', "after_id"),
        ('{"type":"private_message","content":"x"}', "recipient_id"),
        ('{"type":"private_message","recipient_id":2}', "content"),
        ('{"type":"typing_indicator","recipient_id":2}', "is_typing"),
        ('{"type":"mark_read","peer_id":2}', "up_to_id"),
    ],
)
def test_missing_field_is_invalid(data: str, field: str) -> None:
    assert f"`{field}`" in assert_invalid(data).message


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ('{"type":"sync","after_id":"1"}', "$.after_id"),
        ('{"type":"sync","after_id":true}', "$.after_id"),
        ('{"type":"sync","after_id":1.0}', "$.after_id"),
        ('{"type":"sync","after_id":null}', "$.after_id"),
        ('{"type":"private_message","recipient_id":2,"content":5}', "$.content"),
        ('{"type":"private_message","recipient_id":2,"content":"x","client_id":7}', "$.client_id"),
        ('{"type":"private_message","recipient_id":2,"content":"x","client_id":""}', "$.client_id"),
        ('{"type":"typing_indicator","recipient_id":2,"is_typing":1}', "$.is_typing"),
        ('{"type":"typing_indicator","recipient_id":2,"is_typing":"true"}', "$.is_typing"),
        ('{"type":"mark_read","peer_id":[2],"up_to_id":3}', "$.peer_id"),
    ],
)
def test_ill_typed_field_is_invalid_and_names_the_path(data: str, path: str) -> None:
    assert f"`{path}`" in assert_invalid(data).message


def test_client_id_up_to_128_characters() -> None:
    longest = "\U0001f600" * 128
    frame = decode_client_frame(
        json.dumps(
            {"type": "private_message", "recipient_id": 2, "content": "x", "client_id": longest}
        )
    )
    assert frame == SendMessage(2, "x", longest)
    assert_invalid(
        json.dumps(
            {
                "type": "private_message",
                "recipient_id": 2,
                "content": "x",
                "client_id": longest + "a",
            }
        )
    )


def nested(depth: int) -> str:
    """A sync frame whose ignored field makes the document ``depth`` levels deep."""
    inner = depth - 1  # the frame object itself is the first level
    return '{"type":"sync","after_id":1,"x":' + "[" * inner + "]" * inner + "}"


def test_nesting_up_to_32_levels_is_accepted() -> None:
    assert decode_client_frame(nested(MAX_DEPTH)) == Sync(1)
    mixed = '{"type":"sync","after_id":1,"x":' + '{"a":[' * 15 + "{}" + "]}" * 15 + "}"
    assert decode_client_frame(mixed) == Sync(1)


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1000, 100_000])
def test_nesting_deeper_than_32_levels_is_invalid(depth: int) -> None:
    assert "nested" in assert_invalid(nested(depth)).message


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    content = '[{"' + "[" * 100 + '\\" {'
    data = json.dumps({"type": "private_message", "recipient_id": 2, "content": content})
    assert data.count("[") > MAX_DEPTH
    assert decode_client_frame(data) == SendMessage(2, content)


tricky_strings = st.text(alphabet='[]{}"\\ a\u00e9', max_size=6)


@given(
    depth=st.integers(min_value=MAX_DEPTH - 3, max_value=MAX_DEPTH + 3),
    wrappers=st.lists(st.tuples(st.booleans(), tricky_strings), min_size=MAX_DEPTH + 3),
    leaf=tricky_strings,
)
def test_depth_limit_counts_only_real_nesting(
    depth: int, wrappers: list[tuple[bool, str]], leaf: str
) -> None:
    value: object = leaf
    for as_list, text in wrappers[: depth - 1]:
        value = [text, value] if as_list else {text: value}
    data = json.dumps({"type": "sync", "after_id": 1, "x": value}, ensure_ascii=False)
    if depth <= MAX_DEPTH:
        assert decode_client_frame(data) == Sync(1)
    else:
        assert_invalid(data)


@pytest.mark.parametrize(
    "tail",
    [b'"' + b'\\"' * 32_000, b'"' + b'\\"' * 32_000 + b"\\", b'"' * 64_000, b'"a\\' * 21_000],
)
def test_depth_check_is_linear_on_unterminated_strings(tail: bytes) -> None:
    # Once quadratic: a 64 KiB frame like these blocked the event loop for ~20 s.
    data = b"[" * (MAX_DEPTH + 1) + tail
    start = time.perf_counter()
    assert_invalid(data)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("value", [MAX_SAFE_INT, -MAX_SAFE_INT, 0])
def test_integers_within_2_pow_53_are_accepted(value: int) -> None:
    assert decode_client_frame(f'{{"type":"sync","after_id":{value}}}') == Sync(value)


@pytest.mark.parametrize(
    "value", [MAX_SAFE_INT + 1, -MAX_SAFE_INT - 1, 2**63, 2**64, 10**30, -(10**30), "1e400"]
)
def test_integers_outside_2_pow_53_are_invalid(value: int | str) -> None:
    assert_invalid(f'{{"type":"mark_read","peer_id":2,"up_to_id":{value}}}')


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "nan", "inf"])
def test_nan_and_infinity_are_invalid(value: str) -> None:
    assert_invalid(f'{{"type":"sync","after_id":{value}}}')
    assert_invalid(f'{{"type":"sync","after_id":1,"x":{value}}}')


@pytest.mark.parametrize(
    "content",
    [
        "\\ud800",  # a lone high surrogate escape
        "\\udfff",  # a lone low surrogate escape
        "a\\ud800b",
        "\\udc00\\ud800",  # a reversed pair
    ],
)
def test_lone_surrogate_escape_is_invalid(content: str) -> None:
    data = '{"type":"private_message","recipient_id":2,"content":"' + content + '"}'
    assert_invalid(data)
    assert_invalid(data.encode())


def test_lone_surrogate_in_text_is_invalid() -> None:
    assert_invalid('{"type":"private_message","recipient_id":2,"content":"\ud800"}')


def test_surrogate_pair_escape_is_one_character() -> None:
    frame = decode_client_frame(
        '{"type":"private_message","recipient_id":2,"content":"\\ud83d\\ude00"}'
    )
    assert frame == SendMessage(2, "\U0001f600")


def test_unknown_fields_are_ignored() -> None:
    data = (
        '{"type":"typing_indicator","recipient_id":2,"is_typing":true,'
        '"user_id":99,"extra":{"deep":[1,2,{"x":null}]},"n":1.5}'
    )
    assert decode_client_frame(data) == SetTyping(2, True)


def test_decoded_frames_are_the_documented_types() -> None:
    assert decode_client_frame(
        '{"type":"private_message","recipient_id":2,"content":"hi","client_id":"c-1"}'
    ) == SendMessage(2, "hi", "c-1")
    assert decode_client_frame(
        '{"type":"private_message","recipient_id":2,"content":"hi"}'
    ) == SendMessage(2, "hi", None)
    assert decode_client_frame(
        '{"type":"typing_indicator","recipient_id":2,"is_typing":false}'
    ) == (SetTyping(2, False))
    assert decode_client_frame('{"type":"mark_read","peer_id":2,"up_to_id":9}') == MarkRead(2, 9)
    assert decode_client_frame(b'{"type":"sync","after_id":0}') == Sync(0)


# -- encoding -------------------------------------------------------------------------------


def test_message_encodes_with_the_documented_fields() -> None:
    message = Message(789, "Hello!", 123, 456, datetime(2024, 1, 1, 12, tzinfo=timezone.utc))
    assert json.loads(encode(PrivateMessage(123, 456, message))) == {
        "type": "private_message",
        "sender_id": 123,
        "recipient_id": 456,
        "message": {
            "id": 789,
            "content": "Hello!",
            "sender_id": 123,
            "receiver_id": 456,
            "created_at": "2024-01-01T12:00:00Z",
            "is_read": False,
            "client_id": None,
        },
    }


def test_content_is_encoded_byte_exact() -> None:
    content = '<script>alert("x")</script> \x00 \u2028 \U0001f600 \\'
    message = Message(1, content, 1, 2, datetime(2024, 1, 1, tzinfo=timezone.utc))
    assert json.loads(encode(message))["content"] == content


def test_error_omits_client_id_and_retry_after_when_none() -> None:
    assert json.loads(encode(Error("forbidden", "no"))) == {
        "type": "error",
        "code": "forbidden",
        "message": "no",
    }
    assert json.loads(encode(Error("rate_limited", "slow down", "c-1", 0.25))) == {
        "type": "error",
        "code": "rate_limited",
        "message": "slow down",
        "client_id": "c-1",
        "retry_after": 0.25,
    }
    assert "retry_after" not in json.loads(encode(Error("too_long", "long", "c-2")))


def test_outgoing_is_encoded_once_and_shared() -> None:
    message = Message(5, "hi", 1, 2, datetime(2024, 1, 1, tzinfo=timezone.utc))
    outgoing = Outgoing.of(PrivateMessage(1, 2, message))
    assert outgoing.message_id == 5
    assert decode_server_frame(outgoing.data) == PrivateMessage(1, 2, message)
    assert outgoing.data is outgoing.data
    assert outgoing.text is outgoing.text
    assert outgoing.text == outgoing.data.decode()


@pytest.mark.parametrize(
    "frame",
    [System("welcome"), UserOnlineStatus(1, True), SyncComplete(3, False), Error("x", "y")],
)
def test_outgoing_other_frames_have_no_message_id(frame: ServerFrame) -> None:
    outgoing = Outgoing.of(frame)
    assert outgoing.message_id is None
    assert msgspec.json.decode(outgoing.data) == msgspec.to_builtins(frame)
