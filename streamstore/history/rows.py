"""What every history store shares: the session catalog row of the SQL stores, and the checks
of the protocol's retention arguments."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import orjson

from streamstore.errors import ValidationError
from streamstore.models import Session, SessionState, StreamId

__all__ = ["check_retention_limits", "session_from_row"]


def session_from_row(row: Iterable[Any]) -> Session:
    """A catalog row (id, participants JSON, created_at, last_active_at, ttl, metadata JSON,
    state, message_count, last_stream_ms, last_stream_seq) as a Session."""
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


def check_retention_limits(
    older_than: float | None, max_messages_per_session: int | None, max_sessions: int | None
) -> None:
    """Refuse retention limits that are not numbers of the right kind.

    Raises:
        ValidationError: ``older_than`` is not a timestamp, or a cap is not a whole number of
            at least 0.
    """
    if older_than is not None and (
        isinstance(older_than, bool)
        or not isinstance(older_than, int | float)
        or math.isnan(older_than)
    ):
        raise ValidationError("older_than must be a timestamp in seconds")
    for name, value in (
        ("max_messages_per_session", max_messages_per_session),
        ("max_sessions", max_sessions),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValidationError(f"{name} must be a whole number")
        if value is not None and value < 0:
            raise ValidationError(f"{name} must be 0 or more, got {value}")
