"""/health's judgement without a broker: the worker's parts stood in by their observable state."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

from app.contract.records import TaskSpec, utc_now
from app.settings import Settings
from app.web.server import WebServer


def server(answered_at: float | None, tables_ready: bool, joined: bool, failure: str | None = None) -> WebServer:
    """A WebServer over stand-ins: health() reads only these attributes."""
    web = WebServer.__new__(WebServer)
    ready, joined_event = asyncio.Event(), asyncio.Event()
    if tables_ready:
        ready.set()
    if joined:
        joined_event.set()
    spec = TaskSpec(name="spam", updated_at=utc_now(), active_version=2)
    tables: Any = SimpleNamespace(ready=ready, tasks=SimpleNamespace(values=lambda: [spec]), artifacts=[1, 2])
    pipeline = SimpleNamespace(joined=joined_event, failure=failure, partitions=lambda: [0, 3])
    executor: Any = SimpleNamespace(pipeline=pipeline)
    web._settings = Settings(bootstrap_servers="kafka:9092", worker_id="w")
    web._tables, web._executor = tables, executor
    web._watch = SimpleNamespace(answered_at=answered_at)  # type: ignore[assignment]
    return web


def test_ready_when_every_part_is() -> None:
    ready, body = server(time.monotonic(), True, True).health()
    assert ready and body["reasons"] == []
    assert body["partitions"] == [0, 3] and body["active_versions"] == {"spam": 2}
    assert body["tables"] == {"recovered": True, "tasks": 1, "artifacts": 2}


def test_not_ready_says_why() -> None:
    ready, body = server(time.monotonic() - 30, False, False, failure="committing offsets failed").health()
    assert not ready and body["status"] == "not ready"
    assert [reason.split()[1] for reason in body["reasons"]] == ["broker", "and", "executor", "executor"]
    assert "kafka:9092" in body["reasons"][0] and "committing offsets failed" in body["reasons"][3]
    assert body["broker"]["reachable"] is False


def test_a_broker_never_heard_from_is_not_reachable() -> None:
    ready, body = server(None, True, True).health()
    assert not ready and body["broker"] == {"reachable": False, "last_answer_s_ago": None}
