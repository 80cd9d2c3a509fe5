"""Measured figures of the gateway tests, printed as they happen and again in pytest's terminal
summary (section "gateway figures"), so ``make test`` shows them without ``-s``."""

from __future__ import annotations

FIGURES: list[tuple[str, str]] = []


def report(test: str, text: str) -> None:
    """Print ``text`` now and keep it, under ``test``'s name, for the terminal summary."""
    print(text)
    FIGURES.append((test, " ".join(text.split()) if "\n" not in text.strip() else text.strip("\n")))
