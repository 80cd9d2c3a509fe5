"""No plaintext key or admin token in any log of the whole test session (DESIGN §5)."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Generator

import pytest

# A whole deployment key or admin token: none may ever appear in a log.
PLAINTEXT_TOKEN = re.compile(r"lorry_(?:admin_)?[0-9A-Za-z]{12}_[0-9A-Za-z]{49}")


class _LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.texts.append(self.format(record))
            if record.exc_info:
                self.texts.append(logging.Formatter().formatException(record.exc_info))


def no_plaintext_key_in_logs(tmp_path_factory: pytest.TempPathFactory) -> Generator[None, None, None]:
    """Every log record of the session from here on (and every *.log file under the session's
    temporary directory: engine logs included) is searched for a plaintext key at the end."""
    root = logging.getLogger()
    capture = _LogCapture()
    previous = root.level
    root.addHandler(capture)
    root.setLevel(min(previous, logging.INFO))
    try:
        yield
    finally:
        root.removeHandler(capture)
        root.setLevel(previous)
    texts = list(capture.texts)
    files = sorted(tmp_path_factory.getbasetemp().rglob("*.log"))
    texts.extend(path.read_text(encoding="utf-8", errors="replace") for path in files)
    leaks = sorted({match[:20] + "…" for text in texts for match in PLAINTEXT_TOKEN.findall(text)})
    print(f"\nplaintext-key check: {len(capture.texts)} log records and {len(files)} log files searched")
    assert not leaks, f"plaintext keys in logs: {leaks}"
