"""Imported first by the test modules that run the Triton kernels. On CPU the kernels run in
the Triton interpreter, which has to be on before kernels.* is imported (the kernels are
defined at import time); on CUDA they are compiled and run natively."""
from __future__ import annotations

import os

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")


def needs_kernels() -> pytest.MarkDecorator:
    """pytestmark for such a module: skip if something imported the kernels before the
    interpreter was switched on."""
    from kernels.paged_attention import is_interpreted

    return pytest.mark.skipif(not ON_CUDA and not is_interpreted(),
                              reason="kernels.* was imported before TRITON_INTERPRET=1 was set")
