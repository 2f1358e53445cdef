"""The README's example runs as written; the public surface is exactly what __all__ says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import redis.asyncio

import streamstore

ROOT = Path(__file__).resolve().parent.parent


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    return next(block for block in blocks if "anyio.run(main)" in block)


def test_readme_example_runs(
    redis_url: str, key_prefix: str, tmp_path: Path, raw: redis.asyncio.Redis
) -> None:
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    env = dict(os.environ)
    env.update(
        STREAMSTORE_REDIS_URL=redis_url,
        STREAMSTORE_HISTORY_URL=f"sqlite:///{tmp_path}/example.db",
        STREAMSTORE_KEY_PREFIX=key_prefix,
    )
    result = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "echo: hello"
    assert [line.split(" ", 1)[1] for line in lines[1:]] == ["alice hello", "bot echo: hello"]


def test_exported_members() -> None:
    exported = {
        name
        for name in dir(streamstore)
        if not name.startswith("_") and not isinstance(getattr(streamstore, name), ModuleType)
    }
    assert exported == set(streamstore.__all__)
    for name in streamstore.__all__:
        assert getattr(streamstore, name).__module__.startswith("streamstore.")


INSTALLED_FILES = ("*.md", "*.py", "*.toml", "*.yaml", "*.service", "*.example", "Dockerfile")


def test_no_instruction_installs_the_unrelated_streamstore_from_the_index() -> None:
    """`streamstore` on the public package index is somebody else's project: nothing here may
    tell anyone to install it by that name (a dependency-confusion trap)."""
    assert 'name = "streamstore"' not in (ROOT / "pyproject.toml").read_text()
    by_name = re.compile(r"pip install\s+(?:-\S+\s+)*['\"]?streamstore(?:\[|['\"]?(?:\s|$))")
    offenders = []
    for pattern in INSTALLED_FILES:
        for path in ROOT.rglob(pattern):
            if ".venv" in path.parts or ".git" in path.parts:
                continue
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if by_name.search(line) and "test_no_instruction" not in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders


@pytest.mark.slow
def test_demo_runs_on_an_embedded_server_it_starts_itself(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSTORE_")}
    result = subprocess.run(
        [sys.executable, "-m", "streamstore", "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = next(line for line in result.stdout.splitlines() if line.startswith("summary:"))
    published = int(re.search(r"published=(\d+)", summary).group(1))  # type: ignore[union-attr]
    persisted = int(re.search(r"persisted=(\d+)", summary).group(1))  # type: ignore[union-attr]
    assert published == persisted > 0
    assert "replay matches live=True" in summary
    assert (tmp_path / "streamstore.db").stat().st_mode & 0o777 == 0o600
