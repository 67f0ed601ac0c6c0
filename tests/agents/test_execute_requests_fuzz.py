"""Generated garbage through a worker on the real broker: request bytes and records with wrong types, missing
fields, huge values, invalid UTF-8, another record's schema, the other wire format. Each message ends as one
rejected (or ok) result or one dead letter with a reason; the worker does not crash; offsets advance."""

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from app.contract.codecs import codec_for, json_codec
from app.contract.records import DeadLetter, ExecutionRequest, ExecutionResult, ExecutionStatus, TaskSpec, utc_now
from app.contract.registry import register_schemas
from app.contract.topics import TopicSpec, topics_for
from app.control.plane import ControlPlane
from app.kafka.clients import apply_topics, make_consumer, make_producer
from app.settings import Settings
from devtools.broker import EmbeddedBroker
from tests.conftest import WorkerProcess, make_settings

ECHO = "def run(input):\n    return input.get('n')\n"
HUGE = "h" * 300_000

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                     st.text(max_size=20))
_json = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                     max_leaves=8)
_anything = st.one_of(_json, st.just(HUGE))


@st.composite
def _request_fields(draw: st.DrawFn) -> dict[str, Any]:
    """The fields of a request, each one possibly of the wrong type, huge, or left out; maybe one too many."""
    fields = {
        "request_id": draw(st.one_of(st.just(str(uuid.uuid4())), st.just(""), st.just(HUGE + str(uuid.uuid4())),
                                     _json)),
        "task_id": draw(st.one_of(st.sampled_from(["echo", "nope", ""]), _anything)),
        "version": draw(st.one_of(st.none(), st.integers(-3, 3), _anything)),
        "input": draw(st.one_of(st.fixed_dictionaries({"n": st.integers(0, 9)}), _anything)),
        "force_validation": draw(st.one_of(st.booleans(), _json)),
        "timeout_ms": draw(st.one_of(st.none(), st.integers(-5, 100_000), _json)),
        "expected_output": draw(_anything),
        "requested_at": draw(st.one_of(st.none(), st.datetimes(timezones=st.just(UTC)).map(str), _json)),
    }
    dropped = draw(st.sets(st.sampled_from(sorted(fields))))
    fields = {k: v for k, v in fields.items() if k not in dropped}
    if draw(st.booleans()):
        fields[draw(st.text(max_size=8))] = draw(_json)
    return fields


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


def _invalid_utf8(fields: dict[str, Any]) -> bytes:
    """A request whose request_id holds bytes that are not UTF-8."""
    return _json_bytes({**fields, "request_id": "@@"}).replace(b'"@@"', b'"bad \xff\xfe id"')


def _avro_request(n: int) -> bytes:
    """A valid request, but in the other wire format."""
    request = ExecutionRequest(request_id=str(uuid.uuid4()), task_id="echo", input={"n": n}, requested_at=utc_now())
    avro = Settings(wire_format="avro", registry_url="mock://fuzz", topic_prefix="fuzz.")
    register_schemas(avro, topics_for(avro.topic_prefix))  # idempotent
    return codec_for(ExecutionRequest, avro, topics_for(avro.topic_prefix).execution_requests).encode(request)


_values = st.one_of(
    _request_fields().map(_json_bytes),
    _request_fields().map(_invalid_utf8),
    _json.map(_json_bytes),  # JSON, but not an object of request fields
    st.binary(max_size=64),
    st.integers(0, 9).map(_avro_request),
    st.just(TaskSpec(name="echo", updated_at=utc_now()).model_dump_json().encode()),  # another record's schema
    st.sampled_from([b"", None]),  # empty, and a tombstone
)
_messages = st.lists(  # (key, value); a tombstone (value None) needs a key
    st.tuples(st.one_of(st.none(), st.binary(max_size=8)), _values).map(
        lambda kv: (kv[0] or b"k", None) if kv[1] is None else kv),
    min_size=1, max_size=25)


