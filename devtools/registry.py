"""A local schema registry for development and tests: serves the REST calls of confluent-kafka's SchemaRegistryClient
(register, look up, fetch by id, latest version, subject config) over HTTP, stored in its mock registry."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from confluent_kafka.schema_registry import RegisteredSchema, Schema
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.schema_registry.schema_registry_client import SchemaRegistryClient

# A `mock://` registry lives inside one client object of one process; a worker in a subprocess, `loopai dev` or
# another client reaches this one by URL instead. Compatibility is not enforced here: loopai checks BACKWARD itself
# before registering (app/contract/registry.py), as it does against a real registry.


class LocalRegistry:
    """`with LocalRegistry() as registry:` serves on 127.0.0.1 (a free port) until the block ends; `url`."""

    def __init__(self, port: int = 0) -> None:
        self.store = SchemaRegistryClient.new_client({"url": "mock://local-registry"})
        self.config: dict[str, str] = {}
        handler = type("Handler", (_Handler,), {"registry": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-registry", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> LocalRegistry:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _registered(rs: RegisteredSchema) -> dict[str, Any]:
    assert rs.schema is not None
    return {"subject": rs.subject, "id": rs.schema_id, "version": rs.version, "schema": rs.schema.schema_str}


class _Handler(BaseHTTPRequestHandler):
    registry: LocalRegistry

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a test's output is not the place for an access log."""

    def do_GET(self) -> None:
        self._answer("GET")

    def do_POST(self) -> None:
        self._answer("POST")

    def do_PUT(self) -> None:
        self._answer("PUT")

    def _answer(self, method: str) -> None:
        path = urlsplit(self.path).path
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else {}
        try:
            status, answer = 200, self._route(method, path, body)
        except SchemaRegistryError as exc:
            status, answer = exc.http_status_code, {"error_code": exc.error_code, "message": exc.error_message}
        except LookupError:
            status, answer = 404, {"error_code": 404, "message": f"no such endpoint: {method} {path}"}
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str, path: str, body: dict[str, Any]) -> Any:
        store = self.registry.store
        if method == "GET" and (match := re.fullmatch(r"/schemas/ids/(\d+)", path)):
            schema = store.get_schema(int(match[1]))
            return {"schema": schema.schema_str, "schemaType": schema.schema_type or "AVRO"}
        if method == "POST" and (match := re.fullmatch(r"/subjects/([^/]+)/versions", path)):
            schema = Schema(body["schema"], body.get("schemaType", "AVRO"))
            return _registered(store.register_schema_full_response(unquote(match[1]), schema))
        if method == "POST" and (match := re.fullmatch(r"/subjects/([^/]+)", path)):
            schema = Schema(body["schema"], body.get("schemaType", "AVRO"))
            return _registered(store.lookup_schema(unquote(match[1]), schema))
        if method == "GET" and (match := re.fullmatch(r"/subjects/([^/]+)/versions/latest", path)):
            return _registered(store.get_latest_version(unquote(match[1])))
        if method == "PUT" and (match := re.fullmatch(r"/config/([^/]+)", path)):
            self.registry.config[unquote(match[1])] = body["compatibility"]
            return {"compatibility": body["compatibility"]}
        if method == "GET" and (match := re.fullmatch(r"/config/([^/]+)", path)):
            if (subject := unquote(match[1])) not in self.registry.config:
                raise SchemaRegistryError(404, 40408, f"subject {subject} has no compatibility level")
            return {"compatibilityLevel": self.registry.config[subject]}
        raise LookupError(path)
