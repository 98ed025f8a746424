"""Benchmarks: scripts that measure and report, never pass/fail timing in the test suite."""
