"""web_token: with it set, the worker's routes answer 401 without it, except the probes', Prometheus's and the icon; a
bearer header or the cookie the dashboard link sets lets a call through. The real route table, over the same
stand-ins as test_health.py (no broker: the calls that pass stop at checks that need none)."""

from __future__ import annotations

from aiohttp.test_utils import TestClient, TestServer
from pydantic import SecretStr

from app.settings import Settings
from tests.web.test_health import server

TOKEN = "s3cret-token"


def _client(token: str | None) -> TestClient:
    web = server(answered_at=None, tables_ready=True, joined=True)
    web._settings = Settings(bootstrap_servers="kafka:9092", worker_id="w", web_token=token)
    return TestClient(TestServer(web.application()))


async def test_without_the_token_execute_tasks_and_the_dashboard_are_401() -> None:
    async with _client(TOKEN) as client:
        for method, path in [("POST", "/execute"), ("GET", "/"), ("GET", "/api/dashboard"), ("GET", "/tasks"),
                             ("GET", "/static/dashboard.js"), ("GET", "/tasks/spam/stats")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                answer = await client.request(method, path, headers=headers, data=b"{}")
                assert answer.status == 401, (method, path, headers)
                assert answer.headers["WWW-Authenticate"] == "Bearer"
                assert "web_token" in (await answer.json())["detail"]
        assert (await client.get("/?token=wrong")).status == 401
        # Probes and Prometheus need no token (503: the stand-in broker never answered).
        assert (await client.get("/health")).status == 503
        assert (await client.get("/openapi.json")).status == 200
        icon = await client.get("/favicon.ico")  # a browser asks before it has the cookie: the icon tells nothing
        assert icon.status == 200 and icon.headers["Content-Type"] == "image/x-icon"


async def test_a_bearer_header_or_the_dashboard_link_lets_calls_through() -> None:
    async with _client(TOKEN) as client:
        bad_body = await client.post("/execute", data=b"{}", headers={"Authorization": f"Bearer {TOKEN}"})
        assert bad_body.status == 422  # past the check, stopped by the body's validation
        page = await client.get(f"/?token={TOKEN}")
        assert page.status == 200 and "<html" in (await page.text()).lower()
        assert "HttpOnly" in page.headers["Set-Cookie"]
        assert (await client.get("/static/dashboard.js")).status == 200  # the browser's cookie from then on
        assert (await client.post("/execute", data=b"{}")).status == 422


async def test_without_a_token_setting_nothing_changes() -> None:
    async with _client(None) as client:
        assert (await client.post("/execute", data=b"{}")).status == 422
        assert (await client.get("/")).status == 200


def test_the_token_is_a_secret() -> None:
    settings = Settings(web_token=TOKEN)
    assert isinstance(settings.web_token, SecretStr) and TOKEN not in repr(settings)
    assert settings.to_env()["LOOPAI_WEB_TOKEN"] == TOKEN  # handed to a child worker as itself
