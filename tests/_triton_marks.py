"""Marks shared by the Triton kernel tests: run on CUDA, or on CPU under TRITON_INTERPRET=1."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
TRITON_MARKS = [
    pytest.mark.interpreter,
    pytest.mark.skipif(not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
                       reason="Triton kernels need CUDA or TRITON_INTERPRET=1"),
]
