"""The progress bar tells the truth: batches of data (not replays), windows, data tokens/s, ETA.

The bar's text is read from stderr (tqdm's refreshes separated by carriage returns) on a tiny
GQA Llama: a layer-sequential run of 4 windows over 5 batches, and an all-at-once run.
"""
from __future__ import annotations

import re
import warnings

import pytest
from peft import LoraConfig
from peft.tuners.lora.config import EvaConfig

import eva
from eva.engine.memory_budget import statistic_bytes
from eva.engine.progress import clock
from helpers import random_token_batches, tiny_llama_model

D, DFF = 40, 72
LLAMA_BLOCK = 3 * statistic_bytes(D, True) + statistic_bytes(DFF, True)
BATCHES, SEQ, ROWS = 5, 15, 3


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama_model(hidden=D, intermediate=DFF, layers=4)
    batches = random_token_batches(model.config.vocab_size, BATCHES, batch=ROWS, seq=SEQ, seed=3)
    cfg = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                     init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, tau=1.0))
    return model, batches, cfg


def _refreshes(err: str) -> list:
    """Every state the bar showed (tqdm redraws the line after a carriage return)."""
    return [s.strip() for s in re.split(r"[\r\n]", err) if s.strip().startswith("EVA")]


def _run_with_bar(llama, capsys, monkeypatch, **options):
    model, batches, cfg = llama
    import tqdm.auto

    class EveryStep(tqdm.auto.tqdm):  # draw every step: the run takes less than tqdm's 0.1 s between draws
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "mininterval": 0})
    monkeypatch.setattr(tqdm.auto, "tqdm", EveryStep)
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "EVA stopped")
        sd = eva.get_eva_state_dict(model, batches, cfg, show_progress_bar=True, **options)
    return sd, _refreshes(capsys.readouterr().err)


def test_layer_sequential_bar_counts_data_batches_per_window(llama, capsys, monkeypatch):
    sd, shown = _run_with_bar(llama, capsys, monkeypatch, memory_budget=LLAMA_BLOCK)
    run = sd.metadata["run"]
    assert run["mode"] == "layer_sequential" and len(run["windows"]) == 4
    windows = sorted({int(m.group(1)) for s in shown for m in [re.search(r"EVA window (\d+)/4", s)] if m})
    assert windows == [1, 2, 3, 4]  # every window named, out of the real count
    batches = [(int(a), int(b)) for s in shown for a, b in re.findall(r"batch (\d+)/(\d+)", s)]
    assert batches and all(total == BATCHES and 1 <= n <= BATCHES for n, total in batches)  # never replays
    assert any("window ETA <= " in s for s in shown) and any("run ETA ~ " in s for s in shown)
    for s in shown:  # the bar and the counter agree (a new window does not show the last one's count)
        m = re.search(r"batch (\d)/5.* +(\d+)%", s)
        assert m is None or int(m.group(2)) == 20 * int(m.group(1)), s
    # data tokens/s: the 5 batches' tokens once, so the rate does not collapse as windows replay them
    rates = [int(r.replace(",", "")) for s in shown for r in re.findall(r"([\d,]+) data tok/s", s)]
    assert rates and all(r > 0 for r in rates)
    assert sd.metadata["run"]["batches_read"] == BATCHES


def test_all_at_once_bar_has_total_converged_layers_and_eta(llama, capsys, monkeypatch):
    sd, shown = _run_with_bar(llama, capsys, monkeypatch)
    assert sd.metadata["run"]["mode"] == "all_at_once"
    assert not any("window" in s for s in shown)
    drawn = [s for s in shown if re.search(r"^EVA, batch [1-5]/5, \d+/28 layers converged, [\d,]+ data tok/s", s)]
    assert [int(re.search(r"batch (\d)/5", s).group(1)) for s in drawn] == [1, 2, 3, 4, 5], shown
    assert all("ETA <= 0:0" in s for s in drawn[1:])  # from the second step on


def test_data_tokens_are_the_masks_tokens(llama):
    model, batches, cfg = llama
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "EVA stopped")
        state_tokens = []

        class Spy(eva.EvaObserver):
            def on_finish(self, state):
                state_tokens.append(state.data_tokens)
        eva.get_eva_state_dict(model, batches, cfg, show_progress_bar=False, observers=[Spy()])
    assert state_tokens == [sum(int(b["attention_mask"].sum()) for b in batches)]


@pytest.mark.parametrize("seconds,text", [(0, "0:00"), (59.6, "1:00"), (250, "4:10"), (3723, "1:02:03")])
def test_clock(seconds, text):
    assert clock(seconds) == text


class _Clock:
    """A fake ``time.perf_counter``: ``advance(s)`` moves it."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def test_rate_and_eta_per_window_on_a_fake_clock(monkeypatch, capsys):
    """3 windows of 4 batches of 100 tokens at 2 s a batch: every window shows 50 data tok/s (the
    old bar divided by the run's time, so the rate fell window after window), the window ETA counts
    the batches left at 2 s, and the run ETA adds 8 s per window left."""
    from types import SimpleNamespace

    import eva.engine.progress as progress
    clock_ = _Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock_)
    groups = [SimpleNamespace(members=["a", "b"], converged=False, ever_converged=False,
                              estimate=SimpleNamespace(tokens=0))]
    state = SimpleNamespace(groups=groups, data_tokens=None, batch_tokens=[100] * 4)
    bar = progress.ProgressBar(4)
    texts = []
    for w in range(3):
        bar.start_window(w, 3, groups)
        for _ in range(4):
            clock_.advance(2.0)
            bar.on_step(0, state)
            texts.append(bar.bar.postfix)
    bar.close()
    assert all("50 data tok/s" in t for t in texts), texts
    assert texts[1].endswith("window ETA <= 0:04")   # 2 batches left x 2 s, no window done yet
    assert texts[5].endswith("window ETA <= 0:04, run ETA ~ 0:12")  # + 8 s for the third window
    assert texts[9].endswith("window ETA <= 0:04, run ETA ~ 0:04")


def test_all_at_once_rate_uses_data_tokens_and_the_recent_steps(monkeypatch):
    """The ETA comes from the last steps (a slow first step, the warm-up, is left out)."""
    from types import SimpleNamespace

    import eva.engine.progress as progress
    clock_ = _Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock_)
    state = SimpleNamespace(groups=[], data_tokens=0, batch_tokens=[])
    bar = progress.ProgressBar(10)
    texts = []
    for step, seconds in enumerate([30.0, 1.0, 1.0, 1.0]):
        clock_.advance(seconds)
        state.data_tokens += 60
        bar.on_step(step + 1, state)
        texts.append(bar.bar.postfix)
    bar.close()
    assert texts[0] == "batch 1/10, 0/0 layers converged, 2 data tok/s"
    assert texts[-1] == "batch 4/10, 0/0 layers converged, 7 data tok/s, ETA <= 0:06"  # 6 left x 1 s
