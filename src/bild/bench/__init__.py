"""The tools built on the core `bild`: the benchmark harness (tasks, offline data/model paths), calibration,
alignment and the `bild` command line. The core never imports this package (tests/test_layout.py)."""
