"""A node's long-lived worker: the base model, tokenizer, data and frozen-layer
caches stay loaded between messages, rounds and runs.

Flower's SuperNode starts a fresh ClientApp process for every message (train,
evaluate), which would import torch and load the model every time. With a
worker, that process only forwards the message to this node's worker over a
Unix socket and returns its reply::

    python -m fedcl.client.worker --state-dir /state/hospital-a &   # next to the SuperNode
    flower-supernode ... --node-config 'state-dir="/state/hospital-a" worker="/state/hospital-a/worker.sock" ...'

What crosses the socket is exactly what the ClientApp received and what it
sends back (the message's RecordDict in Flower's own wire format, plus the run
and node config the ClientApp already holds); nothing else leaves the node.
The socket lives in the node's state folder (made 0700), is 0600, and the
worker also refuses a peer of another user (SO_PEERCRED).

Lifecycle: the process started by that command is a supervisor. It binds the
socket once and runs the serving child, which handles one message at a time
(so two runs never interleave mid-message) and caches what it loads per
configuration (`fedcl.session`): read-only base weights, tokenizer, records;
everything a run changes (adapter, optimiser, privacy ledger, continual state)
is loaded from the message or the node's state folder for every message, as
in simulation, where one Ray worker serves many clients and runs. If the
child dies, the supervisor starts another on the same socket; connections
wait in its backlog meanwhile. A ClientApp whose connection dropped
mid-message sends the same message once more (same message id: the privacy
ledger charges a message id once, `fedcl.privacy.client`); a second drop fails
the message, and Flower reports the error to the server. A node without a
reachable worker (none configured, or the supervisor gone) does the work in
the ClientApp process itself, as before, and says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger("fedcl.worker")

SOCKET_NAME = "worker.sock"
PROTOCOL = 1
KINDS = ("train", "evaluate")
# How long a ClientApp waits for a worker socket before working itself. The supervisor holds
# the socket across restarts of its serving process, so only a node starting up needs it.
CONNECT_WAIT = 2.0
_LEN = struct.Struct(">Q")
_MAX_HEADER = 16 * 1024 * 1024


class WorkerError(RuntimeError):
    """The worker failed a message or went away twice; the message names which."""


def socket_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / SOCKET_NAME


def _address(path: Path) -> tuple[str, int | None]:
    """A connectable name for `path`: Unix socket names are limited to 107 bytes, so a
    long one is reached through its folder's descriptor (/proc/self/fd/N/name)."""
    if len(os.fsencode(str(path))) < 100:
        return str(path), None
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    return f"/proc/self/fd/{fd}/{path.name}", fd


