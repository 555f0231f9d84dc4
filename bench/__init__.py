"""Benchmarks (run as scripts: ``python -m bench.inference``); not part of the installed node."""
