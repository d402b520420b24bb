"""Benchmarks run from the command line (`python -m recsys_lm.bench.latency`)."""
