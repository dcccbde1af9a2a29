"""Device helpers shared by the preprocessing and attention kernels (pure @triton.jit code).

Every helper computes bit for bit what quantattn/reference/quant.py computes in PyTorch.
"""

import triton
import triton.language as tl

# Granularity codes, in the order of config.QK_GRANULARITIES.
PER_TENSOR = tl.constexpr(0)
PER_BLOCK = tl.constexpr(1)
PER_WARP = tl.constexpr(2)
PER_THREAD = tl.constexpr(3)
PER_TOKEN = tl.constexpr(4)

AMAX_FLOOR = tl.constexpr(1e-30)
# Adding 1.5 * 2**23 leaves no fraction bits in a float32 below 2**22: the sum is x rounded to an
# integer, half to even, in any IEEE float32 unit (the interpreter's numpy included).
ROUND_MAGIC = tl.constexpr(12582912.0)
# Same trick at the spacing of E4M3's subnormals (2**-9): 1.5 * 2**14.
FP8_SUBNORMAL_MAGIC = tl.constexpr(24576.0)
FP8_MIN_NORMAL = tl.constexpr(0.015625)
FP8_MAX = tl.constexpr(448.0)
FP16_MAX = tl.constexpr(65504.0)
BF16_MAX = tl.constexpr(3.3895313892515355e38)


@triton.jit
def is_finite(x):
    return (x == x) & (tl.abs(x) < float("inf"))


@triton.jit
def softmax_divisor(l):
    """The online softmax's row sum as the output's divisor: 1 for a row that saw no key (l == 0; its
    output is then zeroed), and NaN kept. A non-finite score makes P and l NaN; the running max does not
    carry it (tl.maximum ignores NaN on the GPU, and in the interpreter from triton 3.7 on), and the
    interpreter has no FP8 NaN (it reads E4M3's 0x7F as 480), so only l is sure to bring it to the row."""
    return tl.where(l == 0, 1.0, l)


@triton.jit
def round_half_even(x):
    return (x + ROUND_MAGIC) - ROUND_MAGIC


