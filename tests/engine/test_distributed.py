"""EVA under torch.distributed (gloo, 2 ranks on 127.0.0.1): statistics summed over ranks.

Two spawned worker processes build the same tiny random Llama and each gets a different
shard of the batches (rank 0 the even ones, rank 1 the odd ones). Every worker runs

* ``early``:   gather_distributed_inputs=True, low tau (stops on convergence, in lockstep);
* ``partial``: gathered, tau=0.3: groups detach at different batches, data runs out;
* ``gather``:  gather_distributed_inputs=True, tau=1.0 (never converges: consumes all data);
* ``local``:   gather_distributed_inputs=False (each rank on its own shard, no collective);
* ``sequential``: gathered, tau=1.0, a memory budget of one decoder layer's statistics
  (layer-sequential: both ranks run the same windows in lockstep);
* ``per_group``: gathered, tau=1.0, ``batch_solves=False`` (by default distributed runs solve
  the groups of one width together: one all-reduce per iteration and width);

and saves each result with ``EvaStateDict.save`` into a temporary folder. The test process
then checks (a) both ranks agree, (b) the gathered run equals a single-process run on
batches that concatenate the two ranks' batch i, (c) the local runs equal single-process
runs on each shard. One spawn serves every test (module-scoped fixture) to keep it fast.
"""
from __future__ import annotations

import json
import os
import socket
import traceback
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import eva
from helpers import random_token_batches
from eva_kernels import subspace_overlap

pytestmark = pytest.mark.distributed

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

WORLD = 2
N_BATCHES = 8  # 4 per rank
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R = 3
JOIN_TIMEOUT_S = 90.0  # whole spawn (imports ~8 s per worker on 2 shared cores)
PG_TIMEOUT_S = 60.0    # a collective that waits this long fails instead of hanging
BIG_COUNT = 2**24 + 1  # tokens per rank in the count-reduction check
#: one decoder layer's statistics (q/k/v and gate/up share theirs): d=40 three times, d_ff=72 once
ONE_LAYER = 3 * (4 * 40 * 40 + 8 * 40 + 8) + (4 * 72 * 72 + 8 * 72 + 8)
RUNS = {  # name -> (gather_distributed_inputs, tau, engine options)
    "early": (True, 0.1, {}),     # every group converges after 2 batches
    "partial": (True, 0.3, {}),   # groups converge (hooks detach) at different batches
    "gather": (True, 1.0, {}),
    "local": (False, 0.99, {}),
    "sequential": (True, 1.0, {"memory_budget": ONE_LAYER}),
    "per_group": (True, 1.0, {"batch_solves": False}),  # one solve (and its all-reduces) per group
}


# ------------------------------------------------------------------ shared by both sides --------
def build_model():
    from transformers import LlamaConfig, LlamaModel
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    return LlamaModel(cfg).eval()


def all_batches():
    return random_token_batches(97, N_BATCHES, batch=2, seq=13, seed=11, pad_last=3)


def shard(rank, world=WORLD):
    return all_batches()[rank::world]


def concatenated():
    """Batch i = rank 0's batch i followed by rank 1's batch i (same sequence length)."""
    shards = [shard(r) for r in range(WORLD)]
    return [{k: torch.cat([s[i][k] for s in shards]) for k in shards[0][i]} for i in range(len(shards[0]))]


def lora_config(tau):
    from peft import LoraConfig
    from peft.tuners.lora.config import EvaConfig
    return LoraConfig(r=R, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, tau=tau))


PEFT_DIST_WARNING = ("torch.distributed is initialized and `gather_distributed_inputs` is True, therefore EVA "
                     "initialization will gather tensors from all ranks.")


def run_eva(model, batches, tau, r=R, **kw):
    """The result, and whether PEFT's distributed warning was raised (its leading words)."""
    cfg = lora_config(tau)
    cfg.r = r
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sd = eva.get_eva_state_dict(model, batches, cfg, show_progress_bar=False, on_unconverged="warn", **kw)
    return sd, any(str(w.message).startswith(PEFT_DIST_WARNING) for w in caught)


UNEVEN_KEEP = 2  # batches rank 1 keeps in the "uneven" run (rank 0 keeps all of its own)


