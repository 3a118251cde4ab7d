"""Bearer-token auth for every HTTP server of the project: the edge server (``edgeslim serve``,
a fleet node's V2 API) and the fleet controller's API. One token rule, one middleware.

Torch-free, and starlette is imported only when a request is refused, so the fleet's client
side can check a token without the HTTP stack of a server.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["TOKEN_RULE", "BearerAuth", "authorized", "bearer", "check_token", "token_problem"]

#: what ``check_token`` asks of a token, in the words of its error messages
TOKEN_RULE = "printable ASCII characters with no space at either end"


def token_problem(token: str) -> str | None:
    """What keeps ``token`` from being sent as ``Authorization: Bearer TOKEN`` (None: nothing).

    HTTP clients (httpx, the node's offload relay) send header values as ASCII and refuse
    control characters and a value that ends in a space, so such a token would be accepted
    here and then never be sent; a space at the start is kept out too, as it cannot be told
    apart from the separator after ``Bearer``."""
    if not token.strip():
        return "an empty string"
    if not token.isascii() or not token.isprintable():
        return "a string with characters other than printable ASCII"
    if token != token.strip():
        return "a string with a space at the start or the end"
    return None


def check_token(token: Any, func: str) -> str | None:
    """``token`` when it can be a bearer token (``TOKEN_RULE``) or None (no auth); else a
    ``ConfigError`` that names the parameter of ``func``, never the value."""
    from edgeslim.errors import ConfigError

    if token is None:
        return None
    what = token_problem(token) if isinstance(token, str) else type(token).__name__
    if what is not None:
        raise ConfigError(f"The 'token' parameter of {func} must be a non-empty string of "
                          f"{TOKEN_RULE}, or None for no auth. Got {what}.")  # fmt: skip
    return token


def bearer(token: str) -> bytes:
    """The ``Authorization`` header value that carries ``token`` (checked first)."""
    return f"Bearer {token}".encode("ascii")


def given_token(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The first ``Authorization`` header of an ASGI request (b"" when none)."""
    return next((v for k, v in headers if k == b"authorization"), b"")


def authorized(headers: Iterable[tuple[bytes, bytes]], expected: bytes | None) -> bool:
    """True without a token (``expected`` None), else when the first ``Authorization``
    header of an ASGI request equals ``expected`` (constant-time comparison)."""
    return expected is None or hmac.compare_digest(given_token(headers), expected)


class BearerAuth:
    """``Authorization: Bearer TOKEN`` in front of an ASGI ``app`` (pure ASGI; no token: every
    request passes). ``is_open(scope)``: requests that need none (health checks). A refusal is
    a 401 JSON ``{"error": "missing|invalid bearer token: send 'Authorization: Bearer TOKEN'"
    + hint}`` with ``WWW-Authenticate: Bearer``; ``on_refused(seconds)`` is called after it."""

    def __init__(
        self,
        app: Any,
        token: str | None,
        *,
        is_open: Callable[[dict[str, Any]], bool] = lambda scope: False,
        hint: str = "",
        on_refused: Callable[[float], None] | None = None,
    ) -> None:
        self.app = app
        self.expected = bearer(token) if check_token(token, "BearerAuth") else None
        self.is_open = is_open
        self.hint = hint
        self.on_refused = on_refused

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.expected is not None and scope["type"] == "http" and not self.is_open(scope):
            t0 = time.perf_counter()
            given = given_token(scope["headers"])
            if not hmac.compare_digest(given, self.expected):
                from starlette.responses import JSONResponse

                what = "invalid bearer token" if given else "missing bearer token"
                resp = JSONResponse(
                    {"error": f"{what}: send 'Authorization: Bearer TOKEN'{self.hint}"},
                    status_code=401, headers={"WWW-Authenticate": "Bearer"},
                )  # fmt: skip
                await resp(scope, receive, send)
                if self.on_refused is not None:
                    self.on_refused(time.perf_counter() - t0)
                return
        await self.app(scope, receive, send)
