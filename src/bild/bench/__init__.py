"""Benchmark harness: tasks, offline data/model paths, and the command-line runner."""
