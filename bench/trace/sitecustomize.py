"""`python -m bench.deployment --trace`: every process of the deployment (it is put first on
their PYTHONPATH) stamps each log line with the time, to the millisecond, so the steps of
a message can be read off the SuperNodes' logs. Measurement only; nothing ships it."""

import logging
import time

_format = logging.Formatter.format


def _stamped(self, record):
    return time.strftime("%H:%M:%S", time.localtime(record.created)) + ".%03d " % record.msecs + _format(self, record)


logging.Formatter.format = _stamped
