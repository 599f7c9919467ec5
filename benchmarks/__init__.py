"""Benchmarks against diffusers (benchmark-only dependency: ``pip install -e .[bench]``). Run ``python benchmarks/run.py``."""
