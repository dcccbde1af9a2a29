"""One kernel-only launch of the default variant, for ncu: ncu -k regex:sage_attention python3 scripts/profile_one.py"""

import sys

import torch

from quantattn.config import QuantConfig
from quantattn.kernels import launch

n = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
b, h, d = 1, 32, 128
q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
cfg = QuantConfig()
kv = launch.preprocess_kv(k, v, cfg, launch.sequences(k, None, 0))
out = torch.empty_like(q)
for _ in range(2):
    launch.attention(q, kv, False, d**-0.5, out, None, launch.sequences(q, None, 0))
torch.cuda.synchronize()
