"""What the benchmark measures: shapes, operation counts, and the order the cases run in.

Pure Python (no GPU, no Triton): the CPU tests cover it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from quantattn.metrics import attention_ops, tops

# The benchmark protocol: the grid every run measures.
HEAD_DIMS = (64, 128)
SEQ_LENS = (1024, 2048, 4096, 8192, 16384, 32768)
CAUSALS = (False, True)
BATCH = 4
HEADS = 32
# --quick: the long-sequence trend at a glance, in a couple of minutes of GPU time.
QUICK_HEAD_DIMS = (128,)
QUICK_SEQ_LENS = (1024, 4096, 16384)
QUICK_CAUSALS = (False,)

# The accuracy slice: [1, 8, 4096, d].
ACCURACY_BATCH = 1
ACCURACY_HEADS = 8
ACCURACY_SEQ_LEN = 4096
INPUT_KINDS = ("normal", "outliers")

# Rotation of input sets, so that a call does not find its inputs in L2 (50 MB on H100). The protocol
# rotates below N = 4K; a set smaller than ROTATION_BYTES rotates too (a small --batch or --heads), with
# enough sets to pass ROTATION_BYTES together.
ROTATE_BELOW_SEQ_LEN = 4096
ROTATION_BYTES = 256 << 20
MIN_SETS, MAX_SETS = 2, 8


@dataclass(frozen=True)
class Case:
    """One timed shape: q, k and v are [batch, heads, seq_len, head_dim] bf16 (HND), Nq = Nk."""

    head_dim: int
    causal: bool
    seq_len: int
    batch: int = BATCH
    heads: int = HEADS

    @property
    def ops(self) -> float:
        """4 B H N^2 d, halved when causal (the FlashAttention convention)."""
        return attention_ops(self.batch, self.heads, self.seq_len, self.seq_len, self.head_dim, self.causal)

    def tops(self, milliseconds: float) -> float:
        return tops(self.ops, milliseconds)

    @property
    def tensor_bytes(self) -> int:
        """Bytes of one bf16 input tensor."""
        return 2 * self.batch * self.heads * self.seq_len * self.head_dim

    @property
    def input_sets(self) -> int:
        """How many (q, k, v) sets the timing loop rotates through."""
        set_bytes = 3 * self.tensor_bytes
        if self.seq_len >= ROTATE_BELOW_SEQ_LEN and set_bytes >= ROTATION_BYTES:
            return 1
        return max(MIN_SETS, min(MAX_SETS, math.ceil(ROTATION_BYTES / max(set_bytes, 1))))


def enumerate_cases(
    head_dims, seq_lens, causals, batch: int = BATCH, heads: int = HEADS
) -> list[tuple[int, int, list[Case]]]:
    """Cases grouped by (head_dim, seq_len): one group shares its input tensors, whatever the masking.

    Returns [(head_dim, seq_len, [Case for each causal])], in the order the runner measures them.
    """
    return [(d, n, [Case(d, c, n, batch, heads) for c in causals]) for d in head_dims for n in seq_lens]


_SEQ_LEN = re.compile(r"^\s*(\d+)\s*([kK]?)\s*$")


def parse_seq_len(text: str) -> int:
    """'4K' or '4k' -> 4096, '4096' -> 4096."""
    m = _SEQ_LEN.match(str(text))
    if not m:
        raise ValueError(f"sequence length must be an integer or an integer followed by K (e.g. 4K), got {text!r}")
    value = int(m.group(1)) * (1024 if m.group(2) else 1)
    if value < 1:
        raise ValueError(f"sequence length must be positive, got {text!r}")
    return value


def format_seq_len(n: int) -> str:
    """4096 -> '4K'; lengths that are not a multiple of 1024 stay as they are."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def causal_label(causal: bool) -> str:
    return "on" if causal else "off"


def parse_causal(choice: str) -> tuple[bool, ...]:
    return {"off": (False,), "on": (True,), "both": (False, True)}[choice]
