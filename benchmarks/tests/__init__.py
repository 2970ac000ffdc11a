"""Tests of the benchmarks themselves (run in the default test run)."""
