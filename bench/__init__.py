"""Benchmark harness: wrk against nginx and the gateway on one machine (bench/run)."""
