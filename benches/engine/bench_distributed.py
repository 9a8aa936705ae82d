"""What a distributed EVA run communicates: 2 gloo ranks on this CPU, sketches vs full statistics.

Setting (issue 11): ``--nproc`` processes (2; ``torch.distributed`` with gloo on 127.0.0.1, one
thread each; with ``--device cuda`` NCCL, one GPU per rank), each with its own shard of the data,
``gather_distributed_inputs=True``. Cases:

* ``minilm``: the demo: bundled MiniLM, the bundled calibration text split between the ranks
  (every line used once), batches of 4 x <= 128 tokens, r=8, rho=2, the demo's targets;
* ``llama8b-slice``: a random-weight Llama with Llama-3.1-8B's layer shapes (hidden 4096,
  intermediate 14336, 32/8 heads), ``--layers`` decoder layers (2), all seven projections,
  r=16, rho=2, tau=1.0 with ``--batches`` random-token batches of 2 x 256 per rank.

Each rank reports its run's ``metadata["run"]["communication"]``: bytes all-reduced per step, by
the final solves and in total, and the seconds spent in collectives. Printed per case: the mean
bytes per step against ``sum_groups 4 d^2`` (what all-reducing the statistics every step would
move), and collective time as a share of the wall time. The time in collectives includes one
rank waiting for another; a probe of the link (all-reduce latency and bandwidth, measured in the
workers first) estimates the part that is transfer: calls x latency + bytes / bandwidth. Goals
(slice, r=16, rho=2): bytes per step <= 1% of the full statistics; collectives <= 5% of wall time.

Run from the repository root:
    python -m benches.engine.bench_distributed [--cases minilm,llama8b-slice] [--layers 2] [--batches 4]
    python -m benches.engine.bench_distributed --quick   (MiniLM only, 6 batches per rank)
    python -m benches.engine.bench_distributed --device cuda --nproc 8   (a multi-GPU machine, NCCL)
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import warnings
from datetime import timedelta

from benches import harness

SCRIPT = "python -m benches.engine.bench_distributed"
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None):
    p = harness.parser(__doc__, SCRIPT, dry_run=False, quick="MiniLM only, 6 batches per rank")
    p.add_argument("--cases", default="minilm,llama8b-slice")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the 8B-shaped slice")
    p.add_argument("--batches", type=int, default=4, help="batches per rank of the 8B-shaped slice")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--nproc", type=int, default=2, help="ranks (processes)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: NCCL, GPU i for rank i")
    return p.parse_args(argv)


def _minilm(rank: int, world: int, limit):
    from transformers import AutoModel, AutoTokenizer
    from benches.engine.common import lora_eva_config
    from eva.cli.arguments import DEMO_TARGETS
    from eva.cli.text_data import TextBatches, bundled_calibration_path, bundled_model_path, read_lines
    path = bundled_model_path()
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    lines = read_lines(bundled_calibration_path())[rank::world]  # every line on one rank
    batches = list(TextBatches(tok, lines, batch_size=4, max_length=128))[:limit]
    return model, batches, lora_eva_config(DEMO_TARGETS.split(","), 8, 2.0, 0.99)


def _llama_slice(rank: int, layers: int, n_batches: int, seq: int):
    import torch
    from benches.engine.bench_llm_width import SHAPE
    from benches.engine.common import lora_eva_config
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)  # the same weights on every rank
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, vocab_size=1024, max_position_embeddings=seq,
                                         **SHAPE)).eval()
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own tokens
    batches = [{"input_ids": torch.randint(0, 1024, (2, seq), generator=g)} for _ in range(n_batches)]
    for b in batches:
        b["attention_mask"] = torch.ones_like(b["input_ids"])
    return model, batches, lora_eva_config(LLAMA_TARGETS, 16, 2.0, 1.0)


def _worker(rank: int, port: int, case: str, args, out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    import eva
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.nproc, timeout=timedelta(seconds=600))
    try:
        if case == "minilm":
            model, batches, cfg = _minilm(rank, args.nproc, 6 if args.quick else None)
        else:
            model, batches, cfg = _llama_slice(rank, args.layers, args.batches, args.seq)
        if cuda:
            from eva.engine.tokens import move_inputs_to_device
            model = model.to(f"cuda:{rank}")
            batches = [move_inputs_to_device(b, torch.device(f"cuda:{rank}")) for b in batches]
        link = _probe_link(dist, torch.device(f"cuda:{rank}") if cuda else torch.device("cpu"))
        dist.barrier()
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sd = eva.get_eva_state_dict(model, batches, cfg, show_progress_bar=False)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        run = sd.metadata["run"]
        record = {"rank": rank, "wall_seconds": wall, "steps": run["steps"], "stop_reason": run["stop_reason"],
                  "groups": len(sd.metadata["groups"]), "communication": run["communication"], "link": link}
        with open(os.path.join(out_dir, f"{case}_rank{rank}.json"), "w") as fh:
            json.dump(record, fh)
    finally:
        dist.destroy_process_group()


def _probe_link(dist, device) -> dict:
    """This link's all-reduce latency (4 bytes) and bandwidth (2.3 MB, the size of one product of
    a 14336-wide group), medians of 15, to split collective time into transfer and waiting."""
    import statistics
    import torch

    def timed(n):
        t = torch.ones(n, device=device)
        dist.all_reduce(t)
        out = []
        for _ in range(15):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            out.append(time.perf_counter() - t0)
        return statistics.median(out)
    latency, big = timed(1), timed(14336 * 40)
    return {"latency_s": latency, "bytes_per_s": 14336 * 40 * 4 / max(big - latency, 1e-9)}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(case: str, args) -> list:
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(_free_port(), case, args, tmp), nprocs=args.nproc, start_method="spawn")
        records = []
        for r in range(args.nproc):
            with open(os.path.join(tmp, f"{case}_rank{r}.json")) as fh:
                records.append(json.load(fh))
    return records


def summarize(case: str, records: list) -> dict:
    comm = [r["communication"] for r in records]
    steps = comm[0]["bytes_per_step"]
    per_step = sum(steps) / max(len(steps), 1)
    full = comm[0]["full_statistics_bytes_per_step"]
    return {"case": case, "steps": records[0]["steps"], "groups": records[0]["groups"],
            "bytes/step": per_step, "full statistics/step": full, "share of full": per_step / full,
            "final solves bytes": comm[0]["bytes_final_solves"], "total bytes": comm[0]["bytes_total"],
            "collective s": max(c["collective_seconds"] for c in comm),
            "transfer s (est.)": max(_transfer(c, r["link"]) for c, r in zip(comm, records)),
            "wall s": max(r["wall_seconds"] for r in records),
            "collective share": max(c["collective_seconds"] / r["wall_seconds"] for c, r in zip(comm, records)),
            "transfer share (est.)": max(_transfer(c, r["link"]) / r["wall_seconds"] for c, r in zip(comm, records))}


def _transfer(comm: dict, link: dict) -> float:
    """Seconds the collectives would take on this link without waiting for other ranks: one
    latency per call plus the bytes at the probed bandwidth (the rest of the time in collectives
    is one rank waiting for the others: load imbalance, not communication)."""
    return comm["calls"] * link["latency_s"] + comm["bytes_total"] / link["bytes_per_s"]


def main(argv=None):
    args = parse_args(argv)
    cases = ["minilm"] if args.quick else [c.strip() for c in args.cases.split(",") if c.strip()]
    rows, raw = [], {}
    for case in cases:
        print(f"{SCRIPT}: {case} on {args.nproc} {'NCCL' if args.device == 'cuda' else 'gloo'} ranks ...", flush=True)
        raw[case] = run_case(case, args)
        rows.append(summarize(case, raw[case]))
    backend = "nccl" if args.device == "cuda" else "gloo"
    payload = {"environment": harness.environment(args.device), "world_size": args.nproc, "backend": backend,
               "setting": {k: getattr(args, k) for k in ("layers", "batches", "seq")}, "rows": rows, "ranks": raw}
    out = args.out or harness.default_out(f"distributed_{backend}{args.nproc}", args.device, partial=args.quick)
    harness.report(out, payload, rows, list(rows[0]),
                   title=f"{args.nproc} {backend} ranks: bytes all-reduced (sketches)")


if __name__ == "__main__":
    main()
