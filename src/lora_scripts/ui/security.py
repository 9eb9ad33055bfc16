"""Who may talk to the server.

* Bound to a loopback address (the default) only this machine can connect; no token is needed.
* Bound to anything else, every request needs the token the server printed at start: as `Authorization: Bearer`,
  an `X-Token` header, or once as `?token=` in the address (which sets a cookie for the rest of the session).
* Requests whose Host header is not the server's own name are refused (DNS rebinding: a web page elsewhere
  cannot turn the user's browser into a client of this server).
* Requests that change anything must carry `X-Requested-With`, which a cross-site form or image cannot send
  without a CORS preflight that this server never grants (CSRF).
"""

from __future__ import annotations

import ipaddress
import secrets

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse

COOKIE = "lora_scripts_token"
_SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(24)


class Guard(BaseHTTPMiddleware):
    def __init__(self, app, token: str | None, allowed_hosts: set[str]):
        super().__init__(app)
        self.token = token
        self.allowed_hosts = allowed_hosts

    async def dispatch(self, request: Request, call_next):
        host = (request.headers.get("host") or "").rsplit(":", 1)[0].strip("[]").lower()
        if self.allowed_hosts and host not in self.allowed_hosts:
            return JSONResponse({"error": f"host {host!r} is not this server's address"}, status_code=403)
        if self.token is not None:
            given = _token_from(request)
            if given is None or not secrets.compare_digest(given, self.token):
                return JSONResponse({"error": "this server needs the token it printed at start "
                                     "(open the address it printed, which carries ?token=...)"}, status_code=401)
            if request.query_params.get("token") and request.method == "GET" and not request.url.path.startswith("/api"):
                # Trade the token in the address for a cookie, so it does not stay in the history bar.
                response = RedirectResponse(request.url.remove_query_params("token"), status_code=303)
                response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
                return response
        if request.method not in _SAFE_METHODS and "x-requested-with" not in request.headers:
            return JSONResponse({"error": "missing X-Requested-With header (requests that change data must come "
                                 "from the UI's own scripts)"}, status_code=403)
        return await call_next(request)


def _token_from(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-token") or request.cookies.get(COOKIE) or request.query_params.get("token")
