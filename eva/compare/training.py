"""Fine-tune a sequence classifier through LoRA from one initialisation, and measure it.

One run (:func:`finetune`): a fresh ``AutoModelForSequenceClassification`` from ``model_path``
(seeded), wrapped by PEFT with LoRA on ``targets`` (rank ``r``, ``alpha = r``) and the
classification head trained fully (``modules_to_save``). The initialisation is one of
:data:`METHODS`: PEFT's default (``lora``: Kaiming A, zero B), EVA (ours, ``rho=2``, calibrated on
rows of the training split; ``eva-whiten`` whitens), PiSSA or OLoRA (PEFT's). Then ``steps`` AdamW
steps on shuffled training batches (cross-entropy), the loss of every step recorded, and the
accuracy on the test rows. Wall times of loading the checkpoint, of the initialisation (PEFT's
wrapping, and for EVA the calibration run and loading the components) and of the training are
kept apart.
"""
from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from .data import Labelled

#: initialisation -> (PEFT ``init_lora_weights``, EVA whiten)
METHODS: Dict[str, tuple] = {
    "lora": (True, False),
    "eva": ("eva", False),
    "eva-whiten": ("eva", True),
    "pissa": ("pissa", False),
    "olora": ("olora", False),
}


@dataclass
class RunResult:
    method: str
    seed: int
    lr: float
    losses: List[float] = field(default_factory=list)
    accuracy: float = float("nan")
    load_seconds: float = 0.0  # from_pretrained: the same for every method
    init_seconds: float = 0.0  # the initialisation alone (finetune's docstring)
    train_seconds: float = 0.0


def batches_of(tok, data: Labelled, batch_size: int, max_length: int, order: List[int], with_labels: bool = True):
    """Tokenised batches (dicts of tensors) of ``data`` in ``order``."""
    out = []
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        enc = tok([data.texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        if with_labels:
            enc["labels"] = torch.tensor([data.labels[i] for i in idx])
        out.append(dict(enc))
    return out


def _base_model(model_path: str, num_labels: int, seed: int):
    """The checkpoint with a fresh head (seeded), loaded quietly: transformers' load report ("the
    classifier's weights are newly initialised", by design) and progress bar, once per run, would
    bury the comparison's own lines."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging
    torch.manual_seed(seed)
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _wrap(base, method: str, r: int, targets: List[str], eva_options: Optional[dict] = None):
    """PEFT's LoRA on ``targets`` with ``method``'s ``init_lora_weights`` (PiSSA / OLoRA compute
    their decompositions here; EVA's adapters are filled afterwards from the calibration run).
    ``eva_options`` override PEFT's ``EvaConfig`` fields (default ``rho=2``) for EVA methods."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import EvaConfig
    init, whiten = METHODS[method]
    eva_config = EvaConfig(**{"rho": 2.0, "whiten": whiten, **(eva_options or {})}) if init == "eva" else None
    cfg = LoraConfig(r=r, lora_alpha=r, target_modules=targets, init_lora_weights=init, task_type="SEQ_CLS",
                     eva_config=eva_config)
    return get_peft_model(base, cfg)


def finetune(model_path: str, tok, splits_train: Labelled, test: Labelled, calibration: Labelled, *,
             method: str, seed: int, lr: float, steps: int, r: int, targets: List[str], batch_size: int,
             max_length: int, num_labels: int, eva_options: Optional[dict] = None) -> RunResult:
    """One initialisation, one seed: init, ``steps`` AdamW steps, test accuracy (module docstring).

    ``init_seconds`` is the initialisation alone: PEFT's wrapping (with PiSSA's / OLoRA's
    decompositions) plus, for EVA, tokenising the calibration rows and the calibration run.
    Loading the checkpoint, which every method does alike, is ``load_seconds``."""
    import eva
    res = RunResult(method, seed, lr)
    t0 = time.perf_counter()
    base = _base_model(model_path, num_labels, seed)
    res.load_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # PEFT: "eva initialization used with low_cpu_mem_usage=False": the calibration is ours
        warnings.filterwarnings("ignore", message=".*low_cpu_mem_usage.*")
        # transformers 5 deprecates the property that PEFT's wrapper reads
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = _wrap(base, method, r, targets, eva_options)
    if METHODS[method][0] == "eva":
        calib = batches_of(tok, calibration, batch_size, max_length, list(range(len(calibration))), False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "EVA stopped before convergence": the calibration rows ran out
            eva.initialize_lora_eva_weights(model, calib, show_progress_bar=False)
    res.init_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    rng = random.Random(seed)
    order: List[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(splits_train)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[:batch_size], order[batch_size:]
        batch = batches_of(tok, splits_train, batch_size, max_length, idx)[0]
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        res.losses.append(float(loss.detach()))
    res.train_seconds = time.perf_counter() - t0
    res.accuracy = accuracy(model, tok, test, max_length)
    return res


@torch.no_grad()
def accuracy(model, tok, data: Labelled, max_length: int, batch_size: int = 64) -> float:
    model.eval()
    right = 0
    for batch in batches_of(tok, data, batch_size, max_length, list(range(len(data)))):
        labels = batch.pop("labels")
        right += int((model(**batch).logits.argmax(-1) == labels).sum())
    return right / max(len(data), 1)


def smoothed(values: List[float], window: int) -> List[float]:
    """Trailing moving average (the first points average what exists)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def mean_std(values: List[float]):
    n = len(values)
    m = sum(values) / n
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)
