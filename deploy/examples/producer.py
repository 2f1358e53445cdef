"""Example producer: opens a session and publishes a numbered message every ``--interval``
seconds, then closes the session. It needs only the ``producer`` ACL user (deploy/users.acl).

Configuration comes from the environment like every streamstore process
(``STREAMSTORE_REDIS_URL=redis://producer:PASSWORD@redis:6379/0`` and so on). It prints ids and
counts only, never message content.

    python deploy/examples/producer.py --count 10 --interval 0.5
"""

from __future__ import annotations

import argparse
import itertools
import logging
import signal

import anyio

from streamstore import StreamStore

log = logging.getLogger("producer")


async def produce(count: int | None, interval: float) -> int:
    """Publish ``count`` messages (None: until stopped) into a new session; return how many."""
    published = 0
    async with StreamStore.open() as store:
        session = await store.create_session(["example-producer"], ttl=600)
        log.info("session %s opened", session.id)
        numbers = itertools.count(1) if count is None else range(1, count + 1)
        try:
            for n in numbers:
                message = await store.publish(
                    session.id, sender="example-producer", content=f"message {n}"
                )
                published += 1
                log.info("published session=%s stream_id=%s", session.id, message.stream_id)
                await anyio.sleep(interval)
        finally:
            with anyio.CancelScope(shield=True):
                await store.close_session(session.id)
                log.info("session %s closed after %d messages", session.id, published)
    return published


async def run(count: int | None, interval: float) -> None:
    """Publish until done or until SIGTERM/SIGINT (then the session is closed cleanly)."""
    async with anyio.create_task_group() as tg:

        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(stop_on_signal)
        await produce(count, interval)
        tg.cancel_scope.cancel()


def main() -> None:
    """Parse the arguments and publish."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, help="messages to publish (default: no limit)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between messages")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    anyio.run(run, args.count, args.interval)


if __name__ == "__main__":
    main()
