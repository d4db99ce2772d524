"""A node's long-lived ClientApp executor: one process that serves every message its
SuperNode receives, instead of Flower starting a process per message.

    flower-supernode --isolation process --port 9094 ... &           # starts no process itself
    python -m fedcl.client.executor --runtime-api-address 127.0.0.1:9094 --insecure &

With the default isolation ("subprocess") a SuperNode starts `flower-superexec`, which
starts `flwr-clientapp` for every message: a new Python process, `import flwr`, the app
bundle (FAB) unpacked and imported, one message, exit. With `--isolation process` the
SuperNode starts nothing and waits for an executor to claim its tasks on its Runtime
API; this module is that executor. It polls the API as `flower-superexec` does
(`AcquireTask`, every `--poll-interval` s) and does for each task what `flwr-clientapp`
does (flwr/supernode/runtime/run_clientapp.py) with Flower's own functions: a task
heartbeat, `pull_task_input` (message, context, run, FAB), the ClientApp called on the
message, `push_message` (the reply), `push_task_output` (context and final status).

What runs: the node's installed fedcl (`fedcl.client.app`), never code from the FAB,
so an institution runs the code it installed and reviewed. Flower would import the
ClientApp from the unpacked FAB; here the FAB is checked instead: its hash must be the
run's, its pyproject must name `fedcl.client.app:app`, and every .py file it ships in
fedcl's packages must be byte-for-byte the installed one as the executor found it at
start (`check_fab`, once per FAB; restart the executor after upgrading fedcl).
A FAB that differs is refused: that task fails with the reason, naming the files.

The work: `fedcl.client.app` hands the message to the node's worker when the node
config names one (`fedcl.client.worker`), which is how `fedcl.ops.deploy.launch` starts
it, so this process imports no torch. The training then runs where the model is kept
and where a crash (memory, a native library) is contained and restarted by the
worker's supervisor, while the executor stays up to report that message's failure to
Flower at once. Without a worker the same ClientApp runs the handlers in this process
and `fedcl.session` keeps the model here; a crash then takes the executor with it.

Failures: an exception in a task (the FAB refused, the ClientApp raising, the worker
failing a message) is reported as `flwr-clientapp` reports it, an error reply plus a
failed task status, and the executor serves the next task. One task at a time, like a
worker. If the executor dies mid-task, Flower's rules apply: with no heartbeat for 60 s
the SuperNode marks the task failed and sends the server an error reply ("ClientApp
crashed"); messages that arrive meanwhile wait as pending tasks (the SuperNode pulls
nothing new while one waits) until an executor is started again and claims them, and
the round's `federation.timeout` bounds what the server waits. SIGTERM ends the task in
hand as failed (error reply sent), then the executor exits.

Polling on the path (Flower 1.42 fixes three waits; fedcl shortens them): the
SuperNode pulls from the SuperLink every 3 s while idle and looks for a reply every
0.5 s (1 s and 0.05 s through `fedcl.ops.deploy.supernode`), and the ServerApp's grid
asks for replies every 3 s (0.25 s: `fedcl.federation.reply_polling`). The executor's
own poll is `--poll-interval`, a local call to the SuperNode. Each of these waits starts
short after a message and grows to its interval (`reply_polling.Backoff`).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import signal
import sys
import time
import traceback
import zipfile
from dataclasses import dataclass

import fedcl  # noqa: F401  (offline defaults before flwr loads)

APP_REF = "fedcl.client.app:app"
# A local call to the node's own SuperNode: cheap, and a quarter second is most of a
# steady message's latency budget at most.
POLL_INTERVAL = 0.25
# A task's Runtime API calls are retried this long at most: past the SuperNode's 60 s
# heartbeat patience its token is gone anyway.
TASK_RETRY_SECONDS = 120.0


class FabMismatch(RuntimeError):
    """The run's app bundle is not the fedcl this node has installed."""


class Stopped(BaseException):
    """SIGTERM or SIGINT: end the task in hand as failed, then exit."""


# -- what runs: the installed fedcl, checked against the FAB -----------------------

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_INSTALLED: dict[str, str] = {}  # path below the fedcl package -> sha256, read at start


def snapshot_installed() -> dict[str, str]:
    """The installed fedcl's .py files as this process starts (its code is imported now;
    a later change on disk is not what runs here until a restart), keyed by their path
    below the `fedcl` package: `config.py`, `client/app.py` (fedcl/client is
    `fedcl.client`, a folder or, in a checkout, a link to client/)."""
    from pathlib import Path

    if not _INSTALLED:
        root = Path(fedcl.__file__).parent
        for folder, dirs, files in os.walk(root, followlinks=True):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if name.endswith(".py"):
                    path = Path(folder) / name
                    _INSTALLED[path.relative_to(root).as_posix()] = _sha256(path.read_bytes())
    return _INSTALLED


def installed_key(path: str, installed: dict[str, str]) -> str | None:
    """The installed file a FAB path stands for (`fedcl/config.py` is `config.py`,
    `client/app.py` is `fedcl.client`'s), or None for a path outside fedcl's packages
    (tests/ in a FAB built with `flwr run .`): the ClientApp never imports those."""
    top, _, rest = path.partition("/")
    if not rest:
        return None
    if top == "fedcl":
        return rest
    return path if any(key.startswith(f"{top}/") for key in installed) else None


