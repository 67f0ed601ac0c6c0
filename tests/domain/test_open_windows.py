from datetime import UTC, datetime, timedelta

import pytest

from app.contract.records import StatsPartial
from app.domain.daily_stats import StatsKey, WindowStats
from app.domain.daily_windows import DailyWindows
from app.domain.open_windows import OpenWindows

WINDOWS = DailyWindows("Europe/Paris", grace=timedelta(hours=1))
NOON = datetime(2026, 11, 22, 11, tzinfo=UTC)  # noon in Paris
END_OF_DAY = datetime(2026, 11, 22, 23, tzinfo=UTC)  # Paris midnight: the 22nd ends


def partial(ok: int, day: str = "2026-11-22", version: int | None = 1, latencies: tuple[float, ...] = (),
            zone: str = "Europe/Paris") -> StatsPartial:
    stats = WindowStats(ok=ok, latency_sum_ms=sum(latencies))
    stats.sketch.add_all(latencies)
    return stats.to_partial("spam", version, WINDOWS.of_date(day), zone, NOON)


def test_partials_merge_per_version_and_for_the_whole_task() -> None:
    windows = OpenWindows("spam", WINDOWS)
    assert windows.add(partial(2, latencies=(1.0, 3.0)), NOON)
    assert windows.add(partial(5, version=2), NOON)
    assert windows.add(partial(1, version=None), NOON)
    running = {StatsKey(s.task_id, s.version, s.date): s for s in windows.running()}
    assert running[StatsKey("spam", None, "2026-11-22")].executions == 8
    assert running[StatsKey("spam", 1, "2026-11-22")].avg_latency_ms == 2.0
    assert running[StatsKey("spam", 2, "2026-11-22")].ok == 5 and len(running) == 3


def test_a_day_closes_after_its_grace_without_more_traffic_and_only_once() -> None:
    windows = OpenWindows("spam", WINDOWS)
    windows.add(partial(3), NOON)
    windows.add(partial(4, day="2026-11-23"), NOON)
    assert windows.close(END_OF_DAY + timedelta(minutes=59)) == []
    closed = windows.close(END_OF_DAY + timedelta(hours=1))
    assert {(s.version, s.executions) for s in closed} == {(1, 3), (None, 3)}
    assert all(s.closed_at == END_OF_DAY + timedelta(hours=1) and s.date == "2026-11-22" for s in closed)
    assert windows.close(END_OF_DAY + timedelta(hours=2)) == []
    assert {s.date for s in windows.running()} == {"2026-11-23"}


def test_a_day_that_ended_still_takes_partials_within_its_grace_then_refuses_them() -> None:
    windows = OpenWindows("spam", WINDOWS)
    assert windows.add(partial(3), END_OF_DAY + timedelta(minutes=30))
    assert not windows.add(partial(4), END_OF_DAY + timedelta(hours=1))  # late: counts nowhere
    assert {s.executions for s in windows.running()} == {3}
    assert not OpenWindows("spam", WINDOWS).add(partial(1), END_OF_DAY + timedelta(days=3))


def test_refusals() -> None:
    windows = OpenWindows("other", WINDOWS)
    with pytest.raises(ValueError, match="given to the windows of other"):
        windows.add(partial(1), NOON)
    with pytest.raises(ValueError, match="dated in UTC"):
        OpenWindows("spam", WINDOWS).add(partial(1, zone="UTC"), NOON)
    with pytest.raises(ValueError):
        OpenWindows("spam", WINDOWS).add(partial(1).model_copy(update={"date": "2026-13-45"}), NOON)


def test_the_json_state_round_trips() -> None:
    windows = OpenWindows("spam", WINDOWS)
    windows.add(partial(2, latencies=(1.0, 250.0)), NOON)
    windows.add(partial(1, version=3, day="2026-11-23"), NOON)
    restored = OpenWindows.from_json("spam", windows.to_json(), WINDOWS)
    assert restored.running() == windows.running()
    assert not OpenWindows.from_json("spam", OpenWindows("spam", WINDOWS).to_json(), WINDOWS)


@pytest.mark.parametrize("data", [b"not json", b'{"spam/1/2026-11-22": {"ok": 1}}', b'{"eggs/1/2026-11-22": {}}',
                                  b"[1]"])
def test_state_that_is_not_open_windows(data: bytes) -> None:
    with pytest.raises(ValueError):
        OpenWindows.from_json("spam", data, WINDOWS)


def test_the_offsets_merged_are_remembered_through_the_json_state() -> None:
    windows = OpenWindows("spam", WINDOWS)
    assert not windows.merged("partials", 0)
    windows.add(partial(2), NOON)
    windows.mark("partials", 41)
    windows.mark("validations", 7)
    restored = OpenWindows.from_json("spam", windows.to_json(), WINDOWS)
    assert restored.merged("partials", 41) and restored.merged("partials", 3) and not restored.merged("partials", 42)
    assert restored.merged("validations", 7) and not restored.merged("validations", 8)
    assert restored.running() == windows.running()
