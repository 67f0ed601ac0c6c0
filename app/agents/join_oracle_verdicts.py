"""Joins external oracles' verdicts with the requests they answer: consumes oracle-requests and oracle-verdicts (both
keyed by execution_id, co-partitioned), produces validations, each with its daily-stats partial (as
validate_executions does), and an `expired` validation for a request its oracle leaves unanswered."""

from __future__ import annotations

import logging
import time
from typing import Any

import faust

from app.agents.plumbing import EventDeadLetters, changelog_table, raw_topic
from app.contract.codecs import DecodeError, codec_for, json_codec
from app.contract.records import OracleVerdict, StatsPartial, Validation, ValidationRequest, ValidationStatus, utc_now
from app.contract.topics import Topics
from app.domain.daily_stats import summarise_validations
from app.domain.validation import ValidationFields, unvalidated, validated
from app.kafka.clients import partition_for
from app.settings import Settings

# A request waits in a faust table (its changelog is the registry's oracle_pending topic, so it survives a restart or
# a rebalance); one still unanswered past its oracle's timeout_s becomes an `expired` validation, never a silent drop.
# Kafka orders no two topics: a fast oracle's verdict may be read before its request, so it waits in the same table
# for the request. Each execution is decided once: the decision stays in the table for as long as a redelivered
# request could come (docs/validation.md).

log = logging.getLogger(__name__)
_EXPIRY_CHECK_S = 1.0
_EARLY_VERDICT_KEPT_S = 600.0  # a verdict read before its request waits this long for it
_DECIDED_KEPT_S = 3600.0  # a decision is remembered this long: a request redelivered meanwhile is not judged again


