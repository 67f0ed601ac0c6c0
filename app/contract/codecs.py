"""Codecs: record models <-> bytes, one per wire format ("json" and "avro"), built on schemas/*.avsc."""

from __future__ import annotations

import base64
import io
import json
import time
from functools import cache
from typing import Any, Generic, Protocol, TypeVar

import fastavro
import fastavro.read
import fastavro.write
import orjson
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError
from pydantic import ValidationError

from app.contract.files import contract_dir
from app.contract.records import RECORD_TYPES, Record
from app.contract.registry import RegistryError, registered_id, registry_client
from app.contract.topics import TopicSpec
from app.settings import Settings

# JSON: the record's fields as a JSON object (snake_case), validated by the pydantic mirror of the .avsc.
# Avro: the Confluent wire format (magic byte, schema id, Avro binary via fastavro) with a schema registry;
# `logicalType: json` strings carry nested JSON values. docs/wire-formats.md describes both.

R = TypeVar("R", bound=Record)


class DecodeError(ValueError):
    """Bytes that are not a valid record of the expected type; the message says why."""


def _json_to_text(value: Any, _schema: Any) -> str:
    return orjson.dumps(value).decode()


def _text_to_json(text: str, _writer: Any, _reader: Any) -> Any:
    return orjson.loads(text)


def _install_json_type() -> None:
    """Teach fastavro our `json` logical type (a string holding any JSON value). fastavro keeps logical types
    in module globals: they are set when the first of our schemas is parsed, not when this module is imported."""
    fastavro.write.LOGICAL_WRITERS["string-json"] = _json_to_text
    fastavro.read.LOGICAL_READERS["string-json"] = _text_to_json


@cache
def load_schema(record_name: str) -> dict[str, Any]:
    """The raw .avsc of a record, as a dict."""
    path = contract_dir("schemas") / f"{record_name}.avsc"
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


@cache
def parsed_schema(record_name: str) -> Any:
    """The fastavro-parsed schema of a record (parsed once), our `json` logical type installed."""
    _install_json_type()
    return fastavro.parse_schema(load_schema(record_name))


class Codec(Protocol[R]):
    """Turns one record type into bytes and back."""

    model: type[R]

    def encode(self, record: R) -> bytes:
        """The record in this wire format."""
        ...

    def encode_fields(self, fields: dict[str, Any]) -> bytes:
        """Encode a record given as its fields (every field, python values) without building the model:
        the executor's hot path. encode_fields(r.model_dump()) decodes to the same record as encode(r)."""
        ...

    def decode(self, data: bytes) -> R:
        """The record the bytes hold; DecodeError when they hold none."""
        ...

    def loose(self, data: bytes) -> dict[str, Any] | None:
        """The fields as a plain dict without validation, or None if the bytes are not even that."""
        ...


class JsonCodec(Generic[R]):
    """The record as a JSON object."""

    def __init__(self, model: type[R]) -> None:
        self.model = model
        # model_validate_json without its Python wrapper: a quarter less per record on the executor's hot path
        self._validate_json = model.__pydantic_validator__.validate_json

    def encode(self, record: R) -> bytes:
        return self.encode_fields(record.model_dump())

    def encode_fields(self, fields: dict[str, Any]) -> bytes:
        """The one JSON encoding of records: UTC times end in "Z", bytes are URL-safe base64 (as pydantic)."""
        return orjson.dumps(fields, default=_bytes_as_base64, option=orjson.OPT_UTC_Z)

    def decode(self, data: bytes) -> R:
        try:
            return self._validate_json(data)  # type: ignore[no-any-return]
        except ValidationError as exc:
            raise DecodeError(_describe(exc, self.model)) from exc

    def loose(self, data: bytes) -> dict[str, Any] | None:
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        return value if isinstance(value, dict) else None


