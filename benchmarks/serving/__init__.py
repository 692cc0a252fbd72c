"""Helpers of ``benchmarks/serving_bench.py``: load generation, the bare ASGI ceiling, Feast."""
