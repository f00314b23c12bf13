"""Who may call the backend, and how much they may send: basic auth, the webhook secret, a body-size cap.

Both are plain ASGI/header logic around the app: credentials are compared as UTF-8 bytes (``hmac`` refuses
non-ASCII ``str``, which used to answer 500 on every route before authentication), and bodies are counted as
they stream in, so a client that omits or lies about ``Content-Length`` is cut off at the same limit.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from ml_backend.config import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _same(given: str | bytes, expected: str) -> bool:
    given_bytes = given if isinstance(given, bytes) else given.encode("utf-8", "surrogateescape")
    return hmac.compare_digest(given_bytes, expected.encode("utf-8", "surrogateescape"))


def basic_auth_ok(authorization: str, settings: Settings) -> bool:
    if not authorization.lower().startswith("basic "):
        return False
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    user, _, password = decoded.partition(b":")
    # Both compared, always: no early exit that would tell a valid user name from an invalid one by timing.
    user_ok = _same(user, settings.basic_auth_user or "")
    password_ok = _same(password, settings.basic_auth_pass or "")
    return user_ok and password_ok


def webhook_secret_ok(given: str | bytes, settings: Settings) -> bool:
    return bool(settings.webhook_secret) and _same(given, settings.webhook_secret or "")


async def _send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = orjson.dumps(payload)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def too_large_payload(limit: int) -> dict[str, Any]:
    return {"error": "request body too large", "detail": f"at most {limit} bytes (MAX_BODY_BYTES)"}


class BodySizeLimit:
    """413 for any request whose body is larger than ``limit`` bytes, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_json(send, 400, {"error": "invalid Content-Length header"})
                    return
                if declared > self.limit:
                    await _send_json(send, 413, too_large_payload(self.limit))
                    return
        # Every route reads its whole JSON body anyway: read it here, up to the limit, and replay it. Refusing
        # before the app runs keeps the 413 clean (raising from inside ``receive`` surfaces as a 500 through
        # Starlette's middleware task groups) and bounds memory at the limit.
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away: let the app see the disconnect
                break
            received += len(message.get("body", b""))
            if received > self.limit:
                await _send_json(send, 413, too_large_payload(self.limit))
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
