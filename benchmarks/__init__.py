"""rmserve.benchmarks."""
