from collections.abc import AsyncIterator

import pytest

from app.sandbox.boundary import Boundary, Limits
from app.sandbox.pool import SandboxPool


@pytest.fixture
async def pool() -> AsyncIterator[SandboxPool]:
    """Two real sandbox processes, small enough limits to hit in a test."""
    started = SandboxPool(Boundary(Limits(memory_mb=256)), 2, spares=1, chunk_size=50)
    await started.start()
    yield started
    await started.stop()
