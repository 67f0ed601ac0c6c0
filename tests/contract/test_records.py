"""The pydantic models mirror schemas/*.avsc one to one: names, order, types, defaults."""

import types
import typing
import uuid
from datetime import datetime
from enum import Enum
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from app.contract.codecs import load_schema
from app.contract.records import (
    EXECUTION_NAMESPACE,
    RECORD_TYPES,
    ExecutionRequest,
    StatsPartial,
    TaskSpec,
    execution_id_for,
    utc_now,
)


def _avro_kind(avro: Any) -> Any:
    """A comparable description of an Avro type."""
    if isinstance(avro, list):
        return ("union", tuple(_avro_kind(branch) for branch in avro))
    if isinstance(avro, dict):
        if avro.get("logicalType") == "json":
            return "json"
        if avro.get("logicalType") == "timestamp-millis":
            return "timestamp"
        if avro["type"] == "enum":
            return ("enum", tuple(avro["symbols"]))
        if avro["type"] == "array":
            return ("array", _avro_kind(avro["items"]))
        if avro["type"] == "record":
            return ("record", tuple((f["name"], _avro_kind(f["type"])) for f in avro["fields"]))
        return _avro_kind(avro["type"])
    return {"int": "int", "long": "int", "string": "string", "double": "float", "boolean": "bool",
            "bytes": "bytes", "null": "null"}[avro]


def _python_kind(annotation: Any) -> Any:
    """The same description, of a pydantic field annotation."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _python_kind(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        return ("union", tuple("null" if a is type(None) else _python_kind(a) for a in args))
    if origin is list:
        return ("array", _python_kind(typing.get_args(annotation)[0]))
    if origin is dict or annotation is Any:
        return "json"
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return ("enum", tuple(member.value for member in annotation))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return ("record", tuple((n, _python_kind(f.annotation)) for n, f in annotation.model_fields.items()))
    return {str: "string", int: "int", float: "float", bool: "bool", bytes: "bytes", datetime: "timestamp"}[annotation]


def _normalise(kind: Any) -> Any:
    # ["null", "json"] in Avro is plain `Any` (which admits null) in Python.
    if isinstance(kind, tuple) and kind[0] == "union" and set(kind[1]) == {"null", "json"}:
        return "json"
    if isinstance(kind, tuple) and kind[0] == "union":
        return ("union", tuple(sorted(map(str, map(_normalise, kind[1])))))
    if isinstance(kind, tuple) and kind[0] == "record":
        return ("record", tuple((n, _normalise(k)) for n, k in kind[1]))
    if isinstance(kind, tuple) and kind[0] == "array":
        return ("array", _normalise(kind[1]))
    return kind


@pytest.mark.parametrize("name", sorted(RECORD_TYPES))
def test_model_mirrors_avsc(name: str) -> None:
    schema = load_schema(name)
    model = RECORD_TYPES[name]
    assert [f["name"] for f in schema["fields"]] == list(model.model_fields)
    for avro_field in schema["fields"]:
        field = model.model_fields[avro_field["name"]]
        expected = _normalise(_avro_kind(avro_field["type"]))
        assert expected == _normalise(_python_kind(field.annotation)), avro_field["name"]
        if "default" in avro_field:
            default = field.get_default(call_default_factory=True)
            default = default.value if isinstance(default, Enum) else default
            assert default == avro_field["default"], avro_field["name"]
        else:
            assert field.is_required(), f"{avro_field['name']} has a default in Python but not in Avro"


def _request(**fields: Any) -> dict[str, Any]:
    return {"request_id": "r1", "task_id": "spam", "input": {"text": "x"}, **fields}


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"task_id": ""}, "task_id"),
        ({"version": 0}, "version"),
        ({"input": None}, "input"),
        ({"input": [1, 2]}, "input"),
        ({"timeout_ms": 0}, "timeout_ms"),
        ({"timeout_ms": 60_001}, "timeout_ms"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_request_validation_rules(fields: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        ExecutionRequest.model_validate(_request(**fields))


def test_request_edges_that_are_valid() -> None:
    assert ExecutionRequest.model_validate(_request(version=1, timeout_ms=1)).version == 1
    assert ExecutionRequest.model_validate(_request(timeout_ms=60_000)).timeout_ms == 60_000


def test_task_max_timeout_ms_defaults_to_a_second_and_goes_up_to_a_minute() -> None:
    assert TaskSpec(name="t", updated_at=utc_now()).max_timeout_ms == 1000
    assert TaskSpec(name="t", updated_at=utc_now(), max_timeout_ms=60_000).max_timeout_ms == 60_000


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"name": "has space"}, "name"),
        ({"description": "d" * 5001}, "description"),
        ({"sampling_rate": 1.5}, "sampling_rate"),
        ({"accuracy_target": -0.1}, "accuracy_target"),
        ({"latency_target_ms": 0}, "latency_target_ms"),
        ({"max_timeout_ms": 0}, "max_timeout_ms"),
        ({"max_timeout_ms": 60_001}, "max_timeout_ms"),
    ],
)
def test_task_validation_rules(fields: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        TaskSpec.model_validate({"name": "ok_name-1", "updated_at": utc_now(), **fields})


@pytest.mark.parametrize(("task_id", "request_id"), [("t", "r1"), ("spam-filter", "9b2c…"), ("x" * 200, "")])
def test_execution_id_is_a_uuid5(task_id: str, request_id: str) -> None:
    expected = uuid.uuid5(EXECUTION_NAMESPACE, f"{task_id}/{request_id}")
    assert execution_id_for(task_id, request_id) == str(expected)


def test_execution_id_is_deterministic_and_distinct() -> None:
    assert execution_id_for("t", "r1") == execution_id_for("t", "r1")
    assert execution_id_for("t", "r1") != execution_id_for("t", "r2")
    assert execution_id_for("t", "r1") != execution_id_for("u", "r1")


@pytest.mark.parametrize(("fields", "complaint"), [({"date": "22/11/2026"}, "date"), ({"ok": -1}, "ok")])
def test_stats_partial_validation_rules(fields: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        StatsPartial.model_validate({"task_id": "t", "date": "2026-11-22", "time_zone": "UTC", "sketch": b"",
                                     "event_at": utc_now(), **fields})
