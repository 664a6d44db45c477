"""The websockets adapter's own framing: what it writes is what the library would."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode

from pmhub.adapters.websockets import _text_header


@given(st.integers(min_value=0, max_value=2**20))
@example(125)
@example(126)
@example(65535)
@example(65536)
def test_text_frames_are_framed_as_the_library_frames_them(length: int) -> None:
    data = b"x" * length
    expected = Frame(Opcode.TEXT, data).serialize(mask=False, extensions=[])
    assert _text_header(length) + data == expected
