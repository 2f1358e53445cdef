"""Fault-suite fixtures: a Tally factory that knows which server the test runs against."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.faults.tally import Tally


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> Callable[[str, str, str], Tally]:
    callspec = getattr(request.node, "callspec", None)
    server = "system" if callspec is not None and "system" in callspec.id else "embedded"

    def make(scenario: str, fault: str, injection: str) -> Tally:
        return Tally(scenario, fault, injection, server=server)

    return make
