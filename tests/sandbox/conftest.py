from collections.abc import AsyncIterator

import pytest

from app.sandbox.pool import SandboxPool


@pytest.fixture
async def pool() -> AsyncIterator[SandboxPool]:
    """Two real sandbox processes, small enough limits to hit in a test."""
    started = SandboxPool(2, memory_mb=256, max_output=1_000_000, chunk_size=50)
    await started.start()
    yield started
    await started.stop()
