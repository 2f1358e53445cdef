"""Every Redis key, without a server: a session's keys and its partition's share one cluster
slot, partitions are stable, and a valid session id cannot change what key it lands in."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from streamstore.keys import GROUP, Keyspace
from streamstore.models import ID_PATTERN

SESSION_IDS = st.from_regex(ID_PATTERN, fullmatch=True)


@given(SESSION_IDS)
def test_a_session_and_its_partition_share_one_slot(session_id: str) -> None:
    keys = Keyspace("ss", 16)
    session = keys.session(session_id)
    partition = session.partition
    slots = {
        key_slot(key.encode())
        for key in (
            session.meta,
            session.stream,
            session.feed,
            session.index,
            session.deadlines,
            keys.dedup(partition, 7),
            keys.deferred(partition),
            keys.closing(partition),
        )
    }
    assert len(slots) == 1  # one script may touch them all, on a cluster too


@given(SESSION_IDS)
def test_the_partition_is_a_stable_hash(session_id: str) -> None:
    keys = Keyspace("ss", 16)
    assert keys.partition_of(session_id) == zlib.crc32(session_id.encode()) % 16
    assert (
        keys.session(session_id).stream == f"ss:{{p{keys.partition_of(session_id)}}}:s:{session_id}"
    )


@given(SESSION_IDS)
def test_a_valid_id_stays_inside_its_key(session_id: str) -> None:
    keys = Keyspace("ss", 4)
    stream = keys.session(session_id).stream
    assert stream.startswith(keys.stream_prefix(keys.partition_of(session_id)))
    assert not any(c in session_id for c in "{}*?[]: ")


@pytest.mark.parametrize("partitions", [1, 4, 16])
def test_every_feed_is_listed_once_in_partition_order(partitions: int) -> None:
    keys = Keyspace("sst", partitions)
    assert keys.feeds() == [keys.feed(p) for p in range(partitions)]
    assert len(set(keys.feeds())) == partitions
    assert keys.pattern == "sst:*"
    assert all(key.startswith("sst:") for key in (keys.dead_letters, keys.deployment, keys.workers))
    assert GROUP == "persisters"
