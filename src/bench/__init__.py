"""Benchmarks run as programs (`python -m src.bench.<name>`), not as tests."""