@pytest.fixture(scope="module")
def served(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    made = make_settings(broker)

    async def provision() -> None:
        await apply_topics(made, topics_for(made.topic_prefix))
        async with ControlPlane(made) as control:
            await control.put_task(TaskSpec(name="echo", updated_at=utc_now()))
            await control.publish("echo", ECHO, activate=True)

    asyncio.run(provision())
    worker = WorkerProcess(made, tmp_path_factory.mktemp("fuzz") / "worker.log", "fuzz-1").start()
    yield made
    assert worker.process.poll() is None, worker.log()[-3000:]  # it never crashed
    assert worker.stop() == 0


# No shrinking: each example is a round trip through the broker, and a failing batch is small enough to read.
@settings(max_examples=10, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(messages=_messages, partition=st.integers(0, 5))
def test_generated_messages_each_end_as_one_result_or_dead_letter(
    served: Settings, messages: list[tuple[bytes | None, bytes | None]], partition: int
) -> None:
    asyncio.run(_one_batch(served, messages, partition))


async def _one_batch(settings: Settings, messages: list[tuple[bytes | None, bytes | None]], partition: int) -> None:
    topics = topics_for(settings.topic_prefix)
    await _read_on(settings, topics.execution_results)  # skip what earlier examples left
    await _read_on(settings, topics.dead_letters)
    producer = make_producer(settings)
    await producer.start()
    try:
        offsets = []
        for key, value in messages:
            sent = await producer.send_and_wait(topics.execution_requests.name, value, key=key, partition=partition)
            offsets.append(sent.offset)
    finally:
        await producer.stop()

    results: list[ExecutionResult] = []
    letters: list[DeadLetter] = []
    result_codec, letter_codec = json_codec(ExecutionResult), json_codec(DeadLetter)
    deadline = time.monotonic() + 30
    while len(results) + len(letters) < len(messages):
        assert time.monotonic() < deadline, f"{len(results)} results, {len(letters)} letters of {len(messages)}"
        results += [result_codec.decode(v) for v in await _read_on(settings, topics.execution_results)]
        letters += [letter_codec.decode(v) for v in await _read_on(settings, topics.dead_letters)]
    assert len(results) + len(letters) == len(messages)

    by_offset = dict(zip(offsets, messages, strict=True))
    lettered = Counter(letter.source_offset for letter in letters)
    assert all(n == 1 and offset in by_offset for offset, n in lettered.items())
    for letter in letters:
        key, value = by_offset[letter.source_offset]
        assert letter.reason and letter.error_type
        assert (letter.source_partition, letter.key, letter.value) == (partition, key, value)
    # The others were readable as requests (at least their ids): one result each, under their request id.
    expected_ids = Counter(orjson.loads(by_offset[offset][1])["request_id"]
                           for offset in offsets if offset not in lettered)
    assert Counter(r.request_id for r in results) == expected_ids
    for result in results:
        assert result.status in (ExecutionStatus.OK, ExecutionStatus.REJECTED)
        assert result.status is ExecutionStatus.OK or result.error_message

    requests = TopicPartition(topics.execution_requests.name, partition)
    deadline = time.monotonic() + 10
    while await _committed(settings, requests) != offsets[-1] + 1:  # offsets advance past every message
        assert time.monotonic() < deadline, "offsets did not advance"
        await asyncio.sleep(0.1)


_read_up_to: dict[str, dict[int, int]] = {}  # topic -> partition -> next offset: what earlier reads consumed


async def _read_on(settings: Settings, spec: TopicSpec) -> list[bytes]:
    """The values of a topic after those read before, up to its true end. The true end is the high
    watermark of a fetch: the embedded broker's ListOffsets(latest) under-reports it."""
    start = _read_up_to.setdefault(spec.name, dict.fromkeys(range(spec.partitions), 0))
    consumer = make_consumer(settings)
    await consumer.start()
    try:
        partitions = [TopicPartition(spec.name, p) for p in start]
        consumer.assign(partitions)
        for tp in partitions:
            consumer.seek(tp, start[tp.partition])
        values: list[bytes] = []
        while True:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                values += [m.value for m in batch]
            behind = [tp for tp in partitions
                      if consumer.highwater(tp) is None or await consumer.position(tp) < consumer.highwater(tp)]
            if not behind:
                break
        for tp in partitions:
            start[tp.partition] = await consumer.position(tp)
        return values
    finally:
        await consumer.stop()


async def _committed(settings: Settings, tp: TopicPartition) -> int:
    consumer = make_consumer(settings, group_id=f"{settings.app_id}-executors")
    await consumer.start()
    try:
        return await consumer.committed(tp) or 0
    finally:
        await consumer.stop()


def test_the_fuzz_strategies_reach_every_kind_of_message() -> None:
    """A fuzz test whose generator never produced the interesting cases could not fail."""
    seen: set[str] = set()

    @settings(max_examples=300, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(value=_values)
    def kinds(value: bytes | None) -> None:
        if value is None:
            seen.add("tombstone")
        elif b"\xff\xfe id" in value:
            seen.add("invalid utf-8")
        elif HUGE.encode() in value:
            seen.add("huge")
        elif value.startswith(b'{"name": "echo"') or b'"name":"echo"' in value:
            seen.add("other schema")

    kinds()
    assert {"tombstone", "invalid utf-8", "huge", "other schema"} <= seen, seen
