"""The API's early gate and integer bounds, against a real cloud service (uvicorn, Tansu).

Writes that need the token are refused before their body is read; bodies are capped per route
(JSON writes 1 MiB, ONNX uploads 64 MiB); integers beyond 64 bits are a 422, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from cloud.api import MAX_JSON_BODY, MAX_UPLOAD_BODY
from cloud.config import ApiConfig, CloudConfig, DeliveryConfig
from cloud.service import CloudService
from shared.manifest import generate_keypair
from tests.integration.cloud.test_service import _ensure_topics, make_config

# long enough for production (api.token needs 24 characters there)
TOKEN = "hardening-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: an answer that needs no body must come this fast (on the old code it never came)
PROMPT_S = 5.0
HUGE = 10**12  # a Content-Length no test ever sends

PROMOTE = "/api/models/quality/promote"
ROLLBACK = "/api/models/quality/rollback"
UPLOAD = "/api/models/quality/versions?features=a,b&kind=classifier"


def _config(kafka_broker: str, tmp_path: Path, *, token: str | None = TOKEN) -> CloudConfig:
    private, _public = generate_keypair()
    key = tmp_path / "signing.key"
    key.write_bytes(private)
    return make_config(
        kafka_broker,
        tmp_path,
        environment="production" if token else "development",
        api=ApiConfig(token=token, port=0),
        delivery=DeliveryConfig(enabled=True, private_key=key, artifact_dir=tmp_path / "art"),
    )


@contextlib.asynccontextmanager
async def _cloud(kafka_broker: str, cfg: CloudConfig) -> AsyncIterator[CloudService]:
    await _ensure_topics(kafka_broker, cfg)
    async with CloudService(cfg) as svc:
        yield svc


async def _raw(
    port: int, head: str, body: bytes | list[bytes] = b"", *, within: float = PROMPT_S
) -> tuple[int, dict[str, str], bytes]:
    """Send ``head`` (request line and headers) and ``body`` (bytes, or chunks to send chunked)
    over a plain socket, then read the answer within ``within`` seconds."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n")
        if isinstance(body, list):
            for chunk in body:
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
        else:
            writer.write(body)
        await writer.drain()

        async def answer() -> tuple[int, dict[str, str], bytes]:
            status_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
            headers = {}
            for line in lines:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            content = await reader.readexactly(int(headers.get("content-length", "0")))
            return int(status_line.split()[1]), headers, content

        try:
            return await asyncio.wait_for(answer(), within)
        except TimeoutError:
            raise AssertionError(f"no answer within {within}s to {head.splitlines()[0]}") from None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _post(path: str, *headers: str) -> str:
    return "\n".join([f"POST {path} HTTP/1.1", "Host: cloud", *headers, ""])


async def test_unauthenticated_writes_are_refused_before_the_body_is_read(kafka_broker, tmp_path):
    async with _cloud(kafka_broker, _config(kafka_broker, tmp_path)) as svc:
        assert svc.api_port is not None
        for path in (PROMOTE, ROLLBACK, UPLOAD):
            for auth, code in (
                ((), 401),
                (("Authorization: Basic dXNlcjpwYXNz",), 401),
                (("Authorization: Bearer wrong-token",), 403),
            ):
                # a body announced as a terabyte and never sent: only an answer that did not
                # wait for the body can arrive
                status, headers, content = await _raw(
                    svc.api_port,
                    _post(path, *auth, "Content-Type: application/json", f"Content-Length: {HUGE}"),
                )
                assert status == code, (path, auth, content)
                assert headers["www-authenticate"] == "Bearer"
                assert headers["connection"] == "close"
                detail = json.loads(content)["detail"]
                assert detail in {
                    "this endpoint needs Authorization: Bearer <api.token>",
                    "invalid token",
                }
                # the same with a body that is sent chunked, forever
                status, _, _ = await _raw(
                    svc.api_port,
                    _post(path, *auth, "Transfer-Encoding: chunked"),
                    [b"x" * 1024],
                )
                assert status == code, (path, auth)

        # the dependency stays the authority and agrees: the same answers through the app
        url = f"http://127.0.0.1:{svc.api_port}"
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            assert (await http.post(PROMOTE, json={})).status_code == 401
            r = await http.post(PROMOTE, json={}, headers={"Authorization": "Bearer nope"})
            assert r.status_code == 403
            # reads stay open, and the right token still writes
            assert (await http.get("/api/models")).status_code == 200
            r = await http.post(PROMOTE, json={"learner": "logistic"}, headers=AUTH)
            assert r.status_code in {201, 409}, r.text  # 409: nothing learned yet to promote


