"""The codec's decoding: strict about what it accepts, and its fast Message constructor exact."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from streamstore import codec
from streamstore.codec import (
    decode_feed_entry,
    decode_message,
    encode_message,
    encode_session,
    message_from_values,
)
from streamstore.errors import CorruptEntryError
from streamstore.models import Message, Session, SessionState, StreamId


def feed_fields(message: Message, stream_id: bytes = b"1700000000000-7") -> dict[bytes, bytes]:
    """The fields the publish script writes to a feed for ``message``."""
    return {
        b"k": b"m",
        b"s": message.session_id.encode(),
        b"i": stream_id,
        b"d": encode_message(message),
    }


def sample(**changes: object) -> Message:
    values: dict[str, object] = {
        "id": "m-1",
        "session_id": "s-1",
        "sender": "agent-1",
        "content": "hello",
        "recipient": "agent-2",
        "metadata": {"k": [1, 2]},
        "timestamp": 1700000000.25,
    }
    return Message(**(values | changes))  # type: ignore[arg-type]


def test_message_from_values_knows_every_field_of_message() -> None:
    # A field added to Message must be added to the fast constructor too.
    assert tuple(f.name for f in dataclasses.fields(Message)) == codec._MESSAGE_FIELDS


def test_message_from_values_builds_what_the_constructor_builds() -> None:
    expected = sample(stream_id=StreamId(5, 6))
    built = message_from_values(
        "m-1", "s-1", "agent-1", "hello", "agent-2", {"k": [1, 2]}, 1700000000.25, StreamId(5, 6)
    )
    assert type(built) is Message
    for field in dataclasses.fields(Message):  # every slot set (an unset one would raise)
        assert getattr(built, field.name) == getattr(expected, field.name)
    assert built == expected
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.content = "changed"  # type: ignore[misc]


def test_feed_entry_of_a_message_decodes_to_that_message() -> None:
    message = sample()
    decoded = decode_feed_entry(feed_fields(message))
    assert decoded == dataclasses.replace(message, stream_id=StreamId(1700000000000, 7))


def test_integer_timestamp_becomes_a_float() -> None:
    payload = orjson.dumps({"id": "m", "from": "a", "c": "x", "ts": 12})
    decoded = decode_message("s", b"1-1", payload)
    assert decoded.timestamp == 12.0
    assert type(decoded.timestamp) is float


def test_feed_entry_of_a_session_decodes_to_that_session() -> None:
    session = Session(id="s-1", participants=("a", "b"), created_at=3.0, state=SessionState.CLOSED)
    fields = {b"k": b"s", b"s": b"s-1", b"d": encode_session(session)}
    decoded = decode_feed_entry(fields)
    assert isinstance(decoded, Session)
    assert (decoded.id, decoded.participants, decoded.state) == ("s-1", ("a", "b"), "closed")


@pytest.mark.parametrize(
    "stream_id", [b"", b"12", b"1-", b"-1", b"1-x", b" 1-2", b"+1-2", b"1_0-2", b"1-2 ", b"\xff-1"]
)
def test_malformed_stream_id_is_refused(stream_id: bytes) -> None:
    with pytest.raises(CorruptEntryError, match="stream id"):
        decode_feed_entry(feed_fields(sample(), stream_id))


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"from": "a", "c": "x"}, "lacks field"),
        ({"id": 1, "from": "a", "c": "x"}, "must be strings"),
        ({"id": "m", "from": "a", "c": "x", "to": 5}, "recipient"),
        ({"id": "m", "from": "a", "c": "x", "meta": [1]}, "metadata"),
        ({"id": "m", "from": "a", "c": "x", "ts": True}, "timestamp"),
        ({"id": "m", "from": "a", "c": "x", "ts": "1"}, "timestamp"),
        ([1, 2], "not a JSON object"),
    ],
)
def test_payload_of_the_wrong_shape_is_refused(body: object, reason: str) -> None:
    with pytest.raises(CorruptEntryError, match=reason):
        decode_message("s", b"1-1", orjson.dumps(body))


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({b"k": b"m", b"s": b"s"}, "lacks field"),
        ({b"k": b"m", b"s": b"s", b"d": b"{}"}, "lacks its stream id"),
        ({b"k": b"m", b"s": b"\xff", b"i": b"1-1", b"d": b"{}"}, "session id"),
        ({b"k": b"m", b"s": b"s", b"i": b"1-1", b"d": b"\xff\xfe"}, "UTF-8 JSON"),
        ({b"k": b"?", b"s": b"s", b"d": b"{}"}, "unknown feed entry kind"),
    ],
)
def test_feed_entry_that_is_not_ours_is_refused(fields: dict[bytes, bytes], reason: str) -> None:
    with pytest.raises(CorruptEntryError, match=reason):
        decode_feed_entry(fields)


def test_payload_that_is_not_text_is_refused() -> None:
    with pytest.raises(CorruptEntryError, match="not text"):
        decode_message("s", b"1-1", None)
