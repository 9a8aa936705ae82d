"""Shared fixtures: the bundled MiniLM, small random-weight GPT-2 / Llama models, batches,
and ``token_spy``, an observer recording exactly the tokens each running statistic consumed
(pass it as ``observers=[token_spy]``). Plain helpers live in tests/helpers.py."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from eva.cli.text_data import TextBatches, bundled_calibration_path, bundled_model_path, read_lines
from eva.testing import TokenRecorder
from helpers import tiny_llama_model


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


@pytest.fixture(scope="session")
def tiny_gpt2():
    from transformers import GPT2Config, GPT2Model
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=64, vocab_size=101)
    return GPT2Model(cfg).eval()


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_llama_model()


@pytest.fixture
def token_spy():
    """Records, per group leader name, the float64 rows it accumulated (after masking)."""
    return TokenRecorder()


# --- hypothesis profiles (property-based tests: tests/ops/test_fuzz_ops.py) -------------------
# "ci" (default): bounded and derandomized so `make test` is fast and reproducible; each test
# runs a fraction of max_examples (triton ones the smallest). "long": `pytest
# --hypothesis-profile=long` for deeper, randomized runs (failures are saved in .hypothesis/).
from hypothesis import settings as _hyp_settings  # noqa: E402

_hyp_settings.register_profile("ci", max_examples=250, deadline=None, derandomize=True, print_blob=True)
_hyp_settings.register_profile("long", max_examples=1500, deadline=None, derandomize=False, print_blob=True)
if _hyp_settings.get_current_profile_name() == "default":  # not chosen with --hypothesis-profile
    _hyp_settings.load_profile("ci")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="run the tests marked slow (real models, minutes; make test-slow)")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` are skipped unless ``--run-slow`` is given (``make test-slow``)."""
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="marked slow (a real model, minutes): run with make test-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
