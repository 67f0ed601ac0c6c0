"""Joins external oracles' verdicts with the requests they answer: consumes oracle-requests and oracle-verdicts
(both keyed by execution_id, co-partitioned) and produces validations, each with its daily-stats partial (see
validate_executions). A request waits in per-partition state (its changelog is the registry's oracle_pending
topic, read back to its true end when a partition is assigned, so it survives a restart or a rebalance); one
still unanswered past its oracle's timeout_s becomes an `expired` validation, never a silent drop. Kafka orders
no two topics: a fast oracle's verdict may be read before its request, so it waits in the same state for the
request. Each execution is decided once: the decision stays in the state for as long as a redelivered request
could come (docs/validation.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import faust

from app.agents.plumbing import EventDeadLetters, owned_values, raw_topic
from app.contract.codecs import DecodeError, codec_for, json_codec
from app.contract.records import OracleVerdict, StatsPartial, Validation, ValidationRequest, ValidationStatus, utc_now
from app.contract.topics import Topics
from app.domain.daily_stats import summarise_validations
from app.domain.validation import ValidationFields, unvalidated, validated
from app.kafka.partitioned_state import NotOwned, PartitionedState
from app.settings import Settings

log = logging.getLogger(__name__)
_EXPIRY_CHECK_S = 1.0
_EARLY_VERDICT_KEPT_S = 600.0  # a verdict read before its request waits this long for it
_DECIDED_KEPT_S = 3600.0  # a decision is remembered this long: a request redelivered meanwhile is not judged again
Entry = dict[str, Any]


class JoinOracleVerdicts:
    """The external-oracle join of a worker, registered on its faust app."""

    def __init__(self, app: faust.App, settings: Settings, topics: Topics) -> None:
        self._app = app
        self._requests = codec_for(ValidationRequest, settings, topics.oracle_requests)
        self._stored = json_codec(ValidationRequest)  # the state's own format, whatever the wire's
        self._verdicts = codec_for(OracleVerdict, settings, topics.oracle_verdicts)
        self._stored_verdicts = json_codec(OracleVerdict)
        self._validations = codec_for(Validation, settings, topics.validations)
        self._requests_topic = topics.oracle_requests.name
        self._validations_topic = raw_topic(app, topics.validations)
        self._windows = settings.daily_windows()
        self._partials = codec_for(StatsPartial, settings, topics.stats_partials)
        self._partials_topic = raw_topic(app, topics.stats_partials)
        self._dead_letters = EventDeadLetters(app, settings, topics)
        self._deciding: set[bytes] = set()  # keys whose validation is being sent, by the stream or the sweep
        # Per source partition, execution_id (raw bytes) ->
        #   {"request": ValidationRequest as JSON text, "deadline": unix seconds}, or, for a verdict read before
        #   its request, {"verdict": OracleVerdict as JSON text, "deadline": unix seconds}, or, once decided,
        #   {"decided": "validated" or "expired", "deadline": when it is forgotten}.
        # Not a faust table: faust reads a changelog back short of its end on the embedded broker
        # (app/kafka/partitioned_state.py), and a decision missed there is a second validation.
        self.pending: PartitionedState[Entry] = PartitionedState(
            settings, topics.oracle_pending, self._send_changelog, _decode_entry, _encode_entry,
            flush=self._flush_changelog)
        app.agent(raw_topic(app, topics.oracle_requests, topics.oracle_verdicts), name="join_oracle_verdicts")(
            self._consume)
        app.timer(_EXPIRY_CHECK_S, name="expire_oracle_requests")(self._expire)
        app.on_partitions_assigned.connect(self._on_assigned)
        app.on_partitions_revoked.connect(self._on_revoked)

    async def _consume(self, stream: Any) -> None:
        async for event in stream.events():
            message = event.message
            try:
                entries = await owned_values(self._app, self.pending, message.partition)
                if message.topic == self._requests_topic:
                    await self._wait_for_verdict(message.partition, entries, self._requests.decode(event.value))
                else:
                    await self._judge(message.partition, entries, self._verdicts.decode(event.value))
            except NotOwned:
                continue  # the partition moved: its new owner reads this event again
            except DecodeError as exc:
                await self._dead_letters.send(event, str(exc), "DecodeError")
            except Exception as exc:  # one message's failure must not stop the stream
                log.exception("oracle join failed at %s:%d:%d", message.topic, message.partition, message.offset)
                await self._dead_letters.send(event, f"oracle join failed: {exc}", type(exc).__name__)

    async def _wait_for_verdict(self, partition: int, entries: dict[bytes, Entry], request: ValidationRequest,
                                ) -> None:
        key = request.execution_id.encode()
        waiting = entries.get(key)
        if key in self._deciding or (waiting is not None and "decided" in waiting):
            return  # redelivered after it was decided: one validation per execution
        if waiting is not None and "verdict" in waiting:  # answered before it was read here
            await self._validate(partition, key, request, self._stored_verdicts.decode(waiting["verdict"].encode()))
            return
        if waiting is not None:
            return  # redelivered: the first copy's deadline stands
        await self.pending.put(partition, key, {"request": self._stored.encode(request).decode(),
                                                "deadline": time.time() + request.oracle.timeout_s})

    async def _judge(self, partition: int, entries: dict[bytes, Entry], verdict: OracleVerdict) -> None:
        key = verdict.execution_id.encode()
        waiting = entries.get(key)
        if key in self._deciding or (waiting is not None and "decided" in waiting):
            log.info("verdict for %s ignored: the execution is decided already", verdict.execution_id)
            return
        if waiting is None:  # its request is not read yet
            await self.pending.put(partition, key, {"verdict": self._stored_verdicts.encode(verdict).decode(),
                                                    "deadline": time.time() + _EARLY_VERDICT_KEPT_S})
            return
        if "request" not in waiting:
            return  # another verdict before the request: the first one stands
        await self._validate(partition, key, self._stored.decode(waiting["request"].encode()), verdict)

    async def _validate(self, partition: int, key: bytes, request: ValidationRequest, verdict: OracleVerdict,
                        ) -> None:
        await self._decide(partition, key, validated(request, verdict.output, utc_now()))

    async def _decide(self, partition: int, key: bytes, record: ValidationFields) -> None:
        """Send the validation (acknowledged), then remember the decision: a crash in between validates again,
        never not at all. While it is sent, neither the stream nor the sweep decides it too."""
        self._deciding.add(key)
        try:
            await self._send(record)
            await self.pending.put(partition, key, {"decided": record["status"].value,
                                                    "deadline": time.time() + _DECIDED_KEPT_S})
        finally:
            self._deciding.discard(key)

    async def _expire(self) -> None:
        """Expire what waited past its deadline, one key at a time: a key's failure is logged and the sweep goes
        on (the next sweep tries it again). A partition may move at any await: each key is checked afresh."""
        now = time.time()
        for partition, entries in list(self.pending.owned()):
            for key, waiting in list(entries.items()):
                if not self.pending.owns(partition):
                    break  # moved: its new owner read the state back and expires the rest
                try:
                    await self._expire_one(partition, entries, key, waiting, now)
                except Exception:
                    log.exception("expiry of %s failed; the next sweep tries again", key.decode(errors="replace"))

    async def _expire_one(self, partition: int, entries: dict[bytes, Entry], key: bytes, waiting: Entry,
                          now: float) -> None:
        if waiting["deadline"] > now or key in self._deciding or entries.get(key) is not waiting:
            return  # not due; or being answered, or answered at an await of this sweep
        if "request" not in waiting:
            if "verdict" in waiting:
                log.warning("verdict for %s dropped: no request for it within %g s", key.decode(errors="replace"),
                            _EARLY_VERDICT_KEPT_S)
            await self.pending.put(partition, key, {})  # a decision old enough to forget: a tombstone
            return
        request = self._stored.decode(waiting["request"].encode())
        await self._decide(partition, key, unvalidated(request, ValidationStatus.EXPIRED,
                                                       f"no verdict within {request.oracle.timeout_s:g} s",
                                                       utc_now()))
        await self._app.producer.flush()  # no source offset waits for this decision: make it durable now

    async def _send(self, record: ValidationFields) -> None:
        """The validation, then its daily-stats partial (what the analytics and canary agents count), both
        acknowledged."""
        key = record["task_id"].encode()
        acks = [await self._validations_topic.send(key=key, value=self._validations.encode_fields(record))]
        for partial in summarise_validations([record], self._windows):
            acks.append(await self._partials_topic.send(key=key, value=self._partials.encode(partial)))
        await asyncio.gather(*acks)

    async def _send_changelog(self, topic: str, key: bytes, value: bytes | None, partition: int) -> None:
        """Hands a change to faust's producer without waiting for its acknowledgement (a round trip per event
        made the join fall minutes behind at 20 samples a second): faust flushes the producer before it commits
        source offsets, so a change made for an event is in before that event is committed."""
        await self._app.producer.send(topic, key, value, partition, None, None)

    async def _flush_changelog(self) -> None:
        await self._app.producer.flush()

    def _on_assigned(self, _: Any, /, *args: Any, signal: Any, **__: Any) -> None:
        # The whole assignment: partitions newly assigned are read back, those no longer here forgotten.
        assigned: set[Any] = args[0]
        self.pending.assign(tp.partition for tp in assigned if tp.topic == self._requests_topic)

    def _on_revoked(self, _: Any, /, *args: Any, signal: Any, **__: Any) -> None:
        revoked: set[Any] = args[0]
        self.pending.revoke(tp.partition for tp in revoked if tp.topic == self._requests_topic)


def _decode_entry(key: bytes, value: bytes) -> Entry:
    entry = json.loads(value)
    if not isinstance(entry, dict) or "deadline" not in entry:
        raise ValueError(f"not an entry of the oracle join: {value[:100]!r}")
    return entry


def _encode_entry(entry: Entry) -> bytes | None:
    return json.dumps(entry).encode() if entry else None  # no entry left: a tombstone
