"""The Avro wire format against confluent-kafka's own serializers and registries, broker-free: our bytes read by
its AvroDeserializer, its AvroSerializer's bytes read by our codec, subjects and BACKWARD compatibility."""

import copy
import io
import json
from itertools import count
from typing import Any

import fastavro
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

from app.contract.codecs import DecodeError, RegistryAvroCodec, codec_for, load_schema
from app.contract.records import ExecutionRequest, Record, TaskSpec, utc_now
from app.contract.registry import SchemaIncompatible, register_schemas, register_value_schema, registry_client
from app.contract.topics import TopicSpec, topics_for
from app.settings import Settings
from devtools.registry import LocalRegistry
from tests.contract.test_codecs import SAMPLES

_mocks = count()


def _avro_settings(url: str | None = None) -> Settings:
    """A registry of its own (a mock:// one unless given) and a topic prefix of its own."""
    n = next(_mocks)
    settings = Settings(wire_format="avro", registry_url=url or f"mock://registry-{n}", topic_prefix=f"reg{n}.")
    register_schemas(settings, topics_for(settings.topic_prefix))  # a step of its own: codecs look the ids up
    return settings


def _topic_of(settings: Settings, record: Record) -> TopicSpec:
    return next(t for t in topics_for(settings.topic_prefix).all() if t.record_name == type(record).__name__)


@pytest.mark.parametrize("record", SAMPLES, ids=lambda r: type(r).__name__)
def test_our_bytes_decode_with_confluents_avro_deserializer(record: Record) -> None:
    settings = _avro_settings()
    topic = _topic_of(settings, record)
    encoded = codec_for(type(record), settings, topic).encode(record)
    read = AvroDeserializer(registry_client(settings))(encoded, SerializationContext(topic.name, MessageField.VALUE))
    assert type(record).model_validate(read) == record


@pytest.mark.parametrize("record", SAMPLES, ids=lambda r: type(r).__name__)
def test_confluents_avro_serializer_bytes_decode_with_our_codec(record: Record) -> None:
    settings = _avro_settings()
    topic = _topic_of(settings, record)
    serializer = AvroSerializer(registry_client(settings), json.dumps(load_schema(type(record).__name__)))
    encoded = serializer(record.model_dump(), SerializationContext(topic.name, MessageField.VALUE))
    assert encoded is not None and encoded[0] == 0
    assert codec_for(type(record), settings, topic).decode(encoded) == record


def test_every_record_topic_has_a_value_subject_with_backward_compatibility() -> None:
    """Against the HTTP registry (the mock keeps no subject config): TopicNameStrategy subjects, BACKWARD each,
    and registering again adds no version."""
    with LocalRegistry() as registry:
        settings = _avro_settings(registry.url)
        topics = topics_for(settings.topic_prefix)
        first = register_schemas(settings, topics)
        assert set(first) == {f"{t.name}-value" for t in topics.all() if t.record_name is not None}
        assert register_schemas(settings, topics) == first
        other = SchemaRegistryClient({"url": registry.url})
        assert {other.get_compatibility(subject) for subject in first} == {"BACKWARD"}
        assert {tuple(registry.store.get_versions(subject)) for subject in first} == {(1,)}


def _evolved(change: Any) -> dict[str, Any]:
    schema = copy.deepcopy(load_schema("ExecutionRequest"))
    change(schema["fields"])
    return schema


def test_an_incompatible_schema_change_is_refused_naming_subject_and_field() -> None:
    settings = _avro_settings()
    client, topic = registry_client(settings), topics_for(settings.topic_prefix).execution_requests
    register_value_schema(client, topic, load_schema("ExecutionRequest"))
    no_default = _evolved(lambda fields: fields.append({"name": "priority", "type": "int"}))
    with pytest.raises(SchemaIncompatible, match=rf"subject {topic.name}-value: .* not BACKWARD compatible "
                                                 r"with version 1: field 'priority': reader_field_missing_default"):
        register_value_schema(client, topic, no_default)
    retyped = _evolved(lambda fields: fields[1].update(type="int"))
    with pytest.raises(SchemaIncompatible, match=r"field 'task_id': type_mismatch"):
        register_value_schema(client, topic, retyped)
    assert client.get_versions(f"{topic.name}-value") == [1]


