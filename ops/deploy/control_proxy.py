"""The operators' way in to the SuperLink's Control API: a mutual-TLS proxy on the
coordinator, and the tunnel an operator runs beside `flwr`.

Flower 1.42's open-source SuperLink serves its Control API (`flwr run`, `flwr ls`,
`flwr supernode register`) on the same HTTP port as the Fleet API, with no
account authentication (OIDC is in the enterprise build only), and the `flwr` CLI
cannot present a TLS client certificate. fedcl therefore binds the SuperLink to
the coordinator's loopback only and puts two doors in front of it: the Fleet
gateway for nodes (`fleet_gateway`, Fleet paths only), and this proxy for operators.

    coordinator:  proxy   PUBLIC:9092  --(mTLS: client cert from the operator CA)-->  127.0.0.1:9091 SuperLink
    operator:     tunnel  127.0.0.1:9099  --(mTLS, operator's cert and key)-->  PUBLIC:9092

The proxy only accepts a TLS handshake in which the client shows a certificate
signed by the operator CA (`certs.OperatorFiles.ca_cert`), a CA nodes never see;
after it, bytes flow unchanged to the SuperLink, so `flwr` still speaks TLS end to
end with the SuperLink (its connection names the tunnel, `127.0.0.1:9099`, with
the deployment's `ca.crt`: the SuperLink's certificate carries 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fedcl.control_proxy")

CHUNK = 1 << 16


class ProxyError(ValueError):
    """Bad proxy settings (addresses, key files)."""


def parse_address(text: str, *, what: str) -> tuple[str, int]:
    """"HOST:PORT" (IPv6 as "[::1]:PORT") -> (host, port), with an error naming `what`."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ProxyError(f"{what} {text!r}: give HOST:PORT, e.g. 127.0.0.1:9091")
    return host, int(port)


def _need(path: Path, what: str) -> str:
    if not Path(path).is_file():
        raise ProxyError(f"{what} {path}: no such file (make it with `fedcl deploy certs`)")
    return str(path)


def server_context(*, cert: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    """TLS server side that refuses any client without a certificate signed by `client_ca`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(_need(cert, "certificate"), _need(key, "key"))
    ctx.load_verify_locations(_need(client_ca, "operator CA"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(*, cert: Path, key: Path, server_ca: Path) -> ssl.SSLContext:
    """TLS client side: show the operator's certificate, verify the proxy's against `server_ca`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(_need(server_ca, "CA certificate"))
    ctx.load_cert_chain(_need(cert, "operator certificate"), _need(key, "operator key"))
    return ctx


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
        pass
    finally:
        # Half-close where the transport allows it (TLS does not), so that a
        # request's end reaches the far side while its answer still flows back.
        try:
            if writer.can_write_eof():
                writer.write_eof()
            else:
                writer.close()
        except (ConnectionError, OSError, RuntimeError):
            pass


async def splice(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 b: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    """Copy bytes both ways until both directions end; then close both."""
    await asyncio.gather(_pump(a[0], b[1]), _pump(b[0], a[1]))
    for writer in (a[1], b[1]):
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, ssl.SSLError, OSError):
            pass


def _peer_name(writer: asyncio.StreamWriter) -> str:
    cert = writer.get_extra_info("peercert") or {}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return "?"


@dataclass(frozen=True)
class Forward:
    """Accept on `listen` (TLS with `tls`, or plain when None), connect to `upstream`
    (TLS with `upstream_tls`, or plain), and splice the two."""

    listen: tuple[str, int]
    upstream: tuple[str, int]
    tls: ssl.SSLContext | None = None
    upstream_tls: ssl.SSLContext | None = None
    upstream_hostname: str | None = None

    async def _handle(self, reader, writer) -> None:
        peer = writer.get_extra_info("peername")
        who = _peer_name(writer) if self.tls is not None else "local"
        try:
            up = await asyncio.open_connection(
                *self.upstream, ssl=self.upstream_tls,
                server_hostname=(self.upstream_hostname or self.upstream[0]) if self.upstream_tls else None)
        except (OSError, ssl.SSLError) as err:
            log.warning("%s (%s): upstream %s:%s unreachable: %r", peer, who, *self.upstream, err)
            writer.close()
            return
        log.info("%s (%s) -> %s:%s", peer, who, *self.upstream)
        await splice((reader, writer), up)

    async def start(self):
        """A listening server (`serve_forever()`, `close()`)."""
        if self.tls is None:
            return await asyncio.start_server(self._handle, *self.listen)
        return _TLSListener(self, socket.create_server(self.listen))


class _TLSListener:
    """Accepts sockets and runs each TLS handshake itself: asyncio's own TLS server
    drops a failed handshake silently (debug log only), and a refused client
    should leave a line in the coordinator's log."""

    def __init__(self, forward: Forward, sock: socket.socket):
        self.forward, self.sock = forward, sock
        sock.setblocking(False)

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task] = set()
        try:
            while True:
                conn, peer = await loop.sock_accept(self.sock)
                task = asyncio.create_task(self._accept(conn, peer))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            self.sock.close()
            for task in list(tasks):
                task.cancel()

    async def _accept(self, conn: socket.socket, peer) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=CHUNK)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=self.forward.tls, ssl_handshake_timeout=10)
        except (ssl.SSLError, OSError, asyncio.TimeoutError) as err:
            log.warning("refused %s: %s", peer, getattr(err, "reason", None) or repr(err))
            conn.close()
            return
        await self.forward._handle(reader, asyncio.StreamWriter(transport, protocol, reader, loop))

    def close(self) -> None:
        self.sock.close()


def control_proxy(*, listen: str, superlink: str, cert: Path, key: Path, operator_ca: Path) -> Forward:
    """The coordinator's side: mutual TLS on `listen`, plain bytes on to the loopback SuperLink
    (whose own TLS, end to end with `flwr`, runs inside)."""
    return Forward(parse_address(listen, what="--control"), parse_address(superlink, what="--superlink"),
                   tls=server_context(cert=cert, key=key, client_ca=operator_ca))


def control_tunnel(*, listen: str, proxy: str, cert: Path, key: Path, ca_cert: Path,
                   proxy_hostname: str | None = None) -> Forward:
    """The operator's side: plain on a loopback `listen` (only `flwr` on this machine
    connects, and its own TLS runs inside), mutual TLS to the coordinator's proxy."""
    host, port = parse_address(listen, what="--listen")
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ProxyError(f"--listen {listen}: the tunnel accepts without authentication, so it "
                         "listens on loopback only (127.0.0.1:PORT)")
    return Forward((host, port), parse_address(proxy, what="--proxy"),
                   upstream_tls=client_context(cert=cert, key=key, server_ca=ca_cert),
                   upstream_hostname=proxy_hostname)


async def serve_forever(*forwards: Forward, ready: asyncio.Event | None = None) -> None:
    servers = [await f.start() for f in forwards]
    for f in forwards:
        log.info("listening on %s:%s -> %s:%s", *f.listen, *f.upstream)
    if ready is not None:
        ready.set()
    try:
        await asyncio.gather(*(s.serve_forever() for s in servers))
    finally:
        for s in servers:
            s.close()
