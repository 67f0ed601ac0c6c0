"""`loopai tail TOPIC`: a topic's last records as JSON lines, like tail (-n, -f), filtered by task or status."""

import contextlib
import heapq
from collections import defaultdict, deque
from typing import Any

import click
from aiokafka import TopicPartition

from app.cli.common import kafka_settings, run
from app.contract.codecs import DecodeError, codec_for
from app.contract.topics import topics_for
from app.kafka.clients import make_consumer
from app.kafka.loop_client import messages_until_idle
from app.kafka.metadata import topic_partitions


@click.command()
@click.argument("topic")
@click.option("-n", "--lines", "count", type=click.IntRange(min=0), default=10, show_default=True,
              help="Print the last N matching records kept (0: none), then exit unless --follow.")
@click.option("--from-beginning", is_flag=True, help="Print every matching record kept instead of the last N.")
@click.option("-f", "--follow", is_flag=True, help="Then keep printing records as they arrive, until Ctrl-C.")
@click.option("--task", "task_id", help="Only records of this task.")
@click.option("--status", help="Only records with this status (results: ok, error, timeout, rejected).")
@click.option("--pretty", is_flag=True, help="Indented JSON, a blank line between records.")
@click.option("--idle-exit", type=click.FloatRange(min=0, min_open=True),
              help="Follow, but exit after this many seconds without records (implies --follow).")
@click.pass_context
def tail(ctx: click.Context, topic: str, count: int, from_beginning: bool, follow: bool, task_id: str | None,
         status: str | None, pretty: bool, idle_exit: float | None) -> None:
    """Print the last records of TOPIC (e.g. results, requests, dead-letters) as JSON, one per line, like tail:
    the last 10 by default, across partitions in timestamp order; with -f, then follow it."""
    settings = kafka_settings(ctx)
    try:
        spec = topics_for(settings.topic_prefix).by_name(topic)
    except KeyError as exc:
        raise click.BadParameter(str(exc.args[0])) from exc
    follow = follow or idle_exit is not None
    filtered = task_id is not None or status is not None

    def wanted(record: Any) -> bool:
        return ((task_id is None or getattr(record, "task_id", None) == task_id)
                and (status is None or str(getattr(record, "status", "")) == status))

    def show(record: Any) -> None:
        click.echo(record.model_dump_json(indent=2) + "\n" if pretty else record.model_dump_json())

    async def go() -> None:
        codec = codec_for(spec.record, settings, spec)
        consumer = make_consumer(settings)
        await consumer.start()
        try:
            partitions = [TopicPartition(spec.name, p) for p in await topic_partitions(consumer, spec.name)]
            consumer.assign(partitions)
            # Unfiltered, only a partition's last N records can be among the topic's last N. The broker's
            # end offset can fall short of the true end (the embedded one's does), never past it: reading
            # from N before it, to the true end, takes in at least the last N.
            starts = await consumer.beginning_offsets(partitions)
            ends = await consumer.end_offsets(partitions)
            everything = from_beginning or (filtered and count > 0)
            for tp in partitions:
                consumer.seek(tp, starts[tp] if everything else max(starts[tp], ends[tp] - count))
            last: dict[int, deque[tuple[int, int, int, Any]]] = defaultdict(lambda: deque(maxlen=count))
            arrived: list[tuple[TopicPartition, Any]] = []  # past the end as it was: new, for -f
            shown = 0
            # What is kept now ends at each partition's true end: the high watermark of its first fetch, held
            # fixed so that a busy topic cannot keep the end out of reach.
            kept_end: dict[TopicPartition, int] = {}
            behind = set(partitions)
            while behind:
                batches = await consumer.getmany(*behind, timeout_ms=200)
                for tp in behind:
                    if tp not in kept_end and consumer.highwater(tp) is not None:
                        kept_end[tp] = consumer.highwater(tp) or 0
                for tp, messages in batches.items():
                    for message in messages:
                        if message.offset >= kept_end[tp]:
                            arrived.append((tp, message))
                            continue
                        record = _decoded(codec, tp, message)
                        if record is None or not wanted(record):
                            continue
                        if from_beginning:  # as they come, partition by partition: a long topic is never held
                            show(record)
                            shown += 1
                        elif count:
                            last[tp.partition].append((message.timestamp, tp.partition, message.offset, record))
                behind = {tp for tp in behind if tp not in kept_end or await consumer.position(tp) < kept_end[tp]}
            # Each partition's records stay in offset order; partitions interleave by timestamp.
            merged = list(heapq.merge(*last.values(), key=lambda kept: kept[0]))
            for *_, record in merged[len(merged) - count:]:
                show(record)
                shown += 1
            if not follow:
                if not shown and (from_beginning or count):
                    click.echo(f"# no {'matching ' if filtered else ''}records in {spec.name}", err=True)
                return
            click.echo(f"# waiting for new records on {spec.name}"
                       + (f" (exit after {idle_exit:g} s without any)" if idle_exit else "") + "; Ctrl-C stops",
                       err=True)
            for tp, message in arrived:
                record = _decoded(codec, tp, message)
                if record is not None and wanted(record):
                    show(record)
            async for tp, message in messages_until_idle(consumer, idle_exit):
                record = _decoded(codec, tp, message)
                if record is not None and wanted(record):
                    show(record)
        finally:
            await consumer.stop()

    with contextlib.suppress(KeyboardInterrupt):
        run(go())


def _decoded(codec: Any, tp: TopicPartition, message: Any) -> Any:
    """The record a message holds, or None after a line on stderr for one that does not decode."""
    try:
        return codec.decode(message.value)
    except DecodeError as exc:
        click.echo(f"# {tp.partition}:{message.offset} undecodable: {exc}", err=True)
        return None
