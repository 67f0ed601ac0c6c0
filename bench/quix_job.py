"""The benchmark job on Quix Streams, run in its own environment (bench/.venv-quix):
decode -> classify (the same program, in-process) -> encode -> produce. Prints one JSON line: seconds and CPU
seconds from the first message to the last one flushed."""

import json
import sys
import time

import orjson
from quixstreams import Application
from quixstreams.models.serializers.json import JSONDeserializer, JSONSerializer


def main() -> None:
    bootstrap, source_topic, output_topic, count, group, program_path = sys.argv[1:7]
    namespace: dict = {}
    with open(program_path) as source:
        exec(source.read(), namespace)  # trusted here: this is the unisolated baseline
    run = namespace["run"]
    app = Application(broker_address=bootstrap, consumer_group=group, auto_offset_reset="earliest",
                      use_changelog_topics=False, auto_create_topics=False, loglevel="WARNING",
                      consumer_extra_config={"session.timeout.ms": 6000})
    requests = app.topic(source_topic, value_deserializer=JSONDeserializer(loads=orjson.loads))
    results = app.topic(output_topic, value_serializer=JSONSerializer(dumps=orjson.dumps))
    clock: list[float] = []

    def job(v: dict) -> dict:
        if not clock:
            clock.extend((time.perf_counter(), time.process_time()))
        return {"request_id": v["request_id"], "task_id": v["task_id"], "output": run(v["input"])}

    frame = app.dataframe(requests)
    frame = frame.apply(job)
    frame.to_topic(results)
    app.run(frame, count=int(count), collect=False)
    # Output timestamps copy the input's, so the job times itself: first message in -> last one flushed. CPU of
    # the whole process (every thread, librdkafka's included) over the same span.
    print(json.dumps({"seconds": time.perf_counter() - clock[0], "cpu_s": time.process_time() - clock[1]}))


if __name__ == "__main__":
    main()
