"""Benchmarks of eva-kernels, run as modules from the repository root.

* :mod:`benches.ops` — the kernels: ``bench_cov_update`` (CPU and GPU), ``bench_topk_eigh`` (GPU).
* :mod:`benches.engine` — EVA end to end: ``bench_engine_cpu`` (MiniLM vs PEFT), ``bench_engine_gpu``.
* :mod:`benches.harness` — the one shared utility: timing, provider grids, JSON, tables.

Results: ``benches/results/<bench>_<device>.json``.
"""
