"""Logging for Lorry's servers: uvicorn's loggers plus Lorry's own (``lorry.*``), all on stderr.

stdout belongs to the commands (``lorry up`` prints its five lines there and nothing else).
Lorry's lines carry a timestamp: a drain, an ejection or a database outage is read by when it
happened. Nothing logged here may contain a secret (tests scan every log for plaintext keys).
"""

from __future__ import annotations

import copy
from typing import Any

import uvicorn.config

LORRY_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_config(level: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` mapping for uvicorn's ``log_config``."""
    config: dict[str, Any] = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    config["formatters"]["lorry"] = {"format": LORRY_FORMAT}
    config["handlers"]["lorry"] = {
        "class": "logging.StreamHandler",
        "formatter": "lorry",
        "stream": "ext://sys.stderr",
    }
    config["loggers"]["lorry"] = {"handlers": ["lorry"], "level": level.upper(), "propagate": False}
    return config
