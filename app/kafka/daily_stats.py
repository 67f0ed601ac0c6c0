"""A task's daily stats as stored: consumes the analytics topic (closed days) and the aggregator's daily-windows
changelog (the open days' running totals), produces each day once per version (closed where closed)."""

from __future__ import annotations

from app.contract.records import DailyStats
from app.contract.topics import topics_for
from app.domain.daily_stats import StatsKey
from app.domain.daily_windows import DailyWindows
from app.domain.open_windows import OpenWindows
from app.domain.stats_report import by_key
from app.kafka.partitioned_state import read_state
from app.kafka.tables import read_to_end
from app.settings import Settings


async def read_daily_stats(settings: Settings, windows: DailyWindows, task_id: str) -> dict[StatsKey, DailyStats]:
    """Every day known for the task, read to the end of both topics."""
    topics = topics_for(settings.topic_prefix)
    opened = await read_state(settings, topics.daily_windows,
                              lambda key, value: OpenWindows.from_json(key.decode(), value, windows))
    running = opened[task_id.encode()].running() if task_id.encode() in opened else []
    closed = [d for d in await read_to_end(settings, topics.analytics)
              if isinstance(d, DailyStats) and d.task_id == task_id]
    return by_key(closed, running)
