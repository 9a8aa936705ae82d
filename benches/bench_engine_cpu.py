"""End-to-end EVA on CPU: eva-kernels vs the forward passes alone vs PEFT's EVA.

Setting (issue 2): the bundled MiniLM, batches of 4 x 128 tokens of real text (Python
standard-library docstrings), r=8, rho=2, tau=0.99, targets query/key/value/dense of the
encoder. Measures wall time of

  (a) the forward passes alone over exactly the batches our run consumed,
  (b) ``eva.get_eva_state_dict``,
  (c) ``peft.tuners.lora.eva.get_eva_state_dict`` on the same loader (it cycles the loader
      until converged and does one extra forward to find shared inputs),

then, in separate untimed runs that record every token each layer consumed, the subspace
overlap of each method's components with the exact PCA (float64 SVD) of those tokens.

    python benches/bench_engine_cpu.py [--batches 200] [--no-peft] [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _bench_utils import default_out, environment, print_table, write_json  # noqa: E402
from text_corpus import stdlib_passages  # noqa: E402

TARGETS = r".*encoder\.layer\.\d+\..*(query|key|value|dense)"


def build(batches: int, batch_size: int, max_length: int):
    from transformers import AutoModel, AutoTokenizer
    from eva.text_data import bundled_model_path
    path = bundled_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    passages = stdlib_passages(limit=batches * batch_size)
    loader = []
    for i in range(0, len(passages) - batch_size + 1, batch_size):
        enc = tok(passages[i:i + batch_size], padding="max_length", truncation=True, max_length=max_length,
                  return_tensors="pt")
        loader.append(dict(enc))
    return model, loader


def config(r, rho, tau):
    from peft import LoraConfig
    from peft.tuners.lora.config import EvaConfig
    return LoraConfig(r=r, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig(rho=rho, tau=tau))


def time_forward(model, batches, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                model(**b)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_ours(model, loader, cfg, backend):
    import eva
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = eva.get_eva_state_dict(model, loader, cfg, show_progress_bar=False, backend=backend)
    return time.perf_counter() - t, sd


class _PeftCounter:
    """Counts the batches PEFT's loop pulls (it cycles the loader)."""

    def __init__(self, loader):
        self.loader, self.pulled = loader, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for b in self.loader:
            self.pulled += 1
            yield b


def run_peft(model, loader, cfg):
    from peft.tuners.lora.eva import get_eva_state_dict
    counted = _PeftCounter(loader)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = get_eva_state_dict(model, counted, cfg, show_progress_bar=False)
    return time.perf_counter() - t, sd, counted.pulled


def overlaps_ours(model, loader, cfg, backend):
    """Per-layer overlap of our components with the exact PCA of the tokens each consumed."""
    from eva.statistics import RunningStats
    from eva_kernels import subspace_overlap
    seen, original = {}, RunningStats.update

    def spy(self, x, mask):
        rows = x.detach().double()
        seen.setdefault(self.name, []).append(rows[mask] if mask is not None else rows)
        return original(self, x, mask)

    RunningStats.update = spy
    try:
        _, sd = run_ours(model, loader, cfg, backend)
    finally:
        RunningStats.update = original
    out = {}
    for name, comp in sd.items():
        if comp.shape[0]:
            y = torch.cat(seen[sd.metadata["layers"][name]["group"]])
            vh = torch.linalg.svd(y - y.mean(0), full_matrices=False)[2]
            out[name] = float(subspace_overlap(comp.double(), vh[: comp.shape[0]]))
    return out


