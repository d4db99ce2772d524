"""`python -m bench.deployment --trace`: every process of the deployment (it is put first on
their PYTHONPATH) stamps each log line with the time, to the millisecond, so the steps of
a message can be read off the SuperNodes' logs. Measurement only; nothing ships it."""

import logging
import time

_format = logging.Formatter.format


def _stamped(self, record):
    return time.strftime("%H:%M:%S", time.localtime(record.created)) + ".%03d " % record.msecs + _format(self, record)


logging.Formatter.format = _stamped


# Each HTTP request a process makes (httpx: SuperNode, executor, ServerApp) and each one the
# SuperLink serves (Starlette), with its path and how long it took, on stderr.
import sys  # noqa: E402


def _note(kind, path, start):
    now = time.time()
    sys.stderr.write(time.strftime("%H:%M:%S", time.localtime(now)) + ".%03d " % ((now % 1) * 1000)
                     + f"HTTP-{kind} {path} {1000 * (now - start):.1f} ms\n")


try:
    import httpx

    _send = httpx.Client.send

    def _timed_send(self, request, *args, **kwargs):
        start = time.time()
        try:
            return _send(self, request, *args, **kwargs)
        finally:
            _note("client", request.url.path, start)

    httpx.Client.send = _timed_send
except ImportError:
    pass

try:
    import starlette.applications

    _call = starlette.applications.Starlette.__call__

    async def _timed_call(self, scope, receive, send):
        start = time.time()
        try:
            await _call(self, scope, receive, send)
        finally:
            if scope.get("type") == "http":
                _note("server", scope.get("path"), start)

    starlette.applications.Starlette.__call__ = _timed_call
except ImportError:
    pass
