"""Throughput benchmarks: ``gpu`` (student vs teacher on one GPU) and ``cpu``."""
