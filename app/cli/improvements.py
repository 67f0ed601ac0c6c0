"""`loopai improvements list [TASK]`: each improvement request, what came of it, and its canary's decision."""

import asyncio

import click

from app.cli.common import kafka_settings, run
from app.contract.records import CanaryAction, CanaryDecision, ImprovementRequest
from app.contract.topics import topics_for
from app.kafka.tables import read_to_end
from app.settings import Settings


async def improvements_of(settings: Settings, task_id: str | None) -> list[tuple[ImprovementRequest,
                                                                                 CanaryDecision | None]]:
    """The latest record of each improvement request (oldest first), with the decision that ended its candidate's
    canary, if one has."""
    topics = topics_for(settings.topic_prefix)
    requests, decisions = await asyncio.gather(read_to_end(settings, topics.improvement_requests),
                                               read_to_end(settings, topics.canary_decisions))
    latest: dict[str, ImprovementRequest] = {}
    for record in requests:
        if isinstance(record, ImprovementRequest) and task_id in (None, record.task_id):
            latest[record.improvement_id] = record
    ended = {(d.task_id, d.candidate_version): d for d in sorted(
        (d for d in decisions if isinstance(d, CanaryDecision) and d.action is not CanaryAction.STARTED),
        key=lambda d: d.decided_at)}
    return [(r, ended.get((r.task_id, r.candidate_version)) if r.candidate_version else None)
            for r in sorted(latest.values(), key=lambda r: r.requested_at)]


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@click.group()
def improvements() -> None:
    """Improvement requests: when a task's program fell short, and what the generator made of it."""


@improvements.command("list")
@click.argument("task_id", required=False)
@click.pass_context
def improvements_list(ctx: click.Context, task_id: str | None) -> None:
    """Each request (of TASK_ID, or of every task): when, why, its status, the candidate and its offline score
    against the active version's, and the canary's decision."""
    settings = kafka_settings(ctx)
    found = run(improvements_of(settings, task_id))
    if not found:
        click.echo("no improvement requests" + (f" for {task_id}" if task_id else ""))
    for request, decision in found:
        candidate = f"v{request.candidate_version}" if request.candidate_version else "-"
        canary = decision.action.value if decision else ("canary running" if request.candidate_version else "-")
        click.echo(f"{request.requested_at:%Y-%m-%d %H:%M:%S}\t{request.task_id}\t{request.improvement_id}\t"
                   f"{request.status.value}\t{request.trigger.value}\tv{request.active_version or '-'} -> {candidate}"
                   f"\toffline {_share(request.candidate_score)} vs {_share(request.active_score)}\t{canary}\t"
                   f"{request.reason}")
