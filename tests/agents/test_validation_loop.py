"""The validation loop end to end on the embedded broker: a worker executes requests, samples them, and its
agents validate the samples with each oracle kind and decide canaries."""

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.contract.codecs import codec_for
from app.contract.records import (
    CanaryAction,
    CanaryDecision,
    Comparison,
    DeadLetter,
    OracleKind,
    OracleSpec,
    OracleVerdict,
    SamplingStrategy,
    TaskSpec,
    Validation,
    ValidationRequest,
    ValidationStatus,
    execution_id_for,
    utc_now,
)
from app.contract.topics import topics_for
from app.control.plane import ControlPlane
from app.domain.sampling import fraction_of
from app.kafka.clients import apply_topics, make_producer
from app.kafka.loop_client import RequestSender, daily_stats, request_from
from app.settings import Settings
from devtools.broker import EmbeddedBroker
from devtools.oracle import canonical, serve_oracle
from tests.conftest import WorkerProcess, collect, make_settings, results_for
from tests.faults import committed, end_offsets, read_values

LABEL_OF = "def run(input):\n    return 'spam' if 'free' in input['text'].lower() else 'ham'\n"
ALWAYS_HAM = "def run(input):\n    return 'ham'\n"
CONTRARY = "def run(input):\n    return 'ham' if 'free' in input['text'].lower() else 'spam'\n"
SHOUTING = "def run(input):\n    return ' ' + ('SPAM' if 'free' in input['text'].lower() else 'HAM') + ' '\n"
TEXTS = ["free money", "lunch?", "FREE prize", "notes", "free offer", "hello"]
# From when the worker takes a request, the running oracle's answer must come back within this; the unanswered
# requests of the external-oracle test wait it out.
ORACLE_TIMEOUT_S = 10


def truth(text: str) -> str:
    return "spam" if "free" in text.lower() else "ham"


async def provision(settings: Settings) -> None:
    await apply_topics(settings, topics_for(settings.topic_prefix))
    now = utc_now()
    async with ControlPlane(settings) as control:
        await control.put_task(TaskSpec(name="labelled", sampling_rate=1.0, updated_at=now))
        await control.publish("labelled", ALWAYS_HAM, activate=True)
        await control.put_task(TaskSpec(
            name="shadowed", sampling_rate=1.0, updated_at=now,
            oracle=OracleSpec(kind=OracleKind.SHADOW, comparison=Comparison.NORMALISED_TEXT, shadow_version=1)))
        await control.publish("shadowed", LABEL_OF, activate=False)
        await control.publish("shadowed", SHOUTING, activate=True)
        await control.put_task(TaskSpec(name="asked", sampling_rate=1.0, updated_at=now,
                                        oracle=OracleSpec(kind=OracleKind.EXTERNAL, timeout_s=ORACLE_TIMEOUT_S)))
        await control.publish("asked", LABEL_OF, activate=True)
        # Candidates always right or always wrong, so that every order the validations arrive in decides the
        # same way (a half-right candidate may hover at the rollback bar for a whole run).
        for name, active, candidate in (("better", ALWAYS_HAM, LABEL_OF), ("worse", LABEL_OF, CONTRARY)):
            await control.put_task(TaskSpec(name=name, sampling_rate=1.0, accuracy_target=0.6, updated_at=now))
            await control.publish(name, active, activate=True)
            await control.publish(name, candidate)
            spec = control.task(name)
            await control.put_task(spec.model_copy(update={"canary_version": 2, "canary_percent": 50.0}))


