"""The log line formats (text and JSON), apart from render.py so that the warden
(supervisor/warden.py) writes the same lines without importing the status model."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

__all__ = ["JsonFormatter", "TextFormatter"]


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s portshard[%(process)d] %(levelname)s %(message)s", datefmt="%H:%M:%S"
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per line for log shippers; lines about a slot or worker carry `slot`
    and `pid` fields (given by the logging call as ``extra=``, see ``worker.log_fields``)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "supervisor_pid": record.process,
            "msg": message,
        }
        for key in ("slot", "pid"):
            value = getattr(record, key, None)
            if isinstance(value, int):
                entry[key] = value
        stream = getattr(record, "stream", None)  # a worker's own line: stdout or stderr
        if isinstance(stream, str):
            entry["stream"] = stream
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)
