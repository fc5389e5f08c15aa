"""How the daemons log: one line per record, as text or as JSON.

Loggers are named after their modules (logging.getLogger(__name__)), so a
record says where it comes from. INFO is routine (a run started, a request
refused for the client to fix), WARNING is what needs a look. `--log-format
json` writes one JSON object per line for a log collector: time, level,
logger, role, message, the request fields of a request record (method,
peer, duration_ms, status), and the traceback of an error, if any.
"""
from __future__ import annotations

import json
import logging
import time

#: The formats a daemon's --log-format takes.
FORMATS = ("text", "json")
#: Attributes a record may carry beyond the message (rpc.RequestLog sets them); JSON gives them their own keys.
REQUEST_FIELDS = ("method", "peer", "duration_ms", "status")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self._role = role

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                       + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "role": self._role, "message": record.getMessage()}
        doc.update({k: getattr(record, k) for k in REQUEST_FIELDS if hasattr(record, k)})
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure(role: str, fmt: str = "text") -> None:
    """Log INFO and above to stderr for daemon `role` ("source", "dest"), as text or JSON."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter(role))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
