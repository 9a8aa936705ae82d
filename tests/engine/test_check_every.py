"""``check_every``: solves, reallocations and convergence tests every k-th batch only; the
statistics still take every batch, so the components stay the exact PCA of the tokens consumed."""
from __future__ import annotations

import pytest
from peft import LoraConfig
from peft.tuners.lora.config import EvaConfig

import eva
from eva.testing import TokenRecorder, check_against_exact
from helpers import random_token_batches

pytestmark = pytest.mark.filterwarnings("ignore:EVA stopped")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _run(model, n_batches, check_every, tau=1.0):
    seen = TokenRecorder()
    cfg = LoraConfig(r=3, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, tau=tau))
    sd = eva.get_eva_state_dict(model, random_token_batches(model.config.vocab_size, n_batches, batch=3, seq=13),
                                cfg, show_progress_bar=False, observers=[seen], check_every=check_every)
    return sd, seen


@pytest.mark.parametrize("check_every,solves", [(1, 7), (3, 2), (10, 0)])
def test_every_batch_is_consumed_and_solved_every_k(tiny_llama, check_every, solves):
    sd, seen = _run(tiny_llama, 7, check_every)  # tau = 1: nothing converges, every batch is used
    assert sd.metadata["settings"]["check_every"] == check_every
    for info in sd.metadata["layers"].values():
        assert (info["steps"], info["solves"], info["converged"]) == (7, solves, False)
    check_against_exact(sd, seen)


def test_convergence_is_decided_at_checks_only(tiny_llama):
    sd, seen = _run(tiny_llama, 8, 2, tau=0.0)  # tau = 0: converged at the first check with two estimates
    run = sd.metadata["run"]
    assert run["stop_reason"] == "converged" and run["steps"] == 4
    assert all(info["solves"] == 2 and info["converged"] for info in sd.metadata["layers"].values())
    check_against_exact(sd, seen)


def test_check_every_must_be_positive(tiny_llama):
    cfg = LoraConfig(r=3, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig())
    with pytest.raises(eva.EvaError, match="check_every"):
        eva.get_eva_state_dict(tiny_llama, random_token_batches(97, 2), cfg, check_every=0)


# ------------------------------------------------------------------------ check_every="auto" ---
class _FakeClock:
    """The engine's ``time.perf_counter``: the test moves ``now`` in the forward and the solves."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_auto_spaces_the_solves_to_a_tenth_of_the_run(tiny_llama, monkeypatch):
    """A check that costs as much as 2 batches: solves every ceil(9 * 2 / 1) = 18 batches; the
    statistics still take every batch (exact PCA), and the gaps are in the metadata."""
    import eva.engine.loop as loop
    from eva.engine.solve import Solver
    clock = _FakeClock()
    monkeypatch.setattr(loop.time, "perf_counter", clock)
    real_forward, real_solve_all = loop.Engine._forward, Solver.solve_all

    def forward(self, batch):
        clock.now += 1.0
        return real_forward(self, batch)

    def solve_all(self, groups, step):
        clock.now += 2.0
        return real_solve_all(self, groups, step)
    monkeypatch.setattr(loop.Engine, "_forward", forward)
    monkeypatch.setattr(Solver, "solve_all", solve_all)
    sd, seen = _run(tiny_llama, 40, "auto")
    cadence = sd.metadata["run"]["cadence"]
    assert cadence["check_every"] == "auto"
    assert cadence["chosen"][0] == 18 and set(cadence["chosen"]) == {18}  # 9 * 2 s / 1 s
    for info in sd.metadata["layers"].values():
        assert info["steps"] == 40 and info["solves"] == 3  # after batches 1, 19 and 37
    check_against_exact(sd, seen)


def test_auto_solves_every_batch_when_solves_are_cheap(tiny_llama, monkeypatch):
    import eva.engine.loop as loop
    clock = _FakeClock()
    monkeypatch.setattr(loop.time, "perf_counter", clock)
    real_forward = loop.Engine._forward

    def forward(self, batch):
        clock.now += 1.0
        return real_forward(self, batch)
    monkeypatch.setattr(loop.Engine, "_forward", forward)
    sd, _ = _run(tiny_llama, 5, "auto")
    assert sd.metadata["run"]["cadence"]["chosen"] == [1, 1, 1, 1, 1]


def test_auto_caps_the_gap(tiny_llama):
    from eva.engine.cadence import MAX_CADENCE, SolveCadence
    cadence = SolveCadence("auto")
    cadence.checked(1, check_seconds=100.0, batch_seconds=0.01)
    assert cadence.k == MAX_CADENCE and cadence.next == 1 + MAX_CADENCE and not cadence.due(MAX_CADENCE)
    assert cadence.due(1 + MAX_CADENCE)


@pytest.mark.parametrize("bad", ["sometimes", 0, 1.5])
def test_check_every_is_checked(tiny_llama, bad):
    with pytest.raises(eva.EvaError, match=r"check_every must be an int >= 1 .* or 'auto'"):
        _run(tiny_llama, 1, bad)