def wrapped_runs(rank, batches):
    """name -> (model as the user passes it, this rank's loader), all gathered with tau=1.0."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel
    sharded = build_model()
    for layer in sharded.layers:
        fully_shard(layer)
    fully_shard(sharded)
    return {
        "ddp": (DistributedDataParallel(build_model()), batches),
        "fsdp2": (sharded, batches),
        "uneven": (build_model(), batches if rank == 0 else batches[:UNEVEN_KEEP]),  # rank 1 runs out first
    }


def bad_runs(rank, batches):
    """name -> (model kind, r, loader): runs that must raise on every rank, not hang."""
    return {
        "disagree": ("plain", R + 1 if rank == 1 else R, batches),  # rank 1 asks for another r
        "empty_rank": ("fresh", R, batches if rank == 0 else []),  # rank 1 has no data at all
    }


def param_checksum(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


# ------------------------------------------------------------------ worker ----------------------
def _worker(rank: int, port: int, out_dir: str, queue, world: int = WORLD) -> None:
    """One rank; reports ("ok", rank, info) or ("error", rank, traceback) on ``queue``. With
    ``world != WORLD`` only the gathered run ("gather") runs."""
    initialised = False
    try:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
        os.environ.pop("EVA_BACKEND", None)
        torch.set_num_threads(1)  # 2 ranks on 2 shared cores
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=PG_TIMEOUT_S))
        initialised = True
        model = build_model()
        batches = shard(rank, world)
        if world != WORLD:
            sd, _ = run_eva(model, batches, RUNS["gather"][1])
            sd.save(os.path.join(out_dir, f"gather{world}_rank{rank}.safetensors"))
            queue.put(("ok", rank, ""))
            return
        info = {"checksum": param_checksum(model)}
        # token counts past 2**24 (float32's exact-integer range), summed over ranks
        from eva.distributed import Traffic, reduced_vectors
        _, count, _ = reduced_vectors(torch.zeros(2), torch.tensor(BIG_COUNT), torch.zeros(2), Traffic())
        info["reduced_count"] = int(count)
        info["warned"] = {}
        for name, (gather, tau, options) in RUNS.items():
            sd, info["warned"][name] = run_eva(model, batches, tau, gather_distributed_inputs=gather, **options)
            sd.save(os.path.join(out_dir, f"{name}_rank{rank}.safetensors"))
        for name, (wrapped, loader) in wrapped_runs(rank, batches).items():
            sd, _ = run_eva(wrapped, loader, 1.0)
            sd.save(os.path.join(out_dir, f"{name}_rank{rank}.safetensors"))
        info["errors"] = {}
        for name, (kind, cfg_r, loader) in bad_runs(rank, batches).items():
            try:
                run_eva(model if kind == "plain" else build_model(), loader, 1.0, r=cfg_r)
                info["errors"][name] = None
            except eva.EvaError as exc:
                info["errors"][name] = str(exc)
        dist.barrier()
        with open(os.path.join(out_dir, f"info_rank{rank}.json"), "w") as f:
            json.dump(info, f)
        queue.put(("ok", rank, ""))
    except BaseException:  # noqa: BLE001 - everything must reach the test process
        tb = traceback.format_exc()
        try:
            with open(os.path.join(out_dir, f"error_rank{rank}.txt"), "w") as f:
                f.write(tb)
        finally:
            queue.put(("error", rank, tb))
        raise
    finally:
        if initialised:
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(out_dir: str, world: int = WORLD) -> None:
    import queue as queue_mod
    import time

    ctx = torch.multiprocessing.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, out_dir, q, world), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    reports, deadline = {}, time.monotonic() + JOIN_TIMEOUT_S
    try:
        while len(reports) < world and time.monotonic() < deadline:
            try:
                status, rank, tb = q.get(timeout=0.5)
                reports[rank] = (status, tb)
                if status == "error":
                    break  # the other rank may now wait forever in a collective
            except queue_mod.Empty:
                if all(p.exitcode is not None for p in procs):
                    break  # every worker is gone; whatever it reported was read
                if any(p.exitcode not in (None, 0) for p in procs):
                    # one died without a report (e.g. a crash): its peer would wait in a
                    # collective until the process-group timeout; stop now
                    try:
                        status, rank, tb = q.get(timeout=1.0)
                        reports[rank] = (status, tb)
                    except queue_mod.Empty:
                        pass
                    break
        failed = len(reports) < world or any(s == "error" for s, _ in reports.values())
        for p in procs:
            p.join(timeout=5.0 if failed else max(1.0, deadline - time.monotonic()))
    finally:
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
            p.join(5)
    errors = [f"rank {r}:\n{tb}" for r, (s, tb) in sorted(reports.items()) if s == "error"]
    for r in range(world):  # a worker that died before reporting may still have left a file
        path = os.path.join(out_dir, f"error_rank{r}.txt")
        if r not in reports and os.path.exists(path):
            errors.append(f"rank {r}:\n{open(path).read()}")
    if errors:
        pytest.fail("distributed worker failed:\n" + "\n".join(errors), pytrace=False)
    if hung:
        pytest.fail(f"distributed workers {[procs.index(p) for p in hung]} hung (> {JOIN_TIMEOUT_S:.0f} s) "
                    f"and were killed; reports: {reports}", pytrace=False)
    bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
    if bad or len(reports) < world:
        pytest.fail(f"distributed workers exited abnormally (rank, exit code): {bad}; reports: {reports}",
                    pytrace=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: intra-op threads only add OpenMP spin-waits on shared cores (as in the workers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eva_dist"))
    _spawn(out)
    res = {name: [eva.load_eva_state_dict(os.path.join(out, f"{name}_rank{r}.safetensors"))
                  for r in range(WORLD)] for name in list(RUNS) + ["ddp", "fsdp2", "uneven"]}
    res["info"] = [json.load(open(os.path.join(out, f"info_rank{r}.json"))) for r in range(WORLD)]
    return res


# ------------------------------------------------------------------ checks ----------------------
def kept_tokens(batches) -> int:
    return sum(int(b["attention_mask"].sum()) for b in batches)


def assert_same_pca(a, b, min_overlap=0.9999):
    assert list(a) == list(b)
    for name in a:
        la, lb = a.metadata["layers"][name], b.metadata["layers"][name]
        assert la["tokens"] == lb["tokens"], name
        assert a[name].shape == b[name].shape, (name, a[name].shape, b[name].shape)
        if a[name].shape[0]:
            ov = float(subspace_overlap(a[name].double(), b[name].double()))
            assert ov >= min_overlap, f"{name}: overlap {ov:.6f}"
        torch.testing.assert_close(torch.tensor(la["explained_variance_ratio"]),
                                   torch.tensor(lb["explained_variance_ratio"]), rtol=1e-3, atol=1e-6)


def test_workers_built_the_same_model(dist_results):
    ref = param_checksum(build_model())
    assert [i["checksum"] for i in dist_results["info"]] == [ref] * WORLD


@pytest.mark.parametrize("run", ["early", "partial", "gather"])
def test_ranks_agree(dist_results, run):
    """(a) every rank solves the same summed statistics: bit-identical results and decisions."""
    r0, r1 = dist_results[run]
    assert list(r0) == list(r1)
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
    assert r0.metadata["layers"] == r1.metadata["layers"]
    for key in ("steps", "stop_reason", "distributed"):
        assert r0.metadata["run"][key] == r1.metadata["run"][key], key
    assert r0.metadata["run"]["distributed"] is True


def test_early_stop_in_lockstep(dist_results):
    r0, _ = dist_results["early"]
    run = r0.metadata["run"]
    assert run["stop_reason"] == "converged" and run["steps"] < N_BATCHES // WORLD
    # tokens are global: both shards' batches up to the stopping step
    steps = run["steps"]
    global_tokens = kept_tokens(concatenated()[:steps])
    assert max(info["tokens"] for info in r0.metadata["layers"].values()) == global_tokens


def test_partial_convergence_equals_single_process(dist_results):
    """Groups that converged early stop consuming tokens on every rank at the same batch."""
    r0, _ = dist_results["partial"]
    steps = {info["steps"] for info in r0.metadata["layers"].values()}
    assert len(steps) > 1, "tau=0.3 should make some groups converge before the data ends"
    single, _ = run_eva(build_model(), concatenated(), RUNS["partial"][1])
    for name, info in r0.metadata["layers"].items():
        s_info = single.metadata["layers"][name]
        assert (info["steps"], info["tokens"], info["converged"]) == (
            s_info["steps"], s_info["tokens"], s_info["converged"]), name
        assert info["tokens"] == kept_tokens(concatenated()[:info["steps"]]), name
    assert_same_pca(r0, single)


def test_gathered_equals_single_process_on_concatenated_batches(dist_results):
    """(b) summed statistics == statistics of the concatenated batches."""
    r0, _ = dist_results["gather"]
    assert r0.metadata["run"]["stop_reason"] == "exhausted"
    assert r0.metadata["run"]["steps"] == N_BATCHES // WORLD
    total = sum(kept_tokens(shard(r)) for r in range(WORLD))
    assert all(info["tokens"] == total for info in r0.metadata["layers"].values())
    single, _ = run_eva(build_model(), concatenated(), 1.0)
    assert single.metadata["run"]["distributed"] is False
    assert single.metadata["run"]["steps"] == r0.metadata["run"]["steps"]
    assert_same_pca(r0, single)


def test_per_group_solves_equal_single_process_on_concatenated_batches(dist_results):
    r0, r1 = dist_results["per_group"]
    assert "topk_eigh_batched" not in r0.metadata["run"]["backends"]
    assert "topk_eigh_batched" in dist_results["gather"][0].metadata["run"]["backends"]
    single, _ = run_eva(build_model(), concatenated(), 1.0)
    assert_same_pca(r0, single)
    assert r0.ranks == single.ranks == r1.ranks
    # the same bytes per step, in more calls
    a, b = r0.metadata["run"]["communication"], dist_results["gather"][0].metadata["run"]["communication"]
    assert a["bytes_per_step"] == b["bytes_per_step"] and a["calls"] > b["calls"]


def test_layer_sequential_equals_single_process_on_concatenated_batches(dist_results):
    """A memory budget of one layer: windows in lockstep on both ranks, statistics summed."""
    r0, r1 = dist_results["sequential"]
    assert r0.metadata["run"]["mode"] == "layer_sequential" and len(r0.metadata["run"]["windows"]) == 2
    assert r0.metadata["run"]["peak_statistics_bytes"] <= ONE_LAYER
    single, _ = run_eva(build_model(), concatenated(), 1.0)
    assert single.metadata["run"]["steps"] == r0.metadata["run"]["steps"]
    assert_same_pca(r0, single)
    assert r0.ranks == single.ranks == r1.ranks


def test_local_runs_equal_single_process_on_own_shard(dist_results):
    """(c) gather_distributed_inputs=False: no collective, each rank = its shard alone."""
    model = build_model()
    for rank, sd in enumerate(dist_results["local"]):
        assert sd.metadata["run"]["distributed"] is False
        single, _ = run_eva(model, shard(rank), RUNS["local"][1])
        assert sd.metadata["run"]["steps"] == single.metadata["run"]["steps"]
        assert max(i["tokens"] for i in sd.metadata["layers"].values()) == kept_tokens(shard(rank))
        assert_same_pca(sd, single)
    # the shards differ, so the two ranks' local results must differ
    a, b = dist_results["local"]
    assert any(not torch.equal(a[n], b[n]) for n in a if a[n].numel() and a[n].shape == b[n].shape)


def test_reduced_token_count_is_exact_beyond_float32(dist_results):
    assert [i["reduced_count"] for i in dist_results["info"]] == [WORLD * BIG_COUNT] * WORLD


def test_peft_distributed_warning_only_when_gathering(dist_results):
    """PEFT warns when statistics are combined over ranks; we keep its words (matched in logs)."""
    for info in dist_results["info"]:
        assert info["warned"] == {name: gather for name, (gather, _, _) in RUNS.items()}


def test_only_products_with_the_statistics_travel(dist_results):
    """Per step each group all-reduces ``iters`` products (d x b fp32) and one vector (colsum,
    diagonal, count: 2d + 1 fp64); the first step adds the shift's sum and count ((d + 1) fp32);
    every step the loader flags (one fp32 per rank). Never a d x d statistic (the full-statistic
    figure is what that would have moved)."""
    iters, oversample = 2, 8  # the engine's defaults
    for sd in dist_results["gather"]:
        comm = sd.metadata["run"]["communication"]
        widths = [sd.metadata["layers"][g[0]]["in_features"] for g in sd.metadata["groups"]]
        k = max(info["max_components"] for info in sd.metadata["layers"].values())
        solves = sum(iters * d * min(d, k + oversample) * 4 + (2 * d + 1) * 8 for d in widths)
        shift = sum((d + 1) * 4 for d in widths)
        steps = comm["bytes_per_step"]
        assert len(steps) == N_BATCHES // WORLD
        flags = 4 * WORLD
        assert steps[0] == flags + shift + solves
        assert all(n == flags + solves for n in steps[1:]), steps
        assert comm["bytes_final_solves"] > 0
        assert comm["bytes_total"] == sum(steps) + comm["bytes_final_solves"] + flags  # + the flags that ended the run
        assert comm["full_statistics_bytes_per_step"] == sum(4 * d * d for d in widths)
        assert comm["collective_seconds"] > 0 and comm["calls"] > 0
    assert dist_results["local"][0].metadata["run"]["communication"] is None


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_wrapped_models_give_the_unwrapped_result(dist_results, wrapper):
    """DDP (unwrapped: the same layer names) and FSDP2 ``fully_shard`` (parameters sharded, all-
    gathered by FSDP in each layer's forward): the hooks see each rank's full layer inputs."""
    ref = dist_results["gather"][0]
    for sd in dist_results[wrapper]:
        assert list(sd) == list(ref)
        assert sd.ranks == ref.ranks
        assert_same_pca(sd, ref, min_overlap=0.99999)


def test_a_rank_that_runs_out_takes_idle_steps_in_lockstep(dist_results):
    """Rank 1 keeps 2 batches, rank 0 has 4: after rank 1's data runs out it contributes nothing
    and keeps solving in lockstep; the result is the single-process run whose batch i joins the
    ranks' batch i where both have one, and rank 0's alone afterwards. Every token is used once."""
    r0, r1 = dist_results["uneven"]
    shards = [shard(0), shard(1)[:UNEVEN_KEEP]]
    joined = [{k: torch.cat([s[i][k] for s in shards if i < len(s)]) for k in shards[0][i]}
              for i in range(len(shards[0]))]
    single, _ = run_eva(build_model(), joined, 1.0)
    assert r0.metadata["run"]["steps"] == r1.metadata["run"]["steps"] == len(shards[0])
    total = kept_tokens(shards[0]) + kept_tokens(shards[1])
    assert all(info["tokens"] == total for info in r0.metadata["layers"].values())
    assert_same_pca(r0, single)
    assert r0.ranks == r1.ranks == single.ranks


def test_ranks_that_disagree_raise_on_every_rank(dist_results):
    for info in dist_results["info"]:
        msg = info["errors"]["disagree"]
        assert msg is not None and "ranks disagree before EVA's first forward" in msg, msg
        assert "settings.r: 4 vs 3" in msg, msg


def test_a_rank_without_data_raises_on_every_rank(dist_results):
    for info in dist_results["info"]:
        msg = info["errors"]["empty_rank"]
        assert msg is not None and "rank(s) [1] have no batch at EVA's first step" in msg, msg


def test_no_process_group_warns_once_when_launched_as_one_of_several(monkeypatch):
    from eva import distributed as dist_utils
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist_utils, "_warned_no_group", False)
    with pytest.warns(UserWarning, match="WORLD_SIZE=2 but torch.distributed is not initialised"):
        assert dist_utils.active(True) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dist_utils.active(True) is False  # once
        monkeypatch.setenv("WORLD_SIZE", "1")
        assert dist_utils.active(True) is False


def test_three_ranks_with_uneven_shards_equal_one_process():
    """3 ranks over 8 batches (3, 3 and 2 each): rank 2 idles at the last step; the result is the
    single-process run whose batch i joins the ranks' batch i (where they have one)."""
    import tempfile
    with tempfile.TemporaryDirectory() as out:
        _spawn(out, world=3)
        results = [eva.load_eva_state_dict(os.path.join(out, f"gather3_rank{r}.safetensors")) for r in range(3)]
    shards = [shard(r, 3) for r in range(3)]
    joined = [{k: torch.cat([s[i][k] for s in shards if i < len(s)]) for k in shards[0][i]}
              for i in range(len(shards[0]))]
    single, _ = run_eva(build_model(), joined, RUNS["gather"][1])
    for sd in results:
        assert sd.metadata["run"]["steps"] == len(shards[0]) == single.metadata["run"]["steps"]
        assert sd.ranks == single.ranks
        assert_same_pca(sd, single, min_overlap=0.99999)