@triton.jit
def round_to_e4m3_grid(x):
    """Nearest E4M3 value of a float32 with |x| <= 448, ties to even, still as float32.

    Casting the result to tl.float8e4nv is then exact everywhere. The Triton interpreter's own
    float32 -> float8e4nv cast rounds wrongly where rounding carries into the exponent (1.9507 -> 1.0),
    so the kernels round with this helper when EXACT_CASTS is set; on the GPU the hardware cast
    (cvt.rn.satfinite) gives the same values, which the gpu tests check (tests/test_kernels_gpu.py).
    """
    a = tl.abs(x)
    bits = a.to(tl.int32, bitcast=True)
    # keep 3 of float32's 23 mantissa bits: add just under half an E4M3 ulp, plus the kept lsb for ties
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)
    subnormal = (a + FP8_SUBNORMAL_MAGIC) - FP8_SUBNORMAL_MAGIC
    r = tl.where(a < FP8_MIN_NORMAL, subnormal, normal)
    # copy the sign bit, so that tiny negatives round to -0 as the hardware cast does
    sign = x.to(tl.int32, bitcast=True) & -2147483648
    r = (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return tl.where(x == x, r, x)


@triton.jit
def round_to_bf16_grid(x):
    """Nearest bfloat16 value of a float32, ties to even, still as float32 (NaN and Inf kept)."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)


@triton.jit
def cast(x, DTYPE: tl.constexpr, EXACT_CASTS: tl.constexpr):
    """x.to(DTYPE) rounding to nearest even; the interpreter truncates float32 -> bfloat16 unless helped."""
    if EXACT_CASTS:
        if DTYPE == tl.bfloat16:
            x = round_to_bf16_grid(x.to(tl.float32))
    return x.to(DTYPE)


@triton.jit
def saturate(x, DTYPE: tl.constexpr):
    """Finite values clamped to DTYPE's largest finite value (NaN and +-Inf kept), so that the cast to
    the output dtype cannot overflow (reference: saturating_cast)."""
    if DTYPE == tl.float16:
        big = FP16_MAX
    else:
        tl.static_assert(DTYPE == tl.bfloat16)
        big = BF16_MAX
    return tl.where(is_finite(x), tl.minimum(tl.maximum(x, -big), big), x)


@triton.jit
def to_fp8_e4m3(x, EXACT_CASTS: tl.constexpr):
    """float32 -> float8e4nv, round to nearest even, saturating at +-448, NaN and Inf -> NaN."""
    nan_if_inf = tl.where(tl.abs(x) == float("inf"), float("nan"), x)
    c = tl.minimum(tl.maximum(nan_if_inf, -FP8_MAX), FP8_MAX)
    c = tl.where(nan_if_inf == nan_if_inf, c, nan_if_inf)
    if EXACT_CASTS:
        # the interpreter also casts NaN to 384: build E4M3's NaN (0x7F) from its bits
        nan8 = tl.full(c.shape, 0x7F, tl.int8).to(tl.float8e4nv, bitcast=True)
        return tl.where(c == c, round_to_e4m3_grid(c).to(tl.float8e4nv), nan8)
    return c.to(tl.float8e4nv)


@triton.jit
def _broadcast_groups(g, GROUPS: tl.constexpr, ROWS: tl.constexpr):
    """[GROUPS] -> [GROUPS * ROWS]: each group's value repeated over its consecutive rows."""
    return tl.reshape(tl.broadcast_to(g[:, None], (GROUPS, ROWS)), (GROUPS * ROWS,))


@triton.jit
def q_row_amax(a, BM: tl.constexpr, D: tl.constexpr, GRAN: tl.constexpr):
    """Per-row max of |q| over the row's scale group, for a tile a = |q| of BM rows (BM % 64 == 0)."""
    if GRAN == PER_TOKEN:
        return tl.max(a, 1)
    elif GRAN == PER_BLOCK:
        g = tl.max(tl.max(tl.reshape(a, (BM // 64, 64, D)), 2), 1)
        return _broadcast_groups(g, BM // 64, 64)
    elif GRAN == PER_WARP:
        g = tl.max(tl.max(tl.reshape(a, (BM // 16, 16, D)), 2), 1)
        return _broadcast_groups(g, BM // 16, 16)
    else:
        tl.static_assert(GRAN == PER_THREAD)
        # rows r and r + 8 of each 16-row tile: view the tile's rows as (2, 8)
        g = tl.max(tl.max(tl.reshape(a, (BM // 16, 2, 8, D)), 3), 1)  # [BM/16, 8]
        g = tl.broadcast_to(tl.reshape(g, (BM // 16, 1, 8)), (BM // 16, 2, 8))
        return tl.reshape(g, (BM,))


@triton.jit
def k_row_amax(a, BN: tl.constexpr, D: tl.constexpr, GRAN: tl.constexpr):
    """Per-key max of |k| over the key's scale group, for a tile of BN == 64 keys."""
    tl.static_assert(BN == 64)
    if GRAN == PER_TOKEN:
        return tl.max(a, 1)
    elif GRAN == PER_THREAD:
        # key 8j + 2c + t belongs to group c
        g = tl.max(tl.max(tl.reshape(a, (8, 4, 2, D)), 3), 2)  # [8, 4]
        g = tl.max(g, 0)  # [4]
        g = tl.broadcast_to(tl.reshape(g, (1, 4, 1)), (8, 4, 2))
        return tl.reshape(g, (BN,))
    else:
        tl.static_assert((GRAN == PER_BLOCK) | (GRAN == PER_WARP))
        return tl.zeros((BN,), tl.float32) + tl.max(tl.max(a, 1), 0)


@triton.jit
def channel_amax(mean, cmax, cmin, SMOOTH: tl.constexpr):
    """max over tokens of |x - mean| (SMOOTH) or |x|, from per-channel max and min (exact: rounding is monotonic)."""
    if SMOOTH:
        return tl.maximum(cmax - mean, mean - cmin)
    return tl.maximum(cmax, -cmin)


@triton.jit
def quantize_rows(x, amax, QMAX: tl.constexpr):
    """Symmetric integer quantization with one scale per row; returns (int8 tile, scale per row)."""
    amax = tl.maximum(amax, AMAX_FLOOR)
    inv = QMAX / amax
    q = round_half_even(x * inv[:, None])
    q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
    return q.to(tl.int8), amax / QMAX


@triton.jit
def key_block_bounds(m0, causal_shift, k_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """For the query tile m0 .. m0 + BLOCK_M: (end of the full key blocks no causal mask touches, end of
    the keys any of its rows sees); row i sees keys j <= i + causal_shift."""
    full_end = (k_len // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        unmasked_end = tl.minimum(full_end, tl.maximum(m0 + causal_shift + 1, 0) // BLOCK_N * BLOCK_N)
        end = tl.minimum(tl.maximum(m0 + BLOCK_M + causal_shift, 0), k_len)
    else:
        unmasked_end = full_end
        end = k_len
    return unmasked_end, end
