"""httpx requests sent over aiohttp: the remote engine's wire.

httpx's own connection pool (httpcore) walks every connection it holds on each request's start
and finish, so its CPU per request grows with the connections in flight: measured against an
instant stub server on loopback, 1.1 ms of CPU per request at 8 connections and 2.6 ms at 32,
where aiohttp's pool costs 0.13-0.18 ms (bench/ceiling.py; upstream: encode/httpx issue 3215,
"httpx.AsyncClient has much worse performance than aiohttp.ClientSession with concurrent
requests", whose thread proposes this transport). The engine keeps httpx's client, so its request
building, its errors and the tests' `httpx.MockTransport` stay as they are; only the wire changes.
"""

from __future__ import annotations

import aiohttp
import httpx


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An httpx transport over one `aiohttp.ClientSession` with at most `max_connections`."""

    def __init__(self, *, max_connections: int) -> None:
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _open_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No cookie jar, no auto-decompression surprises: the engine sends and reads JSON only.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=True,
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._open_session()
        timeouts = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=timeouts.get("connect"),
            sock_read=timeouts.get("read"),
        )
        try:
            async with session.request(
                request.method,
                str(request.url),
                headers=[(k, v) for k, v in request.headers.multi_items() if k.lower() != "content-length"],
                data=request.content,
                timeout=timeout,
                allow_redirects=False,
            ) as response:
                content = await response.read()
                headers = [(k, v) for k, v in response.headers.items()]
                status = response.status
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise httpx.ReadTimeout(str(exc) or "timed out", request=request) from exc
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except aiohttp.ClientError as exc:  # a reset, a broken or malformed response
            raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__, request=request) from exc
        # The body is read and already decompressed: say so, or httpx would decode it again.
        headers = [(k, v) for k, v in headers if k.lower() not in ("content-encoding", "transfer-encoding")]
        return httpx.Response(status, headers=headers, content=content, request=request)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
