"""`firstcare bench`: side-by-side benchmarks of the product, its physical limits and its peers.

Every scenario starts what it needs on free loopback ports, runs for a bounded time, stops
everything it started and appends its numbers to ``bench/RESULTS.md``. See ``bench/cli.py``.
"""
