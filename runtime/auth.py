"""The pod API's shared token (docs/security.md, "The pod API").

Every route but `/health` (the kubelet's probes) wants
``Authorization: Bearer <SDEKS_POD_TOKEN>``: the job API the dispatcher calls, the
A1111 API, `/metrics` (the collector sends it too), `/docs`. The token comes from a
Kubernetes Secret in a deployment; the NetworkPolicy in front of the pods is the
first fence, the token the second.

A pod started without a token (standalone, on a workstation) accepts any caller and
says so once at start-up.

A pure ASGI middleware, not a FastAPI dependency: it covers routes added by any
router, now or later, without each one opting in.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

#: Paths served without the token.
PUBLIC_PATHS = frozenset({"/health"})
UNAUTHORIZED_CODE = "unauthorized"


class TokenAuth:
    """Answers 401 to any HTTP request but `PUBLIC_PATHS` without the right bearer token."""

    def __init__(self, app: ASGIApp, *, token: str) -> None:
        if not token:
            raise ValueError("TokenAuth needs a non-empty token")
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            {
                "error": {
                    "code": UNAUTHORIZED_CODE,
                    "message": "this pod wants Authorization: Bearer <SDEKS_POD_TOKEN>",
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _allowed(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, given = value.partition(b" ")
                # Constant time: the comparison must not tell how much of a guess was right.
                return scheme.lower() == b"bearer" and hmac.compare_digest(
                    given.strip(), self._token
                )
        return False


def require_token(app: FastAPI, token: str | None) -> None:
    """Install `TokenAuth` on `app`, or warn that the pod API is open."""
    if not token:
        log.warning(
            "SDEKS_POD_TOKEN is not set: this pod's API accepts any caller "
            "(fine standalone; a deployment sets it from a Kubernetes Secret)"
        )
        return
    app.add_middleware(TokenAuth, token=token)
