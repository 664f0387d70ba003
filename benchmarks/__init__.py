"""Benchmarks that print numbers and write JSON."""
