"""Launches and host syncs of the solves, counted on CPU as a GPU would pay them
(:class:`eva_kernels.launches.LaunchCounter`), on random-weight GQA Llamas of 4 and 16 layers
with batched solves, CholeskyQR3 and the small eigenproblems on the host (the CUDA defaults):

* a streaming step (the solves of every group, then the one transfer of their results) issues at
  most 1.5x the ops at 16 layers as at 4, with at most 2 host syncs;
* a polish round issues at most 1.5x the ops at 16 layers as at 4, with at most 1 host sync per
  round (plus the one transfer of the results at the end).

``tau=1.0`` never converges on random weights, so every step solves every group and the polish
runs many rounds.
"""
from __future__ import annotations

import warnings

import pytest
from peft import LoraConfig
from peft.tuners.lora.config import EvaConfig

import eva
from eva.engine.solve import Solver
from eva_kernels.launches import LaunchCounter
from helpers import random_token_batches, tiny_llama_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS = 3


def _counted_run(monkeypatch, layers: int, rayleigh_ritz: str = "host") -> dict:
    """{"step": [(ops, syncs)] per streaming step, "polish": (ops, syncs), "rounds": int}."""
    record = {"solve": [], "sync": [], "polish": []}
    real_solve_all, real_polish, real_sync = Solver.solve_all, Solver.polish, Solver.sync

    def counted(kind, real):
        def run(*args, **kwargs):
            with LaunchCounter() as count:
                out = real(*args, **kwargs)
            record[kind].append((count.ops, count.syncs))
            return out
        return run
    monkeypatch.setattr(Solver, "solve_all", counted("solve", real_solve_all))
    monkeypatch.setattr(Solver, "polish", counted("polish", real_polish))
    monkeypatch.setattr(Solver, "sync", staticmethod(counted("sync", real_sync)))
    model = tiny_llama_model(layers=layers, hidden=40, intermediate=72)
    batches = random_token_batches(model.config.vocab_size, STEPS, batch=4, seq=15, seed=3)
    cfg = LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, tau=1.0))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "EVA stopped")
        sd = eva.get_eva_state_dict(model, batches, cfg, show_progress_bar=False, backend="torch", batch_solves=True,
                                    orthonormalization="cholesky_qr3", rayleigh_ritz=rayleigh_ritz)
    monkeypatch.undo()
    stages = len(record["polish"])  # the screened polish: the screen, then what the allocation may keep
    assert len(record["solve"]) == STEPS and stages in (1, 2) and len(record["sync"]) == STEPS + stages
    steps = [(a[0] + b[0], a[1] + b[1]) for a, b in zip(record["solve"], record["sync"])]
    polish = (sum(p[0] for p in record["polish"]), sum(p[1] for p in record["polish"]))
    return {"step": steps, "polish": polish, "rounds": sd.metadata["run"]["polish_rounds"],
            "final_syncs": record["sync"][STEPS:], "backends": sd.metadata["run"]["backends"]}


@pytest.fixture(scope="module")
def counts():
    mp = pytest.MonkeyPatch()
    try:
        return {layers: _counted_run(mp, layers) for layers in (4, 16)}
    finally:
        mp.undo()


def test_streaming_step_ops_barely_grow_with_layers_and_sync_twice(counts):
    small, large = counts[4]["step"][-1], counts[16]["step"][-1]
    assert large[0] <= 1.5 * small[0], (small, large)
    assert all(syncs <= 2 for _, syncs in counts[4]["step"] + counts[16]["step"])
    assert counts[16]["backends"]["small_eigh"] == "host"


def test_polish_round_ops_barely_grow_with_layers_and_sync_once(counts):
    per_round = {}
    for layers, c in counts.items():
        ops, syncs = c["polish"]
        assert c["rounds"] > 1  # random weights: the polish iterates
        assert syncs <= c["rounds"], (layers, syncs, c["rounds"])  # one transfer per round, every width at once
        assert all(sync[1] == 1 for sync in c["final_syncs"])  # after each stage, its results in one transfer
        per_round[layers] = ops / c["rounds"]
    assert per_round[16] <= 1.5 * per_round[4], per_round


def test_device_eigh_costs_a_sync_per_width(monkeypatch):
    """For the record: with ``rayleigh_ritz="device"`` each width's ``eigh`` is a sync on CUDA."""
    c = _counted_run(monkeypatch, 4, "device")
    assert all(syncs == 3 for _, syncs in c["step"])  # 2 widths' eigh + the results' transfer
