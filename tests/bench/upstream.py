"""An OpenAI-compatible upstream that answers at once, for measuring the gateway's own cost
(the method of the peers' overhead figures: a local mock upstream). Run as a process:
``python -m tests.bench.upstream --port N``. Streams with ``"content": "mode:long"`` carry
``--chunks`` events, sent as fast as the client takes them.
"""

from __future__ import annotations

import argparse

import uvicorn

from tests.gateway.standin import StandInEngine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=64)
    args = parser.parse_args()
    engine = StandInEngine("bench", long_chunks=args.chunks, chunk_interval_s=0.0)
    engine.requests = _Forgetful()  # a long benchmark must not grow the process
    engine.hosts = _Forgetful()
    uvicorn.run(
        engine.app,
        host="127.0.0.1",
        port=args.port,
        http="httptools",
        loop="uvloop",
        lifespan="off",
        log_level="warning",
        access_log=False,
    )


class _Forgetful(list):  # type: ignore[type-arg]
    def append(self, _item: object) -> None:
        return None


if __name__ == "__main__":
    main()