@pytest.fixture(scope="module")
def served(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    settings = make_settings(broker, canary_min_validations=10, canary_margin=0.05)
    asyncio.run(provision(settings))
    worker = WorkerProcess(settings, tmp_path_factory.mktemp("validation") / "worker.log", "val-1").start()
    yield settings
    assert worker.stop() == 0, worker.log()[-3000:]


async def send(settings: Settings, task: str, texts: list[str], labelled: bool = False) -> list[str]:
    """One request per text; `labelled` ones carry their true label as the expected output."""
    requests = [request_from(task, {"text": text}, expected_output=truth(text) if labelled else None)
                for text in texts]
    async with RequestSender(settings) as sender:
        await sender.send(requests)
    return [r.request_id for r in requests]


async def validations_of(settings: Settings, request_ids: list[str], timeout_s: float = 60) -> dict[str, Validation]:
    wanted = set(request_ids)
    records = await collect(settings, "validations",
                            lambda rs: wanted <= {r.request_id for r in rs if isinstance(r, Validation)}, timeout_s)
    return {r.request_id: r for r in records if isinstance(r, Validation) and r.request_id in wanted}


async def test_label_oracle_compares_with_the_expected_output(served: Settings) -> None:
    ids = await send(served, "labelled", TEXTS, labelled=True)
    found = await validations_of(served, ids)
    for request_id, text in zip(ids, TEXTS, strict=True):
        record = found[request_id]
        assert record.oracle_kind is OracleKind.LABEL and record.status is ValidationStatus.VALIDATED
        assert record.match is (truth(text) == "ham"), record  # the program always says ham
        assert record.program_output == "ham" and record.oracle_output == truth(text)
    # The validator's partials reach the daily analytics (the module's first validations of this task).
    deadline = time.monotonic() + 30
    while not any(day.version is None and (day.validated, day.matched) == (6, 3)
                  for day in (await daily_stats(served, "labelled")).values()):
        assert time.monotonic() < deadline, await daily_stats(served, "labelled")
        await asyncio.sleep(0.2)


async def test_shadow_oracle_runs_the_other_version_in_the_sandbox(served: Settings) -> None:
    ids = await send(served, "shadowed", TEXTS)
    found = await validations_of(served, ids)
    assert all(r.oracle_kind is OracleKind.SHADOW and r.match is True for r in found.values()), found
    assert {r.oracle_output for r in found.values()} == {"spam", "ham"}
    assert all(r.version == 2 for r in found.values())


async def test_external_oracle_answers_or_expires(served: Settings) -> None:
    labels = {canonical({"text": text}): truth(text) for text in TEXTS[:4]}  # the last two go unanswered
    # The oracle runs before the requests are sent, as a service would: its verdicts may well be read by the
    # worker before the requests they answer (test_a_verdict_read_before_its_request_still_validates_it).
    stop, ready = asyncio.Event(), asyncio.Event()
    oracle = asyncio.ensure_future(serve_oracle(served, labels, "test-labels", stop, on_ready=ready.set))
    try:
        await asyncio.wait_for(ready.wait(), 60)
        ids = await send(served, "asked", TEXTS)
        found = await validations_of(served, ids, timeout_s=90)
    finally:
        stop.set()
        await oracle
    answered = [found[i] for i in ids[:4]]
    unanswered = [found[i] for i in ids[4:]]
    assert all(r.status is ValidationStatus.VALIDATED and r.match is True for r in answered), answered
    assert all(r.status is ValidationStatus.EXPIRED and r.match is None for r in unanswered), unanswered


async def test_a_verdict_read_before_its_request_still_validates_it(served: Settings) -> None:
    """Kafka orders no two topics: the verdict waits in the join's table until its request is read."""
    topics = topics_for(served.topic_prefix)
    execution_id = execution_id_for("asked", "early-bird")
    request = ValidationRequest(
        execution_id=execution_id, request_id="early-bird", task_id="asked", version=1, input={"text": "free"},
        output="spam", status="ok", oracle=OracleSpec(kind=OracleKind.EXTERNAL, timeout_s=ORACLE_TIMEOUT_S),
        requested_at=utc_now())
    verdict = OracleVerdict(execution_id=execution_id, task_id="asked", output="spam", oracle_id="early",
                            answered_at=utc_now())
    producer = make_producer(served)
    await producer.start()
    try:
        verdicts = codec_for(OracleVerdict, served, topics.oracle_verdicts)
        await producer.send_and_wait(topics.oracle_verdicts.name, verdicts.encode(verdict), key=execution_id.encode())
        # The join holds the verdict (its table's changelog says so) before the request is even sent.
        deadline = time.monotonic() + 60
        while not any(value and execution_id.encode() in value and b'"verdict"' in value  # None: a tombstone
                      for value in await read_values(served, topics.oracle_pending.name, 1 << 20, timeout_s=1)):
            assert time.monotonic() < deadline, "the worker never held the early verdict"
        requests = codec_for(ValidationRequest, served, topics.oracle_requests)
        await producer.send_and_wait(topics.oracle_requests.name, requests.encode(request), key=execution_id.encode())
    finally:
        await producer.stop()
    found = await validations_of(served, ["early-bird"])
    assert found["early-bird"].status is ValidationStatus.VALIDATED and found["early-bird"].match is True


async def test_a_better_canary_is_promoted_and_a_worse_one_rolled_back(served: Settings) -> None:
    texts = [TEXTS[i % len(TEXTS)] + f" #{i}" for i in range(80)]
    for task in ("better", "worse"):  # half run the canary; each request carries its label
        await send(served, task, texts, labelled=True)
    records = await collect(served, "canary_decisions",
                            lambda rs: {r.task_id for r in rs if isinstance(r, CanaryDecision)} >= {"better", "worse"},
                            timeout_s=90)
    decided = {r.task_id: r for r in records if isinstance(r, CanaryDecision)}
    assert decided["better"].action is CanaryAction.PROMOTED, decided["better"]
    assert decided["worse"].action is CanaryAction.ROLLED_BACK, decided["worse"]
    assert decided["better"].validations >= 10 and decided["better"].candidate_accuracy == 1.0
    # The decisions changed the tasks: the better candidate is active, both canaries are over.
    def settled(specs: list) -> bool:
        last = {s.name: s for s in specs if isinstance(s, TaskSpec)}
        return ("better" in last and last["better"].active_version == 2 and last["better"].canary_version is None
                and "worse" in last and last["worse"].active_version == 1 and last["worse"].canary_version is None)

    await collect(served, "task_specs", settled, timeout_s=30)


def test_labels_file_shape(tmp_path: Path) -> None:
    from devtools.oracle import LabelsError, load_labels

    path = tmp_path / "labels.jsonl"
    path.write_text('{"input": {"text": "a"}, "output": "ham"}\n\nnot json\n')
    with pytest.raises(LabelsError, match="line 3"):
        load_labels(path)
    path.write_text('{"input": {"text": "a", "b": 1}, "output": "ham"}\n')
    assert load_labels(path) == {canonical({"b": 1, "text": "a"}): "ham"}


async def test_sampling_strategies_on_the_stream(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """edge_cases samples every failed execution and a share of the rest; random samples its rate; each result's
    flag is what was sampled: a validation exists for exactly the flagged executions."""
    settings = make_settings(broker)
    await apply_topics(settings, topics_for(settings.topic_prefix))
    async with ControlPlane(settings) as control:
        for name, strategy, rate in (("edges", SamplingStrategy.EDGE_CASES, 0.1),
                                     ("randomly", SamplingStrategy.RANDOM, 0.3)):
            await control.put_task(TaskSpec(name=name, sampling_strategy=strategy, sampling_rate=rate,
                                            latency_target_ms=1000, updated_at=utc_now()))
            await control.publish(name, "def run(input):\n    return 1 // input['n']\n", activate=True)
    worker = WorkerProcess(settings, tmp_path / "worker.log", "sampler").start()
    try:
        inputs = [{"n": 0 if i % 5 == 0 else 1} for i in range(400)]  # every fifth divides by zero
        # Fixed request ids: which executions a rate samples is then known (DRAWS), not left to fresh uuids.
        requests = [request_from(task, value, expected_output=1, request_id=f"sampled-{task}-{i}")
                    for task in ("edges", "randomly") for i, value in enumerate(inputs)]
        async with RequestSender(settings) as sender:
            await sender.send(requests)
        results = await results_for(settings, [r.request_id for r in requests], timeout_s=90)
        flagged = {r.request_id for r in results.values() if r.sampled_for_validation}
        found = await validations_of(settings, sorted(flagged), timeout_s=90)
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
    assert set(found) == flagged  # exactly the flagged executions were validated
    edges = [r for r in results.values() if r.task_id == "edges"]
    failed = [r for r in edges if r.status.value == "error"]
    assert len(failed) == 80 and all(r.sampled_for_validation for r in failed)
    # The rest: exactly the executions whose id draws under the rate, and any slower than the latency target.
    others = [r for r in edges if r.status.value == "ok"]
    assert all(r.sampled_for_validation is (fraction_of(r.execution_id) < 0.1 or r.latency_ms > 1000)
               for r in others), others
    assert 0.04 < sum(fraction_of(r.execution_id) < 0.1 for r in others) / len(others) < 0.2
    randomly = [r for r in results.values() if r.task_id == "randomly"]
    assert all(r.sampled_for_validation is (fraction_of(r.execution_id) < 0.3) for r in randomly), randomly
    assert 0.22 < sum(r.sampled_for_validation for r in randomly) / len(randomly) < 0.38
    assert all(found[r.request_id].match is False for r in failed)


async def test_undecodable_validation_traffic_becomes_dead_letters(served: Settings) -> None:
    topics = topics_for(served.topic_prefix)
    producer = make_producer(served)
    await producer.start()
    try:
        for spec in (topics.validation_requests, topics.oracle_verdicts, topics.stats_partials):
            await producer.send_and_wait(spec.name, b"\xff not a record " + spec.name.encode(), key=b"k")
    finally:
        await producer.stop()
    wanted = {topics.validation_requests.name, topics.oracle_verdicts.name, topics.stats_partials.name}
    letters = await collect(served, "dead_letters",
                            lambda rs: wanted <= {r.source_topic for r in rs if isinstance(r, DeadLetter)}, 60)
    for letter in (r for r in letters if isinstance(r, DeadLetter) and r.source_topic in wanted):
        assert letter.error_type == "DecodeError" and letter.value.endswith(letter.source_topic.encode())


async def test_the_validators_commit_every_request_they_answered(served: Settings) -> None:
    """Run last: every validation request of the module's traffic (the undecodable one included) is answered,
    then committed, so that a restarted worker does not validate them all again."""
    ids = await send(served, "labelled", TEXTS, labelled=True)
    await validations_of(served, ids)
    spec = topics_for(served.topic_prefix).validation_requests
    wanted = await end_offsets(served, spec)
    assert sum(wanted.values()) >= len(ids)
    deadline = time.monotonic() + 30
    while (done := await committed(served, f"{served.app_id}-validators", spec.name)) != wanted:
        assert time.monotonic() < deadline, f"committed {done}, log ends at {wanted}"
        await asyncio.sleep(0.2)