def check_fab(content: bytes, fab_hash: str) -> int:
    """Refuse (FabMismatch) a FAB that is not the installed fedcl; return how many of
    its files were compared. Flower's FAB format: a zip whose `.info/CONTENT` lists
    `path,sha256,size` for every file."""
    import tomllib

    if _sha256(content) != fab_hash:
        raise FabMismatch(f"the FAB's content hashes to {_sha256(content)[:12]}, not the run's {fab_hash[:12]}")
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as fab:
            listed = dict(line.split(",")[:2] for line in fab.read(".info/CONTENT").decode().splitlines() if line)
            if any(_sha256(fab.read(path)) != sha for path, sha in listed.items()):
                raise FabMismatch("the FAB's files do not match its own .info/CONTENT")
            app_ref = tomllib.loads(fab.read("pyproject.toml").decode())["tool"]["flwr"]["app"]["components"]["clientapp"]
    except (zipfile.BadZipFile, KeyError, ValueError) as error:
        raise FabMismatch(f"not a Flower app bundle ({type(error).__name__}: {error})") from error
    if app_ref != APP_REF:
        raise FabMismatch(f"the FAB's ClientApp is {app_ref!r}; this executor runs only {APP_REF!r}")
    differ, compared, installed = [], 0, snapshot_installed()
    for path, sha in sorted(listed.items()):
        key = installed_key(path, installed) if path.endswith(".py") else None
        if key is None:
            continue
        compared += 1
        if installed.get(key) != sha:
            differ.append(path)
    if differ:
        raise FabMismatch(f"{len(differ)} of the FAB's {compared} fedcl files differ from this node's installed "
                          f"fedcl ({', '.join(differ[:5])}{', ...' if len(differ) > 5 else ''}): install the "
                          "coordinator's fedcl version on this node, or submit the run from this version")
    return compared


# -- one task, as flwr-clientapp does it -----------------------------------------------

