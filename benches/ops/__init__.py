"""Kernel benchmarks: ``python -m benches.ops.bench_cov_update``, ``python -m benches.ops.bench_topk_eigh``."""
