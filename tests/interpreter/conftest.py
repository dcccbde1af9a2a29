"""Kernels through the Triton interpreter: on a machine without a GPU, TRITON_INTERPRET=1 must be set
before the first @triton.jit decorator runs, so it is set here, at collection."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
