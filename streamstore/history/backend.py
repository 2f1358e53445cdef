"""What the history backends share, so that each holds only its own dialect (SQL, schema and
migrations; files; scripts; driver and error codes): the retention driver with the backend's
passes as hooks, the reading of URL options, and durations. Rows are encoded and decoded by
:mod:`streamstore.codec` (:func:`~streamstore.codec.message_row` and its kin).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Collection
from datetime import timedelta
from urllib.parse import SplitResult, parse_qsl, urlsplit

from streamstore.errors import ConfigurationError
from streamstore.history import RetentionResult, check_retention_limits

__all__ = ["RetentionDriver", "number_option", "seconds", "split_url"]


class RetentionDriver(abc.ABC):
    """The retention driver of a history backend: the passes, in order, each the backend's own.

    A backend implements the three passes; each deletes in bounded transactions and keeps
    message counts exact, so a pass that fails half-way is finished by the next one.
    """

    async def enforce_retention(
        self,
        *,
        older_than: float | None = None,
        max_messages_per_session: int | None = None,
        max_sessions: int | None = None,
    ) -> RetentionResult:
        """Delete what the retention policy no longer keeps and say how much; idempotent.

        See :meth:`streamstore.history.HistoryStore.enforce_retention`. The catalog cap goes
        first (what it removes needs no other pass), then age, then the per-session cap.
        When more sessions are active than ``max_sessions`` allows, every ended session goes
        and the catalog stays above the cap.

        Raises:
            ValidationError: a limit is negative or not a number.
            HistoryError: the store is not open or failed (the backend says which); what was
                committed before stays deleted.
        """
        check_retention_limits(older_than, max_messages_per_session, max_sessions)
        self._require_open()
        messages = sessions = 0
        if max_sessions is not None:
            messages, sessions = await self._remove_sessions_beyond(max_sessions)
        if older_than is not None:
            messages += await self._delete_older_than(float(older_than))
        if max_messages_per_session is not None:
            messages += await self._cap_sessions(max_messages_per_session)
        return RetentionResult(messages=messages, sessions=sessions)

    @abc.abstractmethod
    def _require_open(self) -> None:
        """Raise HistoryError unless the store is open."""

    @abc.abstractmethod
    async def _remove_sessions_beyond(self, cap: int) -> tuple[int, int]:
        """Remove the least recently active ended sessions until ``cap`` remain (or no ended
        one does); return (messages deleted, sessions removed)."""

    @abc.abstractmethod
    async def _delete_older_than(self, older_than: float) -> int:
        """Delete the messages whose timestamp is below ``older_than``; return how many."""

    @abc.abstractmethod
    async def _cap_sessions(self, cap: int) -> int:
        """Delete the oldest messages of every session holding more than ``cap``; return how
        many."""


def split_url(
    url: str, *, schemes: Collection[str], usage: str, known: Collection[str] = ()
) -> tuple[SplitResult, dict[str, str], list[tuple[str, str]]]:
    """A history URL's parts, its ``known`` query options (each at most once) and the others
    in their order.

    Raises:
        ConfigurationError: the URL is malformed, has another scheme or a fragment, or gives
            a known option twice.
    """
    scheme = next(iter(schemes))
    try:
        parts = urlsplit(url)
        options = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ConfigurationError(f"malformed {scheme} history URL: {usage}") from None
    if parts.scheme not in schemes:
        raise ConfigurationError(f"not a {scheme} URL: {usage}")
    if parts.fragment:
        raise ConfigurationError(f"a {scheme} URL has no #fragment: {usage}")
    ours: dict[str, str] = {}
    theirs: list[tuple[str, str]] = []
    for name, value in options:
        if name not in known:
            theirs.append((name, value))
        elif name in ours:
            raise ConfigurationError(f"{scheme} URL option {name!r} given twice")
        else:
            ours[name] = value
    return parts, ours, theirs


def number_option(name: str, text: str, *, whole: bool) -> float:
    """A URL option's number: whole, or finite.

    Raises:
        ConfigurationError: it does not parse or is not finite.
    """
    try:
        value = int(text) if whole else float(text)
    except ValueError:
        kind = "a whole number" if whole else "a number of seconds"
        raise ConfigurationError(f"{name} must be {kind}, got {text[:20]!r}") from None
    if not math.isfinite(value):
        raise ConfigurationError(f"{name} must be finite, got {text[:20]!r}")
    return value


def seconds(name: str, value: float | timedelta, *, allow_zero: bool = False) -> float:
    """A duration in seconds, up to a day (more than 0 unless ``allow_zero``).

    Raises:
        ConfigurationError: not a number, or out of that range.
    """
    if isinstance(value, timedelta):
        value = value.total_seconds()
    number = not isinstance(value, bool) and isinstance(value, int | float)
    low, bound = (
        (0.0, "0 to 86400 s") if allow_zero else (math.ulp(0.0), "more than 0, at most 86400 s")
    )
    if not number or not low <= value <= 86_400:
        raise ConfigurationError(f"{name} must be {bound}, got {value!r}")
    return float(value)