def _retry_invoker(max_time: float | None):
    """Flower's HTTP retry, except that a 401 (the task's token expired) or 403 (the run
    stopped) ends the call: Flower's invoker sends its own process SIGINT (401) or raises
    from its give-up check (403), fine for a one-task process, not for this one."""
    import httpx
    from flwr.supercore.retry import make_simple_http_retry_invoker

    invoker = make_simple_http_retry_invoker()
    flower_giveup = invoker.should_giveup

    def should_giveup(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code in (401, 403):
            return True
        return flower_giveup(exc) if flower_giveup is not None else False

    invoker.should_giveup, invoker.max_time = should_giveup, max_time
    return invoker


def runtime_client(address: str, *, component: str, certificates: bytes | None, insecure: bool,
                   token: str | None = None, retry=None):
    """A Runtime API client as Flower's SuperExec (`component="SuperExec"`) or ClientApp
    (`"flwr-clientapp"`, with the task's token) makes it."""
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor

    interceptors = [RuntimeTracingInterceptor(), RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=insecure,
                                                 root_certificates=certificates, interceptors=interceptors,
                                                 retry_invoker=retry or _retry_invoker(None))


def _heartbeat(client, lost: list):
    """Flower's task heartbeat, except that a refused one (the task expired) is noted
    instead of raising SIGINT in this process."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    def beat() -> bool:
        try:
            if not client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success:
                lost.append(time.time())
        except (httpx.TransportError, httpx.HTTPStatusError):
            return False
        return True

    return beat


@dataclass
class Outcome:
    task_id: int
    run_id: int = 0
    kind: str = "-"
    ok: bool = False
    details: str = ""
    seconds: float = 0.0
    pulled: float = 0.0  # seconds into the task when its input was in, and when the ClientApp returned
    handled: float = 0.0


def _load_app():
    from fedcl.client.app import app

    return app


def serve_task(address: str, token: str, task_id: int, *, certificates: bytes | None, insecure: bool,
               checked: set[str]) -> Outcome:
    """Pull one task's input, run fedcl's ClientApp on it, push the reply and status."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    started, outcome, lost, stopping = time.perf_counter(), Outcome(task_id), [], None
    retry = _retry_invoker(TASK_RETRY_SECONDS)
    client = runtime_client(address, component="flwr-clientapp", certificates=certificates, insecure=insecure,
                            token=token, retry=retry)
    heartbeat, message, context, reply = HeartbeatSender(_heartbeat(client, lost)), None, None, None
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        outcome.run_id, outcome.kind = run.run_id, message.metadata.message_type
        outcome.pulled = time.perf_counter() - started
        if fab.hash_str not in checked:
            check_fab(fab.content, run.fab_hash)
            checked.add(fab.hash_str)
        reply = _load_app()(message=message, context=context)
        outcome.ok, outcome.handled = True, time.perf_counter() - started
    except (Exception, Stopped) as error:  # reported as flwr-clientapp reports it
        code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(error, FabMismatch) else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        outcome.details = f"{type(error).__name__}: {error}"
        if not isinstance(error, (FabMismatch, Stopped)):
            traceback.print_exc()  # the cause, in the executor's log (flwr-clientapp logs it too)
        if message is not None:
            reply = Message(Error(code=code, reason=outcome.details), reply_to=message)
        if isinstance(error, Stopped):
            stopping, retry.max_tries = error, 1  # as flwr-clientapp on exit: report, do not linger
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception as error:  # the reply is lost; the status still says why
            outcome.ok, outcome.details = False, f"reply not pushed ({type(error).__name__}: {error})"
        if heartbeat.is_running:  # first: a beat after the final status is refused (its token is gone)
            heartbeat.stop()
        push_task_output(client, context, SubStatus.COMPLETED if outcome.ok else SubStatus.FAILED,
                         "" if outcome.ok else outcome.details)
        client.close()
        outcome.seconds = time.perf_counter() - started
        if lost:
            outcome.details += " (the SuperNode had expired this task)"
    if stopping is not None:
        raise stopping
    return outcome


# -- the loop ------------------------------------------------------------------------

def log_line(outcome: Outcome, served: int) -> str:
    """One greppable line per task; the test and the benchmark read these."""
    state = "ok" if outcome.ok else f"failed | {' '.join(outcome.details.split())[:500]}"
    return (f"executor | pid {os.getpid()} | task {outcome.task_id} | run {outcome.run_id} | {outcome.kind} "
            f"| {outcome.seconds:.2f} s | served {served} | {state} | input {outcome.pulled:.2f} s, "
            f"ClientApp {max(outcome.handled - outcome.pulled, 0):.2f} s")


def serve(address: str, *, certificates: bytes | None, insecure: bool, poll_interval: float,
          stop=lambda: False) -> int:
    """Claim and serve ClientApp tasks one at a time until `stop()`; return how many."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    client = runtime_client(address, component="SuperExec", certificates=certificates, insecure=insecure)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    served, checked = 0, set()
    from fedcl.federation.reply_polling import Backoff

    waits = Backoff(poll_interval)  # short right after a task: the next message follows soon
    try:
        while not stop():
            try:
                claimed = client.AcquireTask(request)
            except httpx.HTTPStatusError as error:  # the SuperNode refused; keep asking, slowly
                print(f"executor: AcquireTask answered {error.response.status_code}; retrying", flush=True)
                time.sleep(5 * poll_interval)
                continue
            if claimed.HasField("task") and claimed.token:
                outcome = serve_task(address, claimed.token, claimed.task.task_id, certificates=certificates,
                                     insecure=insecure, checked=checked)
                served += 1
                print(log_line(outcome, served), flush=True)
                waits.reset()
                continue  # the next message may already wait
            time.sleep(waits.next())
    finally:
        client.close()
    return served


def _raise_stopped(signum, _frame):
    raise Stopped(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedcl.client.executor", description=__doc__.split("\n")[0])
    parser.add_argument("--runtime-api-address", required=True,
                        help="the SuperNode's Runtime API, HOST:PORT (flower-supernode --port, on 127.0.0.1)")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true", help="plain HTTP to the SuperNode (its default on 127.0.0.1)")
    tls.add_argument("--root-certificates", help="CA that signed the SuperNode's --ssl-certfile")
    parser.add_argument("--poll-interval", type=float, default=POLL_INTERVAL,
                        help=f"the longest wait between task polls while idle (default {POLL_INTERVAL}; "
                             "the first after a task is shorter)")
    args = parser.parse_args(argv)
    if not 0.01 <= args.poll_interval <= 60:
        parser.error(f"--poll-interval {args.poll_interval}: must be between 0.01 and 60 seconds")
    certificates = None
    if args.root_certificates:
        try:
            certificates = open(args.root_certificates, "rb").read()
        except OSError as error:
            parser.error(f"--root-certificates {args.root_certificates}: {error.strerror}")
    elif not args.insecure:
        parser.error("give --insecure (the SuperNode's Runtime API without TLS, flower-supernode's default) "
                     "or --root-certificates CA (with its --ssl-certfile)")
    signal.signal(signal.SIGTERM, _raise_stopped)
    signal.signal(signal.SIGINT, _raise_stopped)
    _load_app()  # an import error shows now, not at the first message
    import flwr.supercore.heartbeat  # noqa: F401  (and Flower's task functions: not during the first task)
    import flwr.supernode.runtime.run_clientapp as run_clientapp

    from fedcl.federation.reply_polling import prompt_object_pulls

    # The task is claimable before its objects are on the node: ask again soon, not in 1 s.
    prompt_object_pulls(run_clientapp, "pull_and_inflate_object_from_tree")
    snapshot_installed()  # what the FABs are compared with: the code this process loads
    print(f"executor: pid {os.getpid()} serving ClientApp tasks of {args.runtime_api_address} "
          f"(fedcl {fedcl.__version__} from {os.path.dirname(fedcl.__file__)})", flush=True)
    try:
        serve(args.runtime_api_address, certificates=certificates, insecure=args.insecure,
              poll_interval=args.poll_interval)
    except Stopped as why:
        print(f"executor: stopped ({why})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
