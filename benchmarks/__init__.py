"""pmhub's benchmark suite: ``python -m benchmarks`` (see docs/performance.md).

The runner (``__main__``) starts each server (:mod:`benchmarks.servers`) and
the load generator (:mod:`benchmarks.loadgen`) as separate processes, so that
the server's own CPU counters measure only the server.
"""
