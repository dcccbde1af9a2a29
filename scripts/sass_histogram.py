"""Opcode histogram of the attention kernel's SASS (default variant, hd128), to see where the issue slots go.

Run on the GPU machine: python3 scripts/sass_histogram.py [OUT_DIR]
"""

import collections
import os
import re
import subprocess
import sys
import tempfile

import torch

from quantattn.config import QuantConfig
from quantattn.kernels import launch

out_dir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
b, h, n, d = 1, 4, 1024, 128
q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
for name, cfg in (("sage2", QuantConfig()), ("sage1", QuantConfig(pv_dtype="fp16", pv_accum="fp32"))):
    kv = launch.preprocess_kv(k, v, cfg, launch.sequences(k, None, 0))
    ck = launch.attention(q, kv, False, d**-0.5, torch.empty_like(q), None, launch.sequences(q, None, 0))
    path = os.path.join(out_dir, f"{name}.cubin")
    with open(path, "wb") as f:
        f.write(ck.asm["cubin"])
    sass = subprocess.run(["cuobjdump", "-sass", path], capture_output=True, text=True).stdout
    with open(os.path.join(out_dir, f"{name}.sass"), "w") as f:
        f.write(sass)
    ops = collections.Counter(
        m.group(1).split(".")[0] for m in re.finditer(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass)
    )
    print(name, "total", sum(ops.values()), " ".join(f"{op}:{c}" for op, c in ops.most_common(40)))
