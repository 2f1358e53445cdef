"""The one place that turns messages and sessions into Redis fields and history rows, and back
(orjson).

Everything read from Redis arrives as bytes and is decoded here, strictly: an entry that is not
valid UTF-8 JSON of the expected shape raises :class:`CorruptEntryError` so the persister can
dead-letter it instead of wedging. History rows (:func:`message_row`, :func:`session_row` and
their inverses) are the SQL stores' common form; a store adapts only what its dialect needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import orjson

from streamstore.errors import CorruptEntryError, HistoryError, ValidationError
from streamstore.models import Message, Session, SessionState, StreamId

__all__ = [
    "MessageRow",
    "SessionRow",
    "decode_feed_entry",
    "decode_message",
    "decode_session_meta",
    "encode_message",
    "encode_metadata",
    "encode_session",
    "message_from_values",
    "message_row",
    "messages_from_rows",
    "session_from_row",
    "session_row",
]

MessageRow = tuple[str, int, int, str, str, str | None, str, str | None, float]
"""A message in history: session id, stream ms, stream seq, message id, sender, recipient,
content, metadata (JSON text or None), timestamp."""
SessionRow = tuple[str, str, float, float, float | None, str, str]
"""A session snapshot in history: id, participants (JSON text), created_at, last_active_at,
ttl, metadata (JSON text), state."""

# Field names inside stream entries.
F_DATA = b"d"
F_KIND = b"k"
F_SESSION = b"s"
F_STREAM_ID = b"i"
KIND_MESSAGE = b"m"
KIND_SESSION = b"s"


def encode_metadata(metadata: object) -> bytes:
    """JSON for a metadata object.

    Raises:
        ValidationError: metadata is not a JSON object with string keys.
    """
    if not isinstance(metadata, dict):
        raise ValidationError(
            f"metadata must be a dict (JSON object), not {type(metadata).__name__}"
        )
    try:
        return orjson.dumps(metadata)
    except TypeError as exc:
        raise ValidationError(f"metadata is not JSON-serializable: {exc}") from None


def encode_message(message: Message) -> bytes:
    """The payload stored in the session stream and the feed (session id and stream id are not
    part of it: they are the stream's own).

    Raises:
        ValidationError: metadata or a text field cannot be encoded (e.g. a lone surrogate).
    """
    body = {
        "id": message.id,
        "from": message.sender,
        "to": message.recipient,
        "c": message.content,
        "meta": message.metadata,
        "ts": message.timestamp,
    }
    try:
        return orjson.dumps(body)
    except TypeError as exc:
        raise ValidationError(f"message {message.id} cannot be encoded: {exc}") from None


def decode_message(session_id: str, stream_id: bytes | StreamId, payload: object) -> Message:
    """Rebuild a message from its payload.

    Raises:
        CorruptEntryError: the payload is not a message (bad UTF-8, bad JSON, wrong types) or
            the stream id is malformed.
    """
    body = _load_object(payload)
    try:
        mid, sender, content = body["id"], body["from"], body["c"]
    except KeyError as exc:
        raise CorruptEntryError(f"message payload lacks field {exc}") from None
    recipient, metadata, ts = body.get("to"), body.get("meta"), body.get("ts", 0.0)
    if not (isinstance(mid, str) and isinstance(sender, str) and isinstance(content, str)):
        raise CorruptEntryError("message id, sender and content must be strings")
    if recipient is not None and not isinstance(recipient, str):
        raise CorruptEntryError("message recipient must be a string or null")
    if metadata is not None and not isinstance(metadata, dict):
        raise CorruptEntryError("message metadata must be an object or null")
    if type(ts) is not float:  # orjson gives float or int; bool is an int to isinstance
        if isinstance(ts, bool) or not isinstance(ts, int):
            raise CorruptEntryError("message timestamp must be a number")
        ts = float(ts)
    sid = stream_id if isinstance(stream_id, StreamId) else _stream_id(stream_id)
    return message_from_values(mid, session_id, sender, content, recipient, metadata, ts, sid)


# Message's fields in declaration order, which message_from_values() sets one by one.
_MESSAGE_FIELDS: Final = (
    "id",
    "session_id",
    "sender",
    "content",
    "recipient",
    "metadata",
    "timestamp",
    "stream_id",
)
_set_id, _set_session, _set_sender, _set_content, _set_recipient, _set_meta, _set_ts, _set_sid = (
    getattr(Message, name).__set__ for name in _MESSAGE_FIELDS
)
_new_object: Final = object.__new__


def message_from_values(  # noqa: PLR0917 - positional: what makes it fast
    message_id: str,
    session_id: str,
    sender: str,
    content: str,
    recipient: str | None,
    metadata: dict[str, Any] | None,
    timestamp: float,
    stream_id: StreamId | None,
) -> Message:
    """``Message(id=message_id, session_id=session_id, ...)`` for values already checked,
    about three times faster: it fills the slots directly, where the frozen dataclass's
    ``__init__`` goes through ``object.__setattr__`` once per field (replay and the persister
    build one message per row). ``tests/test_codec.py`` checks that it sets every field."""
    message: Message = _new_object(Message)
    _set_id(message, message_id)
    _set_session(message, session_id)
    _set_sender(message, sender)
    _set_content(message, content)
    _set_recipient(message, recipient)
    _set_meta(message, metadata)
    _set_ts(message, timestamp)
    _set_sid(message, stream_id)
    return message


def encode_session(session: Session) -> bytes:
    """The session snapshot carried by the feed to the history catalog."""
    return orjson.dumps(
        {
            "participants": list(session.participants),
            "created_at": session.created_at,
            "last_active_at": session.last_active_at,
            "ttl": session.ttl,
            "metadata": session.metadata,
            "state": str(session.state),
        }
    )


def _decode_session(session_id: str, payload: object) -> Session:
    body = _load_object(payload)
    try:
        participants = body["participants"]
        if not isinstance(participants, list) or not all(isinstance(p, str) for p in participants):
            raise CorruptEntryError("session participants must be a list of strings")
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise CorruptEntryError("session metadata must be an object")
        ttl = body.get("ttl")
        return Session(
            id=session_id,
            participants=tuple(participants),
            created_at=float(body["created_at"]),
            last_active_at=float(body.get("last_active_at") or body["created_at"]),
            ttl=None if ttl is None else float(ttl),
            metadata=metadata,
            state=SessionState(body.get("state", "active")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptEntryError(f"session payload is malformed: {type(exc).__name__}") from None


def decode_feed_entry(fields: Mapping[bytes, bytes]) -> Message | Session:
    """Decode the fields of a feed entry as read by XREADGROUP: a message, or a session
    snapshot for the catalog.

    Raises:
        CorruptEntryError: the entry is not a streamstore feed entry.
    """
    try:
        kind, session_raw, payload = fields[F_KIND], fields[F_SESSION], fields[F_DATA]
    except KeyError as exc:
        raise CorruptEntryError(f"feed entry lacks field {exc}") from None
    session_id = _text(session_raw, "session id")
    if kind == KIND_MESSAGE:
        stream_raw = fields.get(F_STREAM_ID)
        if stream_raw is None:
            raise CorruptEntryError("message feed entry lacks its stream id")
        return decode_message(session_id, stream_raw, payload)
    if kind == KIND_SESSION:
        return _decode_session(session_id, payload)
    raise CorruptEntryError(f"unknown feed entry kind {kind!r}")


def decode_session_meta(session_id: str, meta: Mapping[Any, Any]) -> Session:
    """Rebuild a session from its Redis meta hash (as returned by HGETALL).

    Raises:
        CorruptEntryError: the hash is not a streamstore session.
    """
    try:
        participants = orjson.loads(meta[b"participants"])
        metadata = orjson.loads(meta.get(b"metadata", b"{}"))
        ttl_raw = meta.get(b"ttl", b"")
        last_id = meta.get(b"last_id")
        return Session(
            id=session_id,
            participants=tuple(participants),
            created_at=float(meta[b"created_at"]),
            last_active_at=float(meta.get(b"last_active", meta[b"created_at"])),
            ttl=float(ttl_raw) if ttl_raw else None,
            metadata=metadata,
            state=SessionState(meta[b"state"].decode()),
            message_count=int(meta.get(b"count", b"0")),
            last_stream_id=StreamId.parse(last_id) if last_id else None,
        )
    except (KeyError, TypeError, ValueError, orjson.JSONDecodeError) as exc:
        raise CorruptEntryError(f"session meta is malformed: {type(exc).__name__}") from None


def message_row(message: Message) -> MessageRow:
    """A message as a history row (:data:`MessageRow`).

    Raises:
        HistoryError: it has no stream id, or its metadata is not JSON-serializable (the
            text never quotes a value).
    """
    if message.stream_id is None:
        raise HistoryError(f"message {message.id!r} has no stream id; nothing was written")
    ms, seq = message.stream_id
    return (
        message.session_id,
        ms,
        seq,
        message.id,
        message.sender,
        message.recipient,
        message.content,
        None if message.metadata is None else _row_json(message.metadata, message.id),
        float(message.timestamp),
    )


def messages_from_rows(session_id: str, rows: Iterable[Sequence[Any]]) -> list[Message]:
    """Messages of one session from history rows without their session id: (stream ms, stream
    seq, message id, sender, recipient, content, metadata JSON or None, timestamp). One call
    per page, the loop here: replay reads every message of history through it."""
    return [
        message_from_values(
            message_id,
            session_id,
            sender,
            content,
            recipient,
            None if metadata is None else orjson.loads(metadata),
            timestamp,
            StreamId(ms, seq),
        )
        for ms, seq, message_id, sender, recipient, content, metadata, timestamp in rows
    ]


def session_row(session: Session) -> SessionRow:
    """A session snapshot as a history row (:data:`SessionRow`).

    Raises:
        HistoryError: an unknown state, or metadata that is not JSON-serializable.
    """
    try:
        state = SessionState(session.state).value
    except ValueError:
        raise HistoryError(f"session {session.id!r} has an unknown state") from None
    return (
        session.id,
        _row_json(list(session.participants), session.id),
        float(session.created_at),
        float(session.last_active_at),
        None if session.ttl is None else float(session.ttl),
        _row_json(session.metadata, session.id),
        state,
    )


def session_from_row(row: Iterable[Any]) -> Session:
    """A session from a catalog row: (id, participants JSON, created_at, last_active_at, ttl,
    metadata JSON, state, message_count, last_stream_ms, last_stream_seq)."""
    (
        session_id,
        participants,
        created_at,
        last_active_at,
        ttl,
        metadata,
        state,
        message_count,
        last_ms,
        last_seq,
    ) = row
    return Session(
        id=session_id,
        participants=tuple(orjson.loads(participants)),
        created_at=created_at,
        last_active_at=last_active_at,
        ttl=ttl,
        metadata=orjson.loads(metadata),
        state=SessionState(state),
        message_count=message_count,
        last_stream_id=None if last_ms is None else StreamId(last_ms, last_seq),
    )


def _row_json(value: object, owner: str) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError; its text may quote the value, so drop it
        raise HistoryError(f"metadata of {owner!r} is not JSON-serializable") from None


def _load_object(payload: object) -> dict[str, Any]:
    if not isinstance(payload, (bytes, str)):  # a tuple: `bytes | str` is built at every call
        raise CorruptEntryError("payload is not text")
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise CorruptEntryError("payload is not valid UTF-8 JSON") from None
    if not isinstance(body, dict):
        raise CorruptEntryError("payload is not a JSON object")
    return body


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptEntryError(f"{what} is not valid UTF-8") from None


def _stream_id(raw: bytes) -> StreamId:
    ms, dash, seq = raw.partition(b"-")
    if not (dash and ms.isdigit() and seq.isdigit()):  # isdigit: int() would take " +1_0"
        raise CorruptEntryError("stream id is malformed")
    return StreamId(int(ms), int(seq))
