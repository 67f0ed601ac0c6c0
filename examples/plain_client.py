"""A plain Kafka client using loopai-stream: produces one execution request with confluent-kafka and reads its
result back, in the JSON wire format (default) or, with --registry URL, the Avro one (Confluent wire format).

    python examples/plain_client.py --bootstrap 127.0.0.1:9092 spam-filter '{"text": "FREE prize"}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task_id")
    parser.add_argument("input", help="a JSON object")
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--prefix", default="loopai.", help="the workers' topic_prefix")
    parser.add_argument("--registry", help="schema registry URL: use the Avro wire format")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    requests, results = f"{args.prefix}execution-requests", f"{args.prefix}execution-results"
    request = {"request_id": str(uuid.uuid4()), "task_id": args.task_id, "input": json.loads(args.input)}

    if args.registry:
        registry = SchemaRegistryClient({"url": args.registry})
        # Subjects are <topic>-value (TopicNameStrategy); the workers registered them at start-up.
        writer = registry.get_latest_version(f"{requests}-value").schema.schema_str
        # "input" is a JSON string on the Avro wire (logicalType json): docs/wire-formats.md.
        encode = AvroSerializer(registry, writer, lambda r, _: {**r, "input": json.dumps(r["input"])})
        decode_result = AvroDeserializer(registry, from_dict=lambda r, _: {**r, "output": _json(r.get("output"))})
        value = encode(request, SerializationContext(requests, MessageField.VALUE))
    else:
        value = json.dumps(request).encode()

    consumer = Consumer({"bootstrap.servers": args.bootstrap, "group.id": "unused", "enable.auto.commit": False})
    # Every partition of the results, from its end as it is now: the result cannot arrive before that.
    partitions = consumer.list_topics(results, timeout=10).topics[results].partitions
    consumer.assign([TopicPartition(results, p, consumer.get_watermark_offsets(TopicPartition(results, p))[1])
                     for p in partitions])
    deadline = time.monotonic() + args.timeout
    producer = Producer({"bootstrap.servers": args.bootstrap, "acks": "all"})
    producer.produce(requests, key=args.task_id.encode(), value=value)  # keyed by task: one owner per task
    producer.flush(10)
    try:
        while time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None or message.error():
                continue
            if args.registry:
                result = decode_result(message.value(), SerializationContext(results, MessageField.VALUE))
            else:
                result = json.loads(message.value())
            if result["request_id"] == request["request_id"] and result["task_id"] == args.task_id:
                print(json.dumps(result, default=str))
                return 0
    finally:
        consumer.close()
    print(f"no result within {args.timeout:g} s", file=sys.stderr)
    return 1


def _json(text: str | None) -> object:
    """A JSON-typed field as it is on the Avro wire: JSON text (or null)."""
    return None if text is None else json.loads(text)


if __name__ == "__main__":
    sys.exit(main())
