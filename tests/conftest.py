"""Shared fixtures: every async test runs on asyncio and on trio."""

from __future__ import annotations

import os
import socket

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def require_service(name: str, host: str, port: int) -> None:
    """Skip (or fail under ``PMHUB_REQUIRE_SERVICES=1``) unless ``host:port`` answers."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return
    except OSError as exc:
        reason = f"{name} is not answering on {host}:{port} ({exc})"
    if os.environ.get("PMHUB_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason}; PMHUB_REQUIRE_SERVICES=1 makes this a failure")
    pytest.skip(f"{reason}; start it to run this test")
