"""``make bench``: Lorry's speed and memory figures, printed (``python -m tests.bench``).

Not tests: nothing here passes or fails on a number. Each section says what it measured and how,
so a figure can be compared with the peers' published ones (``shared/reference/peers.md`` §3.1).
"""
