"""End-to-end EVA benchmarks: ``python -m benches.engine.bench_engine_cpu`` and
``python -m benches.engine.bench_engine_gpu``."""
