"""Jepsen-style counting for fault tests: what was acknowledged against what history holds.

Every fault scenario ends with a :class:`Tally` and asserts on its counts; when
``STREAMSTORE_RELIABILITY_OUT`` names a file, each scenario's row is appended to it as JSON so
``scripts/reliability_report.py`` can build RELIABILITY.md from a real run.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from streamstore import Message


@dataclass
class Tally:
    """Counts for one scenario."""

    scenario: str
    fault: str
    injection: str
    server: str = ""
    acknowledged: int = 0
    persisted: int = 0
    lost: int = 0
    duplicated: int = 0
    unexpected: int = 0
    recovery_s: float | None = None
    notes: dict[str, object] = field(default_factory=dict)

    def count(
        self,
        acknowledged: Iterable[Message],
        stored: Iterable[Message],
        *,
        attempted_ids: Iterable[str] = (),
    ) -> Tally:
        """Compare acknowledged messages with stored ones. Messages whose publish raised (so
        were never acknowledged) may legitimately be stored: pass their ids as
        ``attempted_ids`` so they are not counted as unexpected."""
        acked = {m.id for m in acknowledged}
        counts = Counter(m.id for m in stored)
        allowed = acked | set(attempted_ids)
        self.acknowledged = len(acked)
        self.persisted = sum(1 for mid in counts if mid in acked)
        self.lost = len(acked - set(counts))
        self.duplicated = sum(n - 1 for n in counts.values() if n > 1)
        self.unexpected = len(set(counts) - allowed)
        return self

    def assert_exactly_once(self) -> None:
        """lost = duplicated = unexpected = 0; a named scenario's row is recorded first."""
        if self.scenario:
            record(self)
        assert (self.lost, self.duplicated, self.unexpected) == (0, 0, 0), asdict(self)


def record(tally: Tally) -> None:
    """Append the scenario's row to $STREAMSTORE_RELIABILITY_OUT, if set."""
    out = os.environ.get("STREAMSTORE_RELIABILITY_OUT")
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(tally)) + "\n")
