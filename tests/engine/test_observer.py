"""Engine events: what observers receive, in which order, and bad observers."""
from __future__ import annotations

import pytest
from peft import LoraConfig
from peft.tuners.lora.config import EvaConfig

import eva
from eva.testing import TokenRecorder
from helpers import random_token_batches


class EventLog(eva.EvaObserver):
    def __init__(self):
        self.events = []

    def on_rows(self, group, rows, mask):
        self.events.append(("rows", group.leader, rows.shape[0] if mask is None else int(mask.sum())))

    def on_step(self, step, state):
        self.events.append(("step", step, state.step))

    def on_group_converged(self, step, group):
        self.events.append(("converged", step, group.leader))

    def on_finish(self, state):
        self.events.append(("finish", state.stop_reason, len(state.groups)))


def test_events_follow_the_run(tiny_llama):
    batches = random_token_batches(tiny_llama.config.vocab_size, 6, batch=3, seq=11)
    cfg = LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights="eva",
                     eva_config=EvaConfig(rho=2.0, tau=0.5))
    log, seen = EventLog(), TokenRecorder()
    sd = eva.get_eva_state_dict(tiny_llama, batches, cfg, show_progress_bar=False, observers=[log, seen])
    steps = [e for e in log.events if e[0] == "step"]
    run = sd.metadata["run"]
    assert [e[1] for e in steps] == list(range(1, run["steps"] + 1)) and all(e[1] == e[2] for e in steps)
    assert log.events[-1] == ("finish", run["stop_reason"], len(sd.metadata["groups"]))
    converged = {e[2] for e in log.events if e[0] == "converged"}
    assert converged == {g[0] for g in sd.metadata["groups"] if sd.metadata["layers"][g[0]]["converged"]}
    for leader, rows in seen.items():  # the observer saw exactly the tokens each statistic counted
        assert sum(r.shape[0] for r in rows) == sd.metadata["layers"][leader]["tokens"]
        assert sum(e[2] for e in log.events if e[0] == "rows" and e[1] == leader) == sd.metadata["layers"][leader]["tokens"]


def test_observers_must_be_eva_observers(tiny_llama):
    cfg = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="eva", eva_config=EvaConfig())
    with pytest.raises(TypeError, match="EvaObserver"):
        eva.get_eva_state_dict(tiny_llama, random_token_batches(97, 2), cfg, observers=[print])
