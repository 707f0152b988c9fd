"""The implementations the suite compares, in report order, baselines first (torch-free: ``benchmarks.report`` reads
it without importing torch; ``benchmarks.common`` builds each one)."""

IMPLS: tuple[str, ...] = ("reference", "reference+compile", "dit_fast", "dit_fast+compile", "diffusers")
BASELINES: tuple[str, ...] = ("reference", "reference+compile")
FAST_IMPLS: tuple[str, ...] = ("dit_fast", "dit_fast+compile")
