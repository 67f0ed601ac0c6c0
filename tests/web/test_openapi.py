"""The OpenAPI document against the server's real route table, without a broker: every route is described and
every path described is served, each reference resolves, and the bodies' schemas are the models'. That every path
answers 200 on a running worker: tests/test_web.py."""

import json
import re

from app.contract.records import DailyStats, ExecutionResult
from app.web.execute import ExecuteBody
from app.web.openapi import openapi_document
from tests.web.test_health import server

UNDOCUMENTED = {("get", "/static/{name}")}  # the dashboard's own files, fetched by its page
PARAMETER = re.compile(r"\{(\w+)\}")


def routes() -> set[tuple[str, str]]:
    app = server(answered_at=None, tables_ready=True, joined=True).application()
    return {(route.method.lower(), route.resource.canonical) for route in app.router.routes()
            if route.method != "HEAD" and route.resource is not None}


def test_the_document_describes_exactly_the_routes_served() -> None:
    document = openapi_document()
    described = {(method, path) for path, operations in document["paths"].items() for method in operations}
    assert described == routes() - UNDOCUMENTED


def test_every_reference_resolves_to_a_schema_of_the_document() -> None:
    document = openapi_document()
    referenced = set(re.findall(r'"#/components/schemas/(\w+)"', json.dumps(document)))
    assert referenced and referenced <= set(document["components"]["schemas"])


def test_every_path_parameter_is_declared_and_every_operation_says_what_200_is() -> None:
    for path, operations in openapi_document()["paths"].items():
        for method, operation in operations.items():
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == set(PARAMETER.findall(path)), (method, path)
            assert "200" in operation["responses"] and operation["summary"], (method, path)


def test_bodies_and_records_are_the_models_schemas() -> None:
    schemas = openapi_document()["components"]["schemas"]
    assert set(schemas["ExecuteBody"]["required"]) == {"task_id", "input"}
    assert set(schemas["ExecuteBody"]["properties"]) == set(ExecuteBody.model_fields)
    assert set(schemas["ExecutionResult"]["properties"]) == set(ExecutionResult.model_fields)
    assert set(schemas["DailyStats"]["properties"]) == set(DailyStats.model_fields)
    assert schemas["ExecutionResult"]["properties"]["status"] == {"$ref": "#/components/schemas/ExecutionStatus"}
