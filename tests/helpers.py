"""Helpers shared by the test modules (importable as ``helpers``: tests/ is on sys.path).

* random token batches and tiny random-weight transformer models;
* ``starve_layer_at_first``: make the first rank allocations give a layer rank 0;
* ``DEVICE`` / ``TRITON_MARKS``: where kernel tests run, and the marks of Triton tests;
* ``backend_fixture``: a ``backend`` fixture over the backends that implement an op.
"""
from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
#: Device of the kernel tests: CUDA when present, else CPU (Triton then needs the interpreter).
DEVICE = "cuda" if HAS_CUDA else "cpu"
def _triton_version() -> tuple:
    try:
        import triton
    except ImportError:
        return (0, 0)
    return tuple(int(p) for p in triton.__version__.split(".")[:2])


#: The oldest Triton the kernels support (eva_kernels.backends.triton.config.MIN_TRITON).
MIN_TRITON = (3, 6)
TRITON_MARKS = [
    pytest.mark.interpreter,
    pytest.mark.skipif(not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
                       reason="Triton kernels need CUDA or TRITON_INTERPRET=1"),
    pytest.mark.skipif(_triton_version() < MIN_TRITON, reason="Triton older than 3.6: the backend refuses to run"),
]


def _upper_bmm_runnable() -> bool:
    if HAS_CUDA or os.environ.get("TRITON_INTERPRET") != "1":
        return True
    import numpy
    return _triton_version() >= (3, 9) or int(numpy.__version__.split(".")[0]) < 2


#: Marks of tests of ``upper_bmm`` (loop bounds computed from ``tl.program_id``): Triton 3.6's
#: interpreter under NumPy 2 cannot take those as ``range`` bounds (its scalars are size-1 NumPy
#: arrays); compiled for a GPU, 3.6 builds it (``make test-torch-matrix``).
UPPER_BMM_MARKS = TRITON_MARKS + [
    pytest.mark.skipif(not _upper_bmm_runnable(),
                       reason="Triton < 3.9's interpreter under NumPy 2 cannot run range() bounds from tl.program_id"),
]


def backend_fixture(op: str, names):
    """A pytest fixture yielding each backend name of ``names`` that can run ``op`` on DEVICE
    (skipped with the reason otherwise); ``cpp`` gets the ``cpp`` mark, ``triton`` TRITON_MARKS."""
    marks = {"cpp": [pytest.mark.cpp], "triton": TRITON_MARKS}
    params = [pytest.param(n, marks=marks.get(n, [])) for n in names]

    @pytest.fixture(params=params)
    def backend(request):
        from eva_kernels import BackendUnavailableError, resolve_backend
        try:
            resolve_backend(op, DEVICE, request.param)
        except BackendUnavailableError as exc:
            pytest.skip(str(exc))
        return request.param
    return backend


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


def tiny_llama_model(hidden: int = 40, intermediate: int = 72, layers: int = 2, vocab: int = 97,
                     positions: int = 64, seed: int = 0):
    """A random-weight ``LlamaModel`` with grouped-query attention (4 heads, 2 KV heads), eval mode."""
    from transformers import LlamaConfig, LlamaModel
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      max_position_embeddings=positions)
    return LlamaModel(cfg).eval()


def starve_layer_at_first(monkeypatch, victim: str, allocations: int = 2) -> None:
    """Make the engine's first ``allocations`` rank allocations give ``victim`` rank 0.

    With rank 0 the victim's group counts as converged and its hook is detached; afterwards the
    real allocation gives it ranks again, so the group is reopened (re-hooked).
    """
    from eva.engine import allocation
    real = allocation.redistribute_ranks
    calls = {"n": 0}

    def starving(layers, max_components, ratios, budget):
        calls["n"] += 1
        ranks = real(layers, max_components, ratios, budget)
        if calls["n"] <= allocations:
            ranks[victim] = 0
        return ranks

    monkeypatch.setattr(allocation, "redistribute_ranks", starving)


def record_layer_calls(model, batches, names, forward_fn=None):
    """Every call's input of each layer in ``names``, per batch, from plain forwards (no EVA):
    ``{name: [[input of call 0, input of call 1, ...] for each batch]}`` (float64 copies)."""
    modules = dict(model.named_modules())
    calls = {n: [] for n in names}
    current = {}

    def make(name):
        def hook(module, args):
            current[name].append(args[0].detach().to(torch.float64).clone())
        return hook

    handles = [modules[n].register_forward_pre_hook(make(n)) for n in names]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # as EVA runs it (no dropout)
    try:
        with torch.no_grad():
            for batch in batches:
                for n in names:
                    current[n] = []
                (forward_fn or (lambda m, b: m(**b)))(model, batch)
                for n in names:
                    calls[n].append(current[n])
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return calls


def assert_layers_exact(sd, truth, min_overlap=0.999, centered=True):
    """Every layer's token count equals its reference rows' and its components span their exact
    float64 PCA. ``truth``: ``{name: (n, d) float64 rows the layer should have consumed}``.
    Returns the worst overlap."""
    from eva_kernels import subspace_overlap
    from eva_kernels.testing import exact_pca
    worst = 1.0
    for name, rows in truth.items():
        info = sd.metadata["layers"][name]
        assert info["tokens"] == rows.shape[0], (name, info["tokens"], rows.shape[0])
        rank = sd[name].shape[0]
        if rank == 0:
            continue
        _, exact, _ = exact_pca([rows], rank, centered)
        ov = float(subspace_overlap(sd[name].double().cpu(), exact))
        worst = min(worst, ov)
        assert ov >= min_overlap, f"{name}: overlap {ov:.6f} with the exact PCA of the right tokens"
    return worst
