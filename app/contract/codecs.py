"""Codecs: record models <-> bytes, one per wire format ("json" and "avro"), built on schemas/*.avsc.

JSON: the record's fields as a JSON object (snake_case), validated by the pydantic mirror of the .avsc.
Avro: schemaless Avro binary via fastavro; `logicalType: json` strings carry nested JSON values.
A later schema-registry codec slots in beside these two (see codec_for).
"""

from __future__ import annotations

import base64
import io
import json
from functools import cache
from typing import Any, Generic, Protocol, TypeVar

import fastavro
import fastavro.read
import fastavro.write
import orjson
from pydantic import ValidationError

from app.contract.files import contract_dir
from app.contract.records import RECORD_TYPES, Record

R = TypeVar("R", bound=Record)


class DecodeError(ValueError):
    """Bytes that are not a valid record of the expected type; the message says why."""


def _json_to_text(value: Any, _schema: Any) -> str:
    return orjson.dumps(value).decode()


def _text_to_json(text: str, _writer: Any, _reader: Any) -> Any:
    return orjson.loads(text)


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
    """The fastavro-parsed schema of a record (parsed once)."""
    return fastavro.parse_schema(load_schema(record_name))


class Codec(Protocol[R]):
    """Turns one record type into bytes and back."""

    model: type[R]

    def encode(self, record: R) -> bytes: ...

    def encode_fields(self, fields: dict[str, Any]) -> bytes:
        """Encode a record given as its fields (every field, python values) without building the model:
        the executor's hot path. encode_fields(r.model_dump()) decodes to the same record as encode(r)."""
        ...

    def decode(self, data: bytes) -> R: ...

    def loose(self, data: bytes) -> dict[str, Any] | None:
        """The fields as a plain dict without validation, or None if the bytes are not even that."""
        ...


class JsonCodec(Generic[R]):
    """The record as a JSON object."""

    def __init__(self, model: type[R]) -> None:
        self.model = model

    def encode(self, record: R) -> bytes:
        return self.encode_fields(record.model_dump())

    def encode_fields(self, fields: dict[str, Any]) -> bytes:
        """The one JSON encoding of records: UTC times end in "Z", bytes are URL-safe base64 (as pydantic)."""
        return orjson.dumps(fields, default=_bytes_as_base64, option=orjson.OPT_UTC_Z)

    def decode(self, data: bytes) -> R:
        try:
            return self.model.model_validate_json(data)
        except ValidationError as exc:
            raise DecodeError(_describe(exc, self.model)) from exc

    def loose(self, data: bytes) -> dict[str, Any] | None:
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        return value if isinstance(value, dict) else None


class AvroCodec(Generic[R]):
    """The record as schemaless Avro binary (the reader knows the schema)."""

    def __init__(self, model: type[R]) -> None:
        self.model = model
        self._schema = parsed_schema(model.__name__)

    def encode(self, record: R) -> bytes:
        return self.encode_fields(record.model_dump())

    def encode_fields(self, fields: dict[str, Any]) -> bytes:
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, self._schema, fields)
        return buffer.getvalue()

    def decode(self, data: bytes) -> R:
        buffer = io.BytesIO(data)
        try:
            values = fastavro.schemaless_reader(buffer, self._schema, None)
        except Exception as exc:  # fastavro raises many kinds on truncated or garbled input
            raise DecodeError(f"not a valid Avro {self.model.__name__}: {type(exc).__name__}: {exc}") from exc
        if buffer.tell() != len(data):
            raise DecodeError(
                f"not a valid Avro {self.model.__name__}: {len(data) - buffer.tell()} trailing bytes"
            )
        try:
            return self.model.model_validate(values)
        except ValidationError as exc:
            raise DecodeError(_describe(exc, self.model)) from exc

    def loose(self, data: bytes) -> dict[str, Any] | None:
        try:
            value = fastavro.schemaless_reader(io.BytesIO(data), self._schema, None)
        except Exception:  # garbled input: see decode()
            return None
        return value if isinstance(value, dict) else None


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


_CODECS: dict[str, type[Any]] = {"json": JsonCodec, "avro": AvroCodec}


@cache
def codec_for(model: type[R], wire_format: str) -> Codec[R]:
    """The codec of a record type in a wire format ("json" or "avro")."""
    if model.__name__ not in RECORD_TYPES:
        raise KeyError(f"{model.__name__} is not a record type")
    try:
        codec: Codec[R] = _CODECS[wire_format](model)
    except KeyError:
        raise ValueError(f"unknown wire format {wire_format!r}; choose from {sorted(_CODECS)}") from None
    return codec