def _send(sock: socket.socket, header: dict, body: bytes = b"") -> None:
    head = json.dumps(header).encode()
    sock.sendall(_LEN.pack(len(head)) + head + _LEN.pack(len(body)))
    sock.sendall(body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the worker closed the connection mid-message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> tuple[dict, bytes]:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if n > _MAX_HEADER:
        raise ConnectionError(f"header of {n} bytes: not a fedcl worker")
    header = json.loads(_recv_exact(sock, n))
    (m,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    return header, _recv_exact(sock, m)


# -- the ClientApp's side -------------------------------------------------------

def _connect(path: Path, wait: float) -> socket.socket | None:
    """A connection to the worker at `path`, waiting up to `wait` s for one that is
    starting; None when there is none (no socket file, or nobody listening)."""
    deadline = time.monotonic() + wait
    while True:
        address, fd = _address(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(address)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.5)
        finally:
            if fd is not None:
                os.close(fd)


def forward(path: str | Path, kind: str, body: bytes, *, run_config: dict, node_config: dict,
            run_id: int, message_id: str, wait: float = CONNECT_WAIT) -> bytes | None:
    """Have the node's worker handle one message (`body`: its RecordDict, serialised);
    return the reply's RecordDict bytes, or None when no worker is reachable."""
    header = {"protocol": PROTOCOL, "kind": kind, "run_id": int(run_id), "message_id": str(message_id),
              "run_config": run_config, "node_config": node_config}
    for attempt in (1, 2):
        sock = _connect(Path(path), wait)
        if sock is None:
            logger.warning("node worker %s: not reachable after %.0f s; this message is handled in "
                           "the ClientApp process (model loaded for it alone)", path, wait)
            return None
        try:
            with sock:
                _send(sock, header, body)
                reply, content = _recv(sock)
        except (ConnectionError, OSError) as error:
            if attempt == 2:
                raise WorkerError(f"node worker {path}: {kind} message {message_id} lost twice "
                                  f"({error}); see the worker's log") from error
            logger.warning("node worker %s: %s during %s message %s; sending it once more",
                           path, error, kind, message_id)
            continue
        if not reply.get("ok"):
            raise WorkerError(f"node worker {path}: {kind} message {message_id} failed: "
                              f"{reply.get('error', 'no reason given')}")
        return content
    return None  # pragma: no cover - the loop returns or raises


# -- the worker's side ------------------------------------------------------------

def handle(header: dict, body: bytes) -> bytes:
    """One message, exactly as the ClientApp would handle it in its own process."""
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    from fedcl.client.handlers import HANDLERS

    if header.get("protocol") != PROTOCOL or header.get("kind") not in KINDS:
        raise ValueError(f"protocol {header.get('protocol')!r}, kind {header.get('kind')!r}: expected "
                         f"protocol {PROTOCOL} and one of {', '.join(KINDS)} (ClientApp and worker "
                         "from different fedcl versions?)")
    content = recorddict_from_proto(ProtoRecordDict.FromString(body))
    reply = HANDLERS[header["kind"]](content, dict(header["run_config"]), dict(header["node_config"]),
                                     header.get("message_id", ""))
    return recorddict_to_proto(reply).SerializeToString()


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def serve(listener: socket.socket, *, stop=lambda: False) -> None:
    """Answer messages one at a time until `stop()` (the serving child runs this forever)."""
    while not stop():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(None)
            if _peer_uid(conn) != os.getuid():
                logger.warning("node worker: refused a connection from another user")
                continue
            try:
                header, body = _recv(conn)
            except (ConnectionError, OSError, ValueError) as error:
                logger.warning("node worker: unreadable request (%s)", error)
                continue
            started = time.perf_counter()
            try:
                reply, content = {"ok": True}, handle(header, body)
            except Exception as error:  # the message fails; the worker serves the next one
                logger.exception("node worker: %s message %s failed", header.get("kind"), header.get("message_id"))
                reply, content = {"ok": False, "error": f"{type(error).__name__}: {error}"}, b""
            print(f"node worker | run {header.get('run_id')} | {header.get('kind')} | "
                  f"message {header.get('message_id')} | {time.perf_counter() - started:.2f} s"
                  f"{'' if reply['ok'] else ' | failed'}", flush=True)
            try:
                _send(conn, reply, content)
            except OSError as error:  # the ClientApp went away; it will be told by Flower
                logger.warning("node worker: reply not delivered to the ClientApp (%s)", error)


def bind(state_dir: Path) -> socket.socket:
    """The worker's listening socket in `state_dir` (0700), itself 0600; refuses a
    folder where a worker already answers."""
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    path = socket_path(state_dir)
    if path.exists() or path.is_symlink():
        live = _connect(path, wait=0)
        if live is not None:
            live.close()
            raise WorkerError(f"{path}: a node worker already serves this state folder; stop it first")
        path.unlink()  # left by a worker that died
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    address, fd = _address(path)
    old = os.umask(0o177)  # born 0600: no moment where another user could connect
    try:
        listener.bind(address)
    finally:
        os.umask(old)
        if fd is not None:
            os.close(fd)
    os.chmod(path, 0o600)
    listener.listen(64)
    return listener


def supervise(state_dir: Path, *, max_delay: float = 30.0) -> int:
    """Bind the socket, run the serving child, start a new one whenever it dies."""
    listener = bind(state_dir)
    path = socket_path(state_dir)
    stopping = {"flag": False}
    child: subprocess.Popen | None = None

    def _stop(signum, _frame):
        stopping["flag"] = True
        if child is not None and child.poll() is None:
            child.terminate()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    delay = 1.0
    print(f"node worker: listening on {path}", flush=True)
    try:
        while not stopping["flag"]:
            born = time.monotonic()
            child = subprocess.Popen([sys.executable, "-m", "fedcl.client.worker", "--serve-fd",
                                      str(listener.fileno())], pass_fds=(listener.fileno(),))
            print(f"node worker: serving process {child.pid}", flush=True)
            code = child.wait()
            if stopping["flag"]:
                break
            # A child that keeps dying right away is restarted more and more slowly.
            delay = 1.0 if time.monotonic() - born > max_delay else min(delay * 2, max_delay)
            print(f"node worker: serving process {child.pid} exited ({code}); restarting in "
                  f"{delay:.0f} s", flush=True)
            time.sleep(delay)
    finally:
        if child is not None and child.poll() is None:
            child.terminate()
            child.wait(timeout=30)
        listener.close()
        path.unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedcl.client.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--state-dir", type=Path, help="the node's state folder (its node config state-dir)")
    parser.add_argument("--serve-fd", type=int, help=argparse.SUPPRESS)  # the supervisor's child
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.serve_fd is not None:
        import fedcl.client.handlers  # noqa: F401  (torch, transformers: before the first message)

        serve(socket.socket(fileno=args.serve_fd))
        return 0
    if args.state_dir is None:
        parser.error("--state-dir is required: the node's state folder, where worker.sock is made")
    try:
        return supervise(args.state_dir)
    except WorkerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
