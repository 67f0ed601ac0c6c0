"""Cross-tenant isolation through the broker: a hostile task and a victim task interleaved in the same batches of
one worker. The victim's results equal those of a run without the attacker."""

import pytest

from app.contract.records import TaskSpec, utc_now
from app.contract.topics import topics_for
from app.control.plane import ControlPlane
from app.domain.programs import check_source
from app.kafka.clients import apply_topics
from app.kafka.loop_client import RequestSender, request_from
from app.settings import Settings
from devtools.broker import EmbeddedBroker
from tests.conftest import WorkerProcess, make_settings, results_for

# Uses every piece of process-wide state an attacker could poison: a class of a shared module, global random
# and decimal state, and its own module globals.
VICTIM = """
import collections, decimal, random
SEEN = []
def run(input):
    SEEN.append(1)
    random.seed(input["n"])
    words = collections.Counter(input["text"].split()).most_common(1)
    value = decimal.Decimal(1) / decimal.Decimal(7)
    return {"top": words, "draw": random.random(), "seventh": str(value), "n": input["n"]}
"""

# Tries to change what other programs see, hoard memory, and burn time in C and Python.
ATTACKER = """
import collections, decimal, hashlib, random
HOARD = []
def run(input):
    collections.Counter.most_common = lambda self, n=None: [["pwned", 1]]
    try:
        random.random = lambda: 0.5
    except AttributeError:  # module namespaces are read-only; the class above is not
        pass
    random.seed(0)
    decimal.getcontext().prec = 2
    kind = input["n"] % 4
    if kind == 0:
        HOARD.append(bytearray(60_000_000))
    elif kind == 1:
        return hashlib.pbkdf2_hmac("sha256", b"x", b"y", 10 ** 9).hex()
    elif kind == 2:
        while True:
            pass
    return collections.Counter("aab").most_common(1)
"""


async def _provision(settings: Settings, with_attacker: bool) -> None:
    await apply_topics(settings, topics_for(settings.topic_prefix))
    async with ControlPlane(settings) as control:
        await control.put_task(TaskSpec(name="victim", updated_at=utc_now(), max_timeout_ms=2000))
        await control.publish("victim", VICTIM, activate=True)
        if with_attacker:
            await control.put_task(TaskSpec(name="attacker", updated_at=utc_now()))
            await control.publish("attacker", ATTACKER, activate=True)


async def _victim_outputs(settings: Settings, with_attacker: bool, log_dir) -> dict[int, object]:
    await _provision(settings, with_attacker)
    worker = WorkerProcess(settings, log_dir / f"worker-{with_attacker}.log", f"iso-{with_attacker}").start()
    try:
        # The victims' calls get 2 s (a busy machine may hold a process off its core for a while); the
        # attackers' 300 ms, which their spinning runs out.
        victims = [request_from("victim", {"text": f"w{n % 3} w{n % 3} x{n}", "n": n}, timeout_ms=2000)
                   for n in range(60)]
        attackers = [request_from("attacker", {"n": n}, timeout_ms=300) for n in range(60)] if with_attacker else []
        interleaved = [r for pair in zip(victims, attackers or victims, strict=True) for r in pair]
        requests = interleaved if with_attacker else victims
        async with RequestSender(settings) as sender:
            await sender.send(requests)
        results = await results_for(settings, [r.request_id for r in requests], timeout_s=120)
    finally:
        assert worker.stop() == 0, worker.log()[-2000:]
    by_id = {r.request_id: r for r in results.values()}
    outputs = {}
    for request in victims:
        result = by_id[request.request_id]
        assert result.status.value == "ok", result
        output = dict(result.output)
        assert output["n"] == request.input["n"]
        outputs[request.input["n"]] = {k: v for k, v in output.items()}
    if with_attacker:
        statuses = {by_id[r.request_id].status.value for r in attackers}
        # Its calls kept timing out, so its budget may have suspended it: the rest of its calls were refused.
        assert statuses <= {"ok", "error", "timeout", "rejected"} and "timeout" in statuses
        assert all("is suspended until" in by_id[r.request_id].error_message for r in attackers
                   if by_id[r.request_id].status.value == "rejected")
        # The patch took effect, in the attacker's own processes only.
        assert any(by_id[r.request_id].output == [["pwned", 1]] for r in attackers)
    return outputs


@pytest.mark.timeout(300)
async def test_victim_results_are_the_same_with_an_attacker_beside_it(broker: EmbeddedBroker, tmp_path) -> None:
    alone = await _victim_outputs(make_settings(broker, sandbox_memory_mb=256, executor_batch_size=40),
                                  False, tmp_path)
    attacked = await _victim_outputs(make_settings(broker, sandbox_memory_mb=256, executor_batch_size=40),
                                     True, tmp_path)
    assert attacked == alone
    assert all(output["top"] != [["pwned", 1]] for output in attacked.values())


def test_the_attack_passes_the_static_check() -> None:
    """Else the test above would only show that the attacker was rejected at publish."""
    check_source(VICTIM)
    check_source(ATTACKER)
