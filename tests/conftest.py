"""Shared fixtures: the bundled MiniLM, small random-weight GPT-2 / Llama models, batches,
and a spy that records exactly the tokens each running statistic consumed."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from eva.statistics import RunningStats
from eva.text_data import TextBatches, bundled_calibration_path, bundled_model_path, read_lines


@pytest.fixture(autouse=True)
def _single_thread(request):
    """Tiny models run fastest on one thread on the 2 shared cores (intra-op threads only add
    spin-waits). Tests marked ``cpp`` keep the default so the kernel's threading is exercised."""
    if request.node.get_closest_marker("cpp") is not None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def minilm():
    from transformers import AutoModel, AutoTokenizer
    path = bundled_model_path()
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def calibration_lines():
    return read_lines(bundled_calibration_path())


@pytest.fixture
def minilm_loader(minilm, calibration_lines):
    def make(n_batches=6, batch_size=6, max_length=32, start=0):
        _, tok = minilm
        lines = calibration_lines[start:start + n_batches * batch_size]
        return TextBatches(tok, lines, batch_size=batch_size, max_length=max_length)
    return make


def random_token_batches(vocab: int, n_batches: int, batch: int = 3, seq: int = 17, seed: int = 0,
                         pad_last: int = 4):
    """Batches of random ids with right padding in the last sequence of each batch."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if pad_last:
            mask[-1, -pad_last:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.fixture(scope="session")
def tiny_gpt2():
    from transformers import GPT2Config, GPT2Model
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=64, vocab_size=101)
    return GPT2Model(cfg).eval()


@pytest.fixture(scope="session")
def tiny_llama():
    from transformers import LlamaConfig, LlamaModel
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    return LlamaModel(cfg).eval()


@pytest.fixture
def token_spy(monkeypatch):
    """Records, per group leader name, the float64 rows it accumulated (after masking)."""
    seen = {}
    original = RunningStats.update

    def spy(self, x, mask):
        rows = x.detach().to(torch.float64)
        if mask is not None:
            rows = rows[mask]
        seen.setdefault(self.name, []).append(rows.cpu())
        return original(self, x, mask)

    monkeypatch.setattr(RunningStats, "update", spy)
    return seen


def starve_layer_at_first(monkeypatch, victim: str, allocations: int = 2) -> None:
    """Make the engine's first ``allocations`` rank allocations give ``victim`` rank 0.

    With rank 0 the victim's group counts as converged and its hook is detached; afterwards the
    real allocation gives it ranks again, so the group is reopened (re-hooked).
    """
    import eva.engine as engine_module
    real = engine_module.redistribute_ranks
    calls = {"n": 0}

    def allocation(layers, max_components, ratios, budget):
        calls["n"] += 1
        ranks = real(layers, max_components, ratios, budget)
        if calls["n"] <= allocations:
            ranks[victim] = 0
        return ranks

    monkeypatch.setattr(engine_module, "redistribute_ranks", allocation)


# --- hypothesis profiles (property-based tests: tests/test_fuzz_kernels.py) -------------------
# "ci" (default): bounded and derandomized so `make test` is fast and reproducible; each test
# runs a fraction of max_examples (triton ones the smallest). "long": `pytest
# --hypothesis-profile=long` for deeper, randomized runs (failures are saved in .hypothesis/).
from hypothesis import settings as _hyp_settings  # noqa: E402

_hyp_settings.register_profile("ci", max_examples=250, deadline=None, derandomize=True, print_blob=True)
_hyp_settings.register_profile("long", max_examples=1500, deadline=None, derandomize=False, print_blob=True)
if _hyp_settings.get_current_profile_name() == "default":  # not chosen with --hypothesis-profile
    _hyp_settings.load_profile("ci")
