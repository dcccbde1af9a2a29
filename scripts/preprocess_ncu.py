"""One preprocessing launch at 4K tokens for ncu, and the compiled kernel's registers and spills:
ncu --section SpeedOfLight ... python3 scripts/preprocess_ncu.py"""

import torch

from quantattn.config import QuantConfig
from quantattn.kernels import launch

k, v = (torch.randn(4, 32, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
seqs = launch.sequences(k, None, 0)
for _ in range(3):
    launch.preprocess_kv(k, v, QuantConfig(), seqs)
torch.cuda.synchronize()
for kernel, _ in launch.launch_preprocess_kv.compiled.values():
    print("preprocess_kv_kernel: registers", kernel.n_regs, "spills", kernel.n_spills, "shared", kernel.metadata.shared)
