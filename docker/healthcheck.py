#!/usr/bin/env python3
"""Container health check: exit 0 when the URL answers 2xx within the timeout, else 1. Stdlib only.

lorry-healthcheck [URL] [--timeout SECONDS]     (default http://127.0.0.1:8081/readyz, 4 s)
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8081/readyz"


def check(url: str, timeout: float) -> int:
    if not url.startswith(("http://", "https://")):
        print(f"unhealthy: not an http(s) URL: {url}", file=sys.stderr)
        return 1
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (scheme checked)
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if 200 <= status < 300:
        return 0
    print(f"unhealthy: {url} answered {status}", file=sys.stderr)
    return 1


def main(argv: list[str]) -> int:
    url = DEFAULT_URL
    timeout = 4.0
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--timeout" and args:
            timeout = float(args.pop(0))
        elif arg.startswith("-"):
            print(__doc__, file=sys.stderr)
            return 2
        else:
            url = arg
    return check(url, timeout)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
