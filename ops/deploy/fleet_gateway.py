"""The nodes' door to the SuperLink: an HTTPS front that passes the Fleet API only.

Flower 1.42 serves Fleet (`/v1/fleet/...`), Control (`/v1/control/...`) and the
ServerApp runtime (`/v1/runtime/...`) on one HTTP port, and a byte-level proxy
cannot tell them apart. This gateway terminates TLS with the SuperLink's own
certificate (nodes keep `--root-certificates ca.crt` and the same address), reads
each request's path, forwards `POST /v1/fleet/*` unchanged (headers included, so
Flower's node-auth signatures still verify at the SuperLink) to the SuperLink on
the coordinator's loopback, and answers everything else 404 without forwarding it.

    gateway = FleetGateway("https://127.0.0.1:9091", ca_cert=files.ca_cert)
    uvicorn.run(gateway, host="0.0.0.0", port=9093, ssl_certfile=..., ssl_keyfile=...)

Used by `fedcl deploy coordinator` (`coordinator.py`); see README "Deployment".
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

log = logging.getLogger("fedcl.fleet_gateway")

FLEET_PREFIX = "/v1/fleet/"
# Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection, not the request.
# Bodies pass through byte for byte, so content-length stays true and is kept.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                        "transfer-encoding", "upgrade", "proxy-authorization", "proxy-authenticate"})
# The gateway's own server writes these on every answer: the SuperLink's copies would repeat them.
OWN_HEADERS = frozenset({"server", "date"})
REFUSED = (b"fedcl fleet gateway: only the Fleet API (POST /v1/fleet/...) is served here; "
           b"the Control API listens on the coordinator's loopback (see README 'Deployment')\n")


def is_fleet_request(method: str, path: str) -> bool:
    """Exactly the requests a SuperNode makes; a path with dot segments or encoded
    slashes is refused too, so that no normalisation upstream can turn it into another API."""
    return (method == "POST" and path.startswith(FLEET_PREFIX) and "/." not in path
            and "%" not in path and "//" not in path)


class FleetGateway:
    """ASGI app: forward Fleet requests to `upstream` (https://127.0.0.1:PORT), refuse the rest."""

    def __init__(self, upstream: str, *, ca_cert: Path, timeout: float = 120.0):
        self.upstream = upstream.rstrip("/")
        self.ca_cert = str(ca_cert)
        self.timeout = timeout
        self._client = None

    def _http(self):
        import httpx

        if self._client is None:
            verify = ssl.create_default_context(cafile=self.ca_cert)
            self._client = httpx.AsyncClient(verify=verify, timeout=self.timeout,
                                             limits=httpx.Limits(max_keepalive_connections=32))
        return self._client

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # websockets: never part of the Fleet API
            return
        raw_path = scope.get("raw_path") or scope["path"].encode()
        path = raw_path.decode("latin-1").split("?", 1)[0]
        if not is_fleet_request(scope["method"], path):
            log.warning("refused %s %s from %s", scope["method"], path, (scope.get("client") or ("?",))[0])
            await _respond(send, 404, REFUSED)
            return
        await self._forward(scope, receive, send, path)

    async def _forward(self, scope, receive, send, path: str) -> None:
        import httpx

        async def body():  # streamed on as it arrives: a FAB or an adapter is never held whole
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                yield message.get("body", b"")
                if not message.get("more_body"):
                    return

        headers = [(k, v) for k, v in scope["headers"] if k.decode("latin-1").lower() not in HOP_BY_HOP]
        client = self._http()
        request = client.build_request("POST", self.upstream + path, headers=headers, content=body())
        try:
            response = await client.send(request, stream=True)
        except httpx.HTTPError as err:
            log.warning("upstream %s unreachable: %s", self.upstream, err)
            await _respond(send, 502, b"fedcl fleet gateway: the SuperLink is not reachable\n")
            return
        try:
            out = [(k, v) for k, v in response.headers.raw
                   if k.decode("latin-1").lower() not in HOP_BY_HOP | OWN_HEADERS]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _respond(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
