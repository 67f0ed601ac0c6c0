"""The schema registry side of the Avro wire format: reads schemas/*.avsc and the topic registry, produces
registered subjects (<topic>-value, TopicNameStrategy) under BACKWARD compatibility and their schema ids."""

from __future__ import annotations

import json
import threading
import warnings
from typing import Any

import avro.errors
import avro.schema
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType
from confluent_kafka.schema_registry import ConfigCompatibilityLevel, Schema, SchemaRegistryClient, ServerConfig
from confluent_kafka.schema_registry.error import SchemaRegistryError

from app.contract.topics import Topics, TopicSpec
from app.settings import Settings

# Built on confluent-kafka's SchemaRegistryClient (a `mock://` URL gives its in-process mock).

COMPATIBILITY = ConfigCompatibilityLevel.BACKWARD

_clients: dict[tuple[str, str | None], SchemaRegistryClient] = {}
_clients_lock = threading.Lock()


class RegistryError(RuntimeError):
    """The registry could not be used (unreachable, refused the credentials, answered an error)."""


class SchemaIncompatible(RegistryError):
    """A schema the registry must not take: it would break BACKWARD compatibility of its subject."""


def registry_client(settings: Settings) -> SchemaRegistryClient:
    """The one registry client of this process for the settings' registry URL and user.

    One per URL because the client caches schemas by id (no registry call per record) and because a
    `mock://` registry lives inside its client object: every codec of the process must see the same one.
    """
    if not settings.registry_url:
        raise RegistryError("the avro wire format needs a schema registry: set registry_url")
    key = (settings.registry_url, settings.registry_username)
    with _clients_lock:
        if key not in _clients:
            conf: dict[str, Any] = {"url": settings.registry_url}
            if settings.registry_username is not None:
                secret = settings.registry_password.get_secret_value() if settings.registry_password else ""
                conf["basic.auth.user.info"] = f"{settings.registry_username}:{secret}"
            _clients[key] = SchemaRegistryClient.new_client(conf)
        return _clients[key]


def subject_for(topic: TopicSpec) -> str:
    """The subject of a topic's values (Confluent's TopicNameStrategy)."""
    return f"{topic.name}-value"


def avro_schema(schema: dict[str, Any]) -> Schema:
    """Our .avsc as the registry's Schema (compact JSON, so equal schemas are equal strings)."""
    return Schema(json.dumps(schema, separators=(",", ":")), "AVRO")


def register_value_schema(client: SchemaRegistryClient, topic: TopicSpec, schema: dict[str, Any]) -> int:
    """Set BACKWARD on the topic's subject, refuse a schema that breaks it, register it; the schema id.

    Registering a schema the subject already has returns its id and adds no version. The check here runs
    before the registry's own so that the error names the field (the registry enforces it too)."""
    subject = subject_for(topic)
    try:
        client.set_config(subject, ServerConfig(compatibility=COMPATIBILITY))
        _check_backward(client, subject, schema)
        return int(client.register_schema(subject, avro_schema(schema)))
    except SchemaRegistryError as exc:
        if exc.http_status_code == 409:  # the registry's own compatibility check refused it
            raise SchemaIncompatible(f"subject {subject}: the registry refused the schema: {exc.error_message}") \
                from exc
        raise RegistryError(f"subject {subject}: the registry answered {exc}") from exc
    except RegistryError:
        raise
    except Exception as exc:  # connection refused, bad URL, unreadable answer: the HTTP client's many kinds
        raise RegistryError(f"subject {subject}: cannot reach the registry: {exc}") from exc


def registered_id(client: SchemaRegistryClient, topic: TopicSpec, schema: dict[str, Any]) -> int:
    """The id our schema has under the topic's subject; RegistryError if it is not registered there (registering
    is a step of its own: register_schemas)."""
    subject = subject_for(topic)
    try:
        found = client.lookup_schema(subject, avro_schema(schema)).schema_id
    except SchemaRegistryError as exc:
        if exc.http_status_code == 404:
            raise RegistryError(f"subject {subject} has no schema like schemas/{schema.get('name')}.avsc: register "
                                "them with `loopai topics apply` or `loopai schemas register` (a worker registers "
                                "them when it starts)") from exc
        raise RegistryError(f"subject {subject}: the registry answered {exc}") from exc
    except Exception as exc:  # connection refused, bad URL, unreadable answer: the HTTP client's many kinds
        raise RegistryError(f"subject {subject}: cannot reach the registry: {exc}") from exc
    if found is None:
        raise RegistryError(f"subject {subject}: the registry's answer carries no schema id")
    return found


def register_schemas(settings: Settings, topics: Topics) -> dict[str, int]:
    """Register the value schema of every topic that carries records; subject -> schema id."""
    from app.contract.codecs import load_schema  # codecs builds on this module

    client = registry_client(settings)
    return {
        subject_for(topic): register_value_schema(client, topic, load_schema(topic.record.__name__))
        for topic in topics.all()
        if topic.record_name is not None
    }


def _check_backward(client: SchemaRegistryClient, subject: str, schema: dict[str, Any]) -> None:
    """BACKWARD: a consumer with the new schema reads what was written with the subject's latest one."""
    try:
        latest = client.get_latest_version(subject)
    except SchemaRegistryError as exc:
        if exc.http_status_code == 404:
            return  # a new subject: nothing to be compatible with
        raise
    if latest.schema is None or latest.schema.schema_str is None:
        return
    with warnings.catch_warnings():  # avro does not know our `json` logical type; it is a string to it
        warnings.simplefilter("ignore", avro.errors.IgnoredLogicalType)
        reader = avro.schema.parse(json.dumps(schema))
        writer = avro.schema.parse(latest.schema.schema_str)
    result = ReaderWriterCompatibilityChecker().get_compatibility(reader, writer)
    if result.compatibility is SchemaCompatibilityType.compatible:
        return
    problems = [kind.value for kind in result.incompatibilities]
    fields = sorted({name for location in result.locations if (name := _field_at(schema, location))})
    raise SchemaIncompatible(
        f"subject {subject}: the new {schema.get('name')} schema is not {COMPATIBILITY} compatible with "
        f"version {latest.version}: field {', '.join(repr(f) for f in fields) or '(record)'}: "
        f"{', '.join(problems)} ({'; '.join(sorted(result.messages))})"
    )


def _field_at(schema: dict[str, Any], location: str) -> str | None:
    """The top-level field name at a location such as "/fields/8/type" (None for "/")."""
    parts = location.strip("/").split("/")
    if len(parts) >= 2 and parts[0] == "fields" and parts[1].isdigit():
        fields = schema.get("fields", [])
        index = int(parts[1])
        return str(fields[index]["name"]) if index < len(fields) else None
    return None