class RegistryAvroCodec(Generic[R]):
    """The record as Avro in the Confluent wire format: magic byte 0, the 4-byte big-endian schema id of the
    topic's subject, then the Avro binary body. Reads any writer schema the registry knows (by the id in the
    bytes), resolved to ours; parsed writer schemas are cached by id, so the registry is asked once per id."""

    def __init__(self, model: type[R], client: SchemaRegistryClient, topic: TopicSpec) -> None:
        self.model = model
        self._client = client
        self._schema = parsed_schema(model.__name__)
        self.schema_id = registered_id(client, topic, load_schema(model.__name__))
        self._header = _MAGIC + self.schema_id.to_bytes(4, "big")
        # schema id -> the parsed writer schema, or None when it is ours (read without resolution)
        self._writers: dict[int, Any] = {self.schema_id: None}
        self._unknown: dict[int, float] = {}  # schema id -> monotonic time until which it is not asked again

    def encode(self, record: R) -> bytes:
        return self.encode_fields(record.model_dump())

    def encode_fields(self, fields: dict[str, Any]) -> bytes:
        buffer = io.BytesIO()
        buffer.write(self._header)
        fastavro.schemaless_writer(buffer, self._schema, fields)
        return buffer.getvalue()

    def decode(self, data: bytes) -> R:
        values = self._read(data)
        try:
            return self.model.model_validate(values)
        except ValidationError as exc:
            raise DecodeError(_describe(exc, self.model)) from exc

    def loose(self, data: bytes) -> dict[str, Any] | None:
        try:
            value = self._read(data)
        except DecodeError:
            return None
        return value if isinstance(value, dict) else None

    def _read(self, data: bytes) -> Any:
        name = self.model.__name__
        if len(data) < 5:
            raise DecodeError(f"not Confluent-framed Avro {name}: {len(data)} bytes, shorter than the 5-byte header")
        if data[0] != 0:
            raise DecodeError(f"not Confluent-framed Avro {name}: magic byte {data[0]:#04x}, expected 0x00 "
                              "(JSON, or Avro written without a schema registry?)")
        schema_id = int.from_bytes(data[1:5], "big")
        writer = self._writers[schema_id] if schema_id in self._writers else self._writer_schema(schema_id)
        buffer = io.BytesIO(data)
        buffer.seek(5)
        try:
            if writer is None:
                values = fastavro.schemaless_reader(buffer, self._schema, None)
            else:
                values = fastavro.schemaless_reader(buffer, writer, self._schema)
        except Exception as exc:  # fastavro raises many kinds on truncated, garbled or unresolvable input
            raise DecodeError(f"not a valid Avro {name} (schema id {schema_id}): {type(exc).__name__}: {exc}") \
                from exc
        if buffer.tell() != len(data):
            raise DecodeError(f"not a valid Avro {name} (schema id {schema_id}): {len(data) - buffer.tell()} "
                              "trailing bytes")
        return values

    def _writer_schema(self, schema_id: int) -> Any:
        """A writer schema we have not seen: asked of the registry once (an unknown id once a minute, so a
        stream of garbage does not become a stream of registry calls)."""
        if self._unknown.get(schema_id, 0.0) > time.monotonic():
            raise DecodeError(f"schema id {schema_id} is unknown to the schema registry")
        try:
            schema = self._client.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if exc.http_status_code != 404:
                raise RegistryError(f"cannot fetch schema id {schema_id}: {exc}") from exc
            self._unknown[schema_id] = time.monotonic() + _UNKNOWN_ID_RETRY_S
            raise DecodeError(f"schema id {schema_id} is unknown to the schema registry") from exc
        except Exception as exc:  # connection refused, unreadable answer: the HTTP client's many kinds
            raise RegistryError(f"cannot fetch schema id {schema_id}: cannot reach the registry: {exc}") from exc
        if schema.schema_type not in (None, "AVRO") or schema.schema_str is None:
            raise DecodeError(f"schema id {schema_id} is a {schema.schema_type} schema, not Avro")
        try:
            writer = fastavro.parse_schema(json.loads(schema.schema_str))
        except Exception as exc:  # a registered schema fastavro cannot use: every record with this id fails
            raise DecodeError(f"schema id {schema_id} cannot be read: {exc}") from exc
        self._writers[schema_id] = writer
        return writer


def _bytes_as_base64(value: Any) -> Any:
    """orjson has no bytes type; bytes fields are URL-safe base64, which pydantic reads (Record config)."""
    if isinstance(value, bytes):
        return base64.urlsafe_b64encode(value).decode()
    raise TypeError(f"cannot encode {type(value).__name__}")


def _describe(exc: ValidationError, model: type[Record]) -> str:
    problems = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(part) for part in err["loc"]) or "(record)"
        problems.append(f"{field}: {err['msg']}")
    return f"invalid {model.__name__}: " + "; ".join(problems)


_MAGIC = b"\x00"
_UNKNOWN_ID_RETRY_S = 60.0
WIRE_FORMATS = ("json", "avro")
_codecs: dict[tuple[Any, ...], Codec[Any]] = {}


def codec_for(model: type[R], settings: Settings, topic: TopicSpec) -> Codec[R]:
    """The codec of the records of one topic in the settings' wire format (built once per process).

    Per topic because the Avro wire format names the schema id registered under the topic's subject."""
    if model.__name__ not in RECORD_TYPES:
        raise KeyError(f"{model.__name__} is not a record type")
    if topic.record_name != model.__name__:
        raise ValueError(f"topic {topic.name} carries {topic.record_name}, not {model.__name__}")
    if settings.wire_format == "json":
        return json_codec(model)
    if settings.wire_format != "avro":
        raise ValueError(f"unknown wire format {settings.wire_format!r}; choose from {list(WIRE_FORMATS)}")
    key = (model, settings.registry_url, settings.registry_username, topic.name)
    if key not in _codecs:
        _codecs[key] = RegistryAvroCodec(model, registry_client(settings), topic)
    return _codecs[key]


@cache
def json_codec(model: type[R]) -> JsonCodec[R]:
    """The JSON codec of a record type: the same on every topic, and the form of records kept in tables."""
    return JsonCodec(model)
