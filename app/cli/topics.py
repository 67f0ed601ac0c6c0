"""`loopai topics list|apply`: the topics of topics/topics.yaml, compared with and applied to the cluster."""

import asyncio

import click

from app.cli.common import (
    kafka_settings,
    run,
)
from app.contract.registry import register_schemas
from app.contract.topics import topics_for
from app.kafka.clients import apply_topics, make_consumer
from app.kafka.metadata import TopicUnavailable, topic_partitions


@click.group()
def topics() -> None:
    """Topic administration."""


@topics.command("list")
@click.pass_context
def topics_list(ctx: click.Context) -> None:
    """List the topics of topics/topics.yaml: name, partitions, record, cleanup and retention, and whether the
    cluster has each (with its partition count there)."""
    settings = kafka_settings(ctx)
    registry = topics_for(settings.topic_prefix)

    async def go() -> dict[str, int | None]:
        consumer = make_consumer(settings)
        await consumer.start()

        async def partitions(name: str) -> int | None:
            try:
                return len(await topic_partitions(consumer, name, timeout_s=3))
            except TopicUnavailable:
                return None

        try:
            counts = await asyncio.gather(*(partitions(spec.name) for spec in registry.all()))
        finally:
            await consumer.stop()
        return dict(zip((spec.name for spec in registry.all()), counts, strict=True))

    on_cluster = run(go())
    for spec in registry.all():
        there = on_cluster[spec.name]
        retention = spec.config.get("retention.ms")
        click.echo(f"{spec.name}\t{spec.partitions} partitions\t{spec.record_name or 'internal'}\t"
                   f"{spec.config.get('cleanup.policy', '-')}"
                   + (f" {int(retention) / 86_400_000:g} d" if retention else "")
                   + f"\t{'missing' if there is None else f'on cluster ({there} partitions)'}")


@topics.command("apply")
@click.pass_context
def topics_apply(ctx: click.Context) -> None:
    """Create the topics of topics/topics.yaml that are missing, and set its configs (cleanup.policy,
    retention.ms) on those that exist; with the Avro wire format, register their schemas too (idempotent)."""
    settings = kafka_settings(ctx)
    registry = topics_for(settings.topic_prefix)
    for outcome in run(apply_topics(settings, registry)):
        state = "created" if outcome.created else "altered" if outcome.altered else "exists "
        click.echo(f"{state} {outcome.name} ({outcome.detail})")
    if settings.wire_format == "avro":
        for subject, schema_id in run(asyncio.to_thread(register_schemas, settings, registry)).items():
            click.echo(f"registered {subject} (schema id {schema_id})")