def test_a_compatible_change_registers_and_both_versions_decode() -> None:
    """A field added with a default is BACKWARD compatible; bytes of the new writer resolve to our reader."""
    settings = _avro_settings()
    client, topic = registry_client(settings), topics_for(settings.topic_prefix).execution_requests
    ours = codec_for(ExecutionRequest, settings, topic)
    newer = _evolved(lambda fields: fields.append({"name": "priority", "type": "int", "default": 0}))
    newer_id = register_value_schema(client, topic, newer)
    assert newer_id != ours.schema_id  # type: ignore[attr-defined]
    serializer = AvroSerializer(client, json.dumps(newer), conf={"auto.register.schemas": False,
                                                                  "use.latest.version": True})
    request = SAMPLES[0]
    encoded = serializer({**request.model_dump(), "priority": 7}, SerializationContext(topic.name, MessageField.VALUE))
    assert encoded is not None and int.from_bytes(encoded[1:5], "big") == newer_id
    assert ours.decode(encoded) == request
    assert ours.decode(ours.encode(request)) == request


def test_task_spec_with_max_timeout_ms_reads_the_specs_written_before_it() -> None:
    """max_timeout_ms came later (issue 21): the subject takes the new schema, and a spec written without the field
    reads as the default, 1000."""
    settings = _avro_settings()
    client, topic = registry_client(settings), topics_for(settings.topic_prefix).task_specs
    older = copy.deepcopy(load_schema("TaskSpec"))
    older["fields"] = [f for f in older["fields"] if f["name"] != "max_timeout_ms"]
    old_id = register_value_schema(client, topic, older)
    ours = codec_for(TaskSpec, settings, topic)
    assert ours.schema_id != old_id  # type: ignore[attr-defined]
    spec = TaskSpec(name="spam", active_version=2, updated_at=utc_now())
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(older), spec.model_dump(exclude={"max_timeout_ms"}))
    written = b"\x00" + old_id.to_bytes(4, "big") + body.getvalue()  # what a producer of the old schema wrote
    assert ours.decode(written) == spec and ours.decode(written).max_timeout_ms == 1000


def test_the_registrys_own_refusal_is_a_schema_incompatible_error() -> None:
    """A real registry answers 409 to a schema that breaks its subject's compatibility (simulated)."""
    class Refusing(type(registry_client(_avro_settings()))):  # type: ignore[misc]
        def register_schema(self, subject_name: str, schema: Any, normalize_schemas: bool = False) -> int:
            raise SchemaRegistryError(409, 409, "Schema being registered is incompatible with an earlier schema")

    topic = topics_for("refused.").execution_requests
    with pytest.raises(SchemaIncompatible, match=r"subject refused\.execution-requests-value: the registry refused"):
        register_value_schema(Refusing({"url": "mock://refusing"}), topic, load_schema("ExecutionRequest"))


def test_an_unknown_schema_id_is_asked_of_the_registry_once() -> None:
    """A stream of records with a bogus id is a stream of DecodeErrors, not of registry calls."""
    asked: list[int] = []

    class Counting(type(registry_client(_avro_settings()))):  # type: ignore[misc]
        def get_schema(self, schema_id: int, *args: Any, **kwargs: Any) -> Any:
            asked.append(schema_id)
            return super().get_schema(schema_id, *args, **kwargs)

    counting = Counting({"url": "mock://counting"})
    register_value_schema(counting, topics_for("counting.").execution_requests, load_schema("ExecutionRequest"))
    codec = RegistryAvroCodec(ExecutionRequest, counting, topics_for("counting.").execution_requests)
    bogus = b"\x00\x00\x00\x30\x39" + codec.encode(SAMPLES[1])[5:]
    for _ in range(100):
        with pytest.raises(DecodeError, match="schema id 12345 is unknown to the schema registry"):
            codec.decode(bogus)
    assert asked == [12345]
