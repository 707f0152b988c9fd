"""The dit-fast benchmark suite (pytest-benchmark): ``pytest benchmarks/ --benchmark-only``; see README.md."""
