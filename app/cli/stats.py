"""`loopai stats TASK`: a task's daily window as a table, and the last days as bars."""

from datetime import timedelta

import click

from app.cli.common import control_read, kafka_settings, run
from app.contract.records import (
    utc_now,
)
from app.domain.daily_stats import StatsKey
from app.domain.stats_report import chart, window_table
from app.kafka.loop_client import daily_stats


@click.command("stats")
@click.argument("task_id")
@click.option("--date", "day", help="The day, YYYY-MM-DD in analytics_time_zone (default: today, still running).")
@click.option("--version", type=int, help="One version's figures (default: all versions).")
@click.option("--days", default=7, show_default=True, type=click.IntRange(1, 366), help="Days in the chart.")
@click.pass_context
def stats(ctx: click.Context, task_id: str, day: str | None, version: int | None, days: int) -> None:
    """A task's daily window as a table (closed days from analytics, open ones from the aggregator's
    changelog), and the last days' success rate and p99 latency as bars."""
    settings = kafka_settings(ctx)
    windows = settings.daily_windows()
    try:
        window = windows.of_date(day) if day else windows.today(utc_now())
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--date") from None
    known = run(daily_stats(settings, task_id))
    shown = known.get(StatsKey(task_id, version, window.date))
    which = "all versions" if version is None else f"version {version}"
    if shown is None:
        click.echo(f"{task_id}: no executions on {window.date} ({settings.analytics_time_zone}), {which}")
    else:
        for line in window_table(shown):
            click.echo(line)
        if shown.validated == 0:
            click.echo(f"  (why none validated: {_why_not_validated(ctx, task_id, shown.sampled)})")
    recent = [known[key] for key in (StatsKey(task_id, version, (window.day - timedelta(days=back)).isoformat())
                                     for back in range(days - 1, -1, -1)) if key in known]
    if recent:
        click.echo(f"\nlast {days} days, {which}:")
        for line in chart(recent):
            click.echo(line)


def _why_not_validated(ctx: click.Context, task_id: str, sampled: int) -> str:
    """What `stats` says under a window without validations: the task's oracle and sampling, as they are now."""
    spec = control_read(ctx, lambda control: control.tables.tasks.get(task_id))
    if spec is None:
        return "there is no such task now"
    if spec.oracle is None:
        return (f"the task has no oracle, and its requests carried no expected_output, so nothing judges its "
                f"sampled executions; give it one with `loopai task update {task_id} --oracle "
                "label|shadow|external`")
    if sampled == 0:
        return (f"no execution was sampled (sampling_rate {spec.sampling_rate:g}; `loopai task update {task_id} "
                "--sampling-rate R`, or force_validation on a request)")
    kind = spec.oracle.kind.value
    if kind == "external":
        return ("its external oracle has not answered yet (is an oracle service, e.g. `loopai oracle serve`, "
                "running?); unanswered requests expire")
    if kind == "label":
        return "the label oracle needs expected_output on the requests; these carried none"
    return "the shadow oracle has not judged them yet (is a worker running?)"
