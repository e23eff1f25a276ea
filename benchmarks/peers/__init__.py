"""Optional third-party peers for the benchmarks (each module: ``available()`` + a builder)."""