class JoinOracleVerdicts:
    """The external-oracle join of a worker, registered on its faust app."""

    def __init__(self, app: faust.App, settings: Settings, topics: Topics) -> None:
        self._settings = settings
        self._requests = codec_for(ValidationRequest, settings, topics.oracle_requests)
        self._stored = json_codec(ValidationRequest)  # the table's own format, whatever the wire's
        self._verdicts = codec_for(OracleVerdict, settings, topics.oracle_verdicts)
        self._stored_verdicts = json_codec(OracleVerdict)
        self._validations = codec_for(Validation, settings, topics.validations)
        self._app = app
        self._requests_topic = topics.oracle_requests.name
        self._partitions = topics.oracle_requests.partitions
        self._owned: set[int] = set()  # partitions of the source topics served here, as of rebalance _owned_at
        self._owned_at = -1
        self._deciding: set[bytes] = set()  # keys whose validation is being sent, by the stream or the sweep
        self._validations_topic = raw_topic(app, topics.validations)
        self._windows = settings.daily_windows()
        self._partials = codec_for(StatsPartial, settings, topics.stats_partials)
        self._partials_topic = raw_topic(app, topics.stats_partials)
        self._dead_letters = EventDeadLetters(app, settings, topics)
        # execution_id (raw bytes, so partitioned like the source topics) ->
        #   {"request": ValidationRequest as JSON text, "deadline": unix seconds}, or, for a verdict read before
        #   its request, {"verdict": OracleVerdict as JSON text, "deadline": unix seconds}, or, once decided,
        #   {"decided": "validated" or "expired", "deadline": when it is forgotten}.
        # use_partitioner: the expiry timer changes it outside a stream, keyed like the source topics.
        self.pending = changelog_table(app, topics.oracle_pending, use_partitioner=True)
        app.agent(raw_topic(app, topics.oracle_requests, topics.oracle_verdicts), name="join_oracle_verdicts")(
            self._consume)
        app.timer(_EXPIRY_CHECK_S, name="expire_oracle_requests")(self._expire)

    async def _consume(self, stream: Any) -> None:
        async for event in stream.events():
            try:
                if event.message.topic == self._requests_topic:
                    await self._wait_for_verdict(self._requests.decode(event.value))
                else:
                    await self._judge(self._verdicts.decode(event.value))
            except DecodeError as exc:
                await self._dead_letters.send(event, str(exc), "DecodeError")
            except Exception as exc:  # one message's failure must not stop the stream
                log.exception("oracle join failed at %s:%d", event.message.topic, event.message.offset)
                await self._dead_letters.send(event, f"oracle join failed: {exc}", type(exc).__name__)

    async def _wait_for_verdict(self, request: ValidationRequest) -> None:
        key = request.execution_id.encode()
        waiting = self.pending.get(key)
        if key in self._deciding or (waiting is not None and "decided" in waiting):
            return  # redelivered after it was decided: one validation per execution
        if waiting is not None and "verdict" in waiting:  # answered before it was read here
            await self._validate(key, request, self._stored_verdicts.decode(waiting["verdict"].encode()))
            return
        if waiting is not None:
            return  # redelivered: the first copy's deadline stands
        self.pending[key] = {
            "request": self._stored.encode(request).decode(),
            "deadline": time.time() + request.oracle.timeout_s,
        }

    async def _judge(self, verdict: OracleVerdict) -> None:
        key = verdict.execution_id.encode()
        waiting = self.pending.get(key)
        if key in self._deciding or (waiting is not None and "decided" in waiting):
            log.info("verdict for %s ignored: the execution is decided already", verdict.execution_id)
            return
        if waiting is None:  # its request is not read yet
            self.pending[key] = {"verdict": self._stored_verdicts.encode(verdict).decode(),
                                 "deadline": time.time() + _EARLY_VERDICT_KEPT_S}
            return
        if "request" not in waiting:
            return  # another verdict before the request: the first one stands
        await self._validate(key, self._stored.decode(waiting["request"].encode()), verdict)

    async def _validate(self, key: bytes, request: ValidationRequest, verdict: OracleVerdict) -> None:
        self._deciding.add(key)
        try:
            await self._send(validated(request, verdict.output, utc_now()))
            self._decided(key, ValidationStatus.VALIDATED)
        finally:
            self._deciding.discard(key)

    def _decided(self, key: bytes, status: ValidationStatus) -> None:
        """Remember the decision, in the table and so in its changelog (also when the partition moved at the
        send's await: its new owner may still read it back)."""
        self.pending[key] = {"decided": status.value, "deadline": time.time() + _DECIDED_KEPT_S}

    async def _expire(self) -> None:
        """Expire what waited past its deadline, one key at a time: a key's failure is logged and the sweep goes
        on (the next sweep tries it again). Partitions move at any await, so each key is checked afresh."""
        now = time.time()
        for key, waiting in list(self.pending.items()):
            if self._app.rebalancing:
                return  # partitions are moving, or the table is being read back: the next sweep goes on
            try:
                await self._expire_one(key, waiting, now)
            except Exception:
                log.exception("expiry of %s failed; the next sweep tries again", key.decode(errors="replace"))

    async def _expire_one(self, key: bytes, waiting: dict[str, Any], now: float) -> None:
        if not self._owns(key):
            # Left here by a partition that moved away: its new owner read the entry back from the changelog
            # and decides it. Forgotten here only (no tombstone), or both owners would expire it.
            self.pending.data.pop(key, None)
            return
        if waiting["deadline"] > now or key in self._deciding or self.pending.get(key) != waiting:
            return  # not due; or being answered, or answered at an await of this sweep
        if "request" not in waiting:
            if "verdict" in waiting:
                log.warning("verdict for %s dropped: no request for it within %g s", key.decode(errors="replace"),
                            _EARLY_VERDICT_KEPT_S)
            self.pending.pop(key, None)  # a decision old enough to forget
            return
        request = self._stored.decode(waiting["request"].encode())
        self._deciding.add(key)
        try:
            await self._send(unvalidated(request, ValidationStatus.EXPIRED,
                                         f"no verdict within {request.oracle.timeout_s:g} s", utc_now()))
            self._decided(key, ValidationStatus.EXPIRED)
        finally:
            self._deciding.discard(key)

    def _owns(self, key: bytes) -> bool:
        """Whether this worker serves the key's partition now (the table is keyed like the source topics)."""
        if self._owned_at != self._app.rebalancing_count:
            self._owned = {tp.partition for tp in self._app.assignor.assigned_actives()
                           if tp.topic == self._requests_topic}
            self._owned_at = self._app.rebalancing_count
        return partition_for(key, self._partitions) in self._owned

    async def _send(self, record: ValidationFields) -> None:
        """The validation, then its daily-stats partial (what the analytics and canary agents count)."""
        key = record["task_id"].encode()
        await self._validations_topic.send(key=key, value=self._validations.encode_fields(record))
        for partial in summarise_validations([record], self._windows):
            await self._partials_topic.send(key=key, value=self._partials.encode(partial))

