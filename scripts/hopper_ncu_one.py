"""Two launches of the Hopper kernel (B, H, N, d from argv, default 1 32 8192 128) for ncu:
ncu -k regex:sage_attention_hopper -s 1 -c 1 python scripts/hopper_ncu_one.py [B H N D]"""

import math
import sys

import torch

from quantattn.config import QuantConfig
from quantattn.hopper import launch as HL

b, h, n, d = (int(x) for x in sys.argv[1:5]) if len(sys.argv) >= 5 else (1, 32, 8192, 128)
q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
kv = HL.preprocess(k, v, QuantConfig())
out = torch.empty_like(q)
for _ in range(2):
    HL.attention(q, kv, False, 1 / math.sqrt(d), out)
torch.cuda.synchronize()