def overlaps_peft(model, loader, cfg):
    """Same for PEFT: records what each IncrementalPCA was fed (PEFT's IPCA centres too)."""
    from peft.tuners.lora import eva as peft_eva
    from peft.utils.incremental_pca import IncrementalPCA
    from eva_kernels import subspace_overlap
    fed, names = {}, {}
    orig_fit, orig_init = IncrementalPCA.partial_fit, peft_eva.SVDHook.__init__

    def fit(self, X, *a, **k):
        fed.setdefault(id(self), []).append(X.detach().double().cpu())
        return orig_fit(self, X, *a, **k)

    def init(self, *a, **k):
        orig_init(self, *a, **k)
        names[id(self.svd)] = self.name

    IncrementalPCA.partial_fit, peft_eva.SVDHook.__init__ = fit, init
    hooks_of = {}
    orig_call = peft_eva.SVDHook.__call__

    def call(self, *a, **k):
        hooks_of[self.name] = id(self.svd)
        return orig_call(self, *a, **k)

    peft_eva.SVDHook.__call__ = call
    try:
        _, sd, _ = run_peft(model, loader, cfg)
    finally:
        IncrementalPCA.partial_fit, peft_eva.SVDHook.__init__ = orig_fit, orig_init
        peft_eva.SVDHook.__call__ = orig_call
    # layers sharing an input map to the hook of the first layer of their group
    ours_groups = {}
    out = {}
    for name, comp in sd.items():
        if not comp.shape[0]:
            continue
        key = hooks_of.get(name)
        if key is None:  # shared-input follower: find the member of its group that has a hook
            prefix = name.rsplit(".", 1)[0]
            key = next((v for n, v in hooks_of.items() if n.rsplit(".", 1)[0] == prefix
                        and n.rsplit(".", 1)[1] in ("query", "key", "value")), None)
        y = torch.cat(fed[key])
        vh = torch.linalg.svd(y - y.mean(0), full_matrices=False)[2]
        out[name] = float(subspace_overlap(comp.double(), vh[: comp.shape[0]]))
    del ours_groups
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--rho", type=float, default=2.0)
    ap.add_argument("--tau", type=float, default=0.99)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of the fast runs (median)")
    ap.add_argument("--backend", default=None, help="eva_kernels backend (default: auto)")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--no-overlap", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    model, loader = build(args.batches, args.batch_size, args.max_length)
    cfg = config(args.r, args.rho, args.tau)
    time_forward(model, loader[:3], 1)  # warm-up
    run_ours(model, loader[:4], cfg, args.backend)

    ours_runs = [run_ours(model, loader, cfg, args.backend) for _ in range(args.repeats)]
    ours_t = statistics.median(t for t, _ in ours_runs)
    sd = ours_runs[0][1]
    steps = sd.metadata["run"]["steps"]
    fwd_t = time_forward(model, loader[:steps], args.repeats)
    rows = [
        {"method": "forward only", "batches": steps, "seconds": fwd_t, "x_forward": 1.0},
        {"method": f"eva-kernels ({sd.metadata['run']['backend']})", "batches": steps, "seconds": ours_t,
         "x_forward": ours_t / fwd_t, "stop": sd.metadata["run"]["stop_reason"]},
    ]
    result = {"env": environment("cpu"), "args": vars(args), "rows": rows,
              "ours_run": sd.metadata["run"], "ours_ranks": sd.ranks}
    if not args.no_peft:
        peft_t, peft_sd, pulled = run_peft(model, loader, cfg)
        rows.append({"method": "peft 0.21 EVA", "batches": pulled, "seconds": peft_t, "x_forward": peft_t / fwd_t,
                     "peft_over_ours": peft_t / ours_t})
        result["peft_ranks"] = {k: int(v.shape[0]) for k, v in peft_sd.items()}
    if not args.no_overlap:
        ov = overlaps_ours(model, loader, cfg, args.backend)
        rows[1]["overlap_mean"] = statistics.mean(ov.values())
        rows[1]["overlap_min"] = min(ov.values())
        result["overlap_ours"] = ov
        if not args.no_peft:
            ovp = overlaps_peft(model, loader, cfg)
            rows[2]["overlap_mean"] = statistics.mean(ovp.values())
            rows[2]["overlap_min"] = min(ovp.values())
            result["overlap_peft"] = ovp
    path = write_json(args.out or default_out("engine_cpu", "cpu"), result)
    print(f"wrote {path}")
    print_table(rows, ["method", "batches", "seconds", "x_forward", "peft_over_ours", "overlap_mean",
                       "overlap_min", "stop"], title="EVA end to end, MiniLM, CPU")


if __name__ == "__main__":
    main()
