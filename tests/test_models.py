"""Generated message ids: unique and ascending in a process, and in a forked child too."""

from __future__ import annotations

import os
import warnings

from streamstore.models import new_message_id


def test_generated_ids_ascend() -> None:
    ids = [new_message_id() for _ in range(10_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_child_generates_ids_of_its_own() -> None:
    """Publishing skips the dedup lookup for generated ids, so a child must not go on with
    its parent's clock and node id (it would generate the parent's next ids)."""
    parent = new_message_id()
    read, write = os.pipe()
    with warnings.catch_warnings():  # Python >= 3.12 warns of fork() in a threaded process
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: report one id and leave at once
        os.write(write, new_message_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == len(parent) == 26
    assert child[16:] != parent[16:]  # the node part