async def test_bodies_beyond_the_route_cap_get_413_without_being_read(kafka_broker, tmp_path):
    async with _cloud(kafka_broker, _config(kafka_broker, tmp_path)) as svc:
        assert svc.api_port is not None
        auth = f"Authorization: Bearer {TOKEN}"
        json_type = "Content-Type: application/json"
        # a declared length over the cap: 413 at once, the body never read
        for path, cap in ((PROMOTE, MAX_JSON_BODY), (ROLLBACK, MAX_JSON_BODY), (UPLOAD, MAX_UPLOAD_BODY)):  # fmt: skip
            for length in (cap + 1, HUGE):
                status, headers, content = await _raw(
                    svc.api_port, _post(path, auth, json_type, f"Content-Length: {length}")
                )
                assert status == 413, (path, length, content)
                assert json.loads(content)["detail"] == f"request body larger than {cap} bytes"
                assert headers["connection"] == "close"
        # a chunked JSON body that grows past 1 MiB is cut off with 413 (the old code read on
        # until the body ended, which this one never does)
        chunks = [b" " * 65536] * (MAX_JSON_BODY // 65536) + [b" "]
        status, _, content = await _raw(
            svc.api_port, _post(PROMOTE, auth, json_type, "Transfer-Encoding: chunked"), chunks
        )
        assert status == 413, content
        assert json.loads(content)["detail"] == f"request body larger than {MAX_JSON_BODY} bytes"
        # exactly the cap still reaches the endpoint (JSON whitespace around an empty object)
        body = b"{}".ljust(MAX_JSON_BODY, b" ")
        status, _, content = await _raw(
            svc.api_port,
            _post(PROMOTE, auth, json_type, f"Content-Length: {len(body)}"),
            body,
            within=30,
        )
        assert status in {201, 409}, content
        # an upload may be larger than a JSON write: 2 MiB reach the ONNX check, which refuses
        # what is not a model (422), not the cap
        url = f"http://127.0.0.1:{svc.api_port}"
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            r = await http.post(UPLOAD, content=b"\0" * (2 << 20), headers=AUTH)
            assert r.status_code == 422, r.text
            # a JSON write of the same size is refused by the cap
            r = await http.post(PROMOTE, content=b" " * (2 << 20), headers=AUTH)
            assert r.status_code == 413, r.text


async def test_without_a_token_in_development_writes_are_open_and_still_capped(
    kafka_broker, tmp_path
):
    async with _cloud(kafka_broker, _config(kafka_broker, tmp_path, token=None)) as svc:
        assert svc.api_port is not None
        url = f"http://127.0.0.1:{svc.api_port}"
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            r = await http.post(PROMOTE, json={"learner": "logistic"})
            assert r.status_code in {201, 409}, r.text  # not 401: open, as require_token says
        status, _, _ = await _raw(
            svc.api_port,
            _post(PROMOTE, "Content-Type: application/json", f"Content-Length: {HUGE}"),
        )
        assert status == 413


BIG = [2**64, 99999999999999999999999]


def _integer_requests(big: int) -> list[tuple[str, str, dict | None]]:
    """Every integer an API route takes (path, query, body), set to ``big``."""
    m = "/api/models/quality"
    return [
        ("GET", f"/api/events?limit={big}", None),
        ("GET", f"{m}/versions/{big}", None),
        ("GET", f"{m}/metrics?since_ns={big}", None),
        ("GET", f"{m}/metrics?limit={big}", None),
        ("GET", f"{m}/promotions?limit={big}", None),
        ("GET", f"{m}/drift?limit={big}", None),
        ("POST", f"{m}/promote", {"version": big}),
        ("POST", f"{m}/rollback", {"version": big}),
        ("GET", f"/api/dashboard/timeline?model=quality&max_points={big}", None),
        # cloud/delivery.py's routes: the artifact's version is unbounded there, and the
        # registry's OverflowError is answered 422 by the app's handler
        ("GET", f"{m}/versions/{big}/artifact", None),
        ("GET", f"/api/delivery?limit={big}", None),
    ]


@pytest.mark.parametrize("big", BIG)
async def test_integers_beyond_64_bits_are_a_422_naming_the_problem(kafka_broker, tmp_path, big):
    cfg = _config(kafka_broker, tmp_path)
    await _ensure_topics(kafka_broker, cfg)
    async with CloudService(cfg, serve_api=False) as svc:
        transport = httpx.ASGITransport(app=svc.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://cloud") as http:
            for method, url, body in _integer_requests(big):
                r = await http.request(method, url, json=body, headers=AUTH)
                assert r.status_code == 422, (method, url, r.status_code, r.text)
                detail = r.json()["detail"]
                text = json.dumps(detail)
                assert (
                    "less than or equal to" in text  # a declared bound
                    or "signed 64-bit integer" in text  # the OverflowError handler
                ), (url, text)
            # negative where a version or a time cannot be
            m = "/api/models/quality"
            for method, url, body in [
                ("GET", f"{m}/versions/-1", None),
                ("GET", f"{m}/versions/0", None),
                ("GET", f"{m}/metrics?since_ns=-1", None),
                ("POST", f"{m}/promote", {"version": -1}),
                ("POST", f"{m}/rollback", {"version": -(2**64)}),
            ]:
                r = await http.request(method, url, json=body, headers=AUTH)
                assert r.status_code == 422, (method, url, r.status_code, r.text)

            # an overflow of the service's own (no such integer in the request) stays a 500
            async def overflows() -> None:
                raise OverflowError("math range error")

            svc.app.add_api_route("/api/test/overflow", overflows)
            assert (await http.get("/api/test/overflow?n=12")).status_code == 500
            # in range, the same routes answer as before
            assert (await http.get(f"{m}/versions/{2**63 - 1}")).status_code == 404
            assert (await http.get(f"{m}/metrics?since_ns={2**63 - 1}")).status_code == 200
