"""What one `sageattn` call costs besides the GPU work: first-call time and host time per call.

Subcommands (each measures the quantattn that PYTHONPATH or the installed package provides):
  first          the first call in a fresh process, kernel compilation or cache load included (seconds)
  host           host time per whole call on [1, 1, 64, 128] bf16, a problem the GPU finishes at once, so
                 the GPU waits on the host: median of 5 runs of 300 calls after 50 warm-up calls (µs)
  where          cProfile of 300 such calls: the functions with the most own time
  parts          µs per call of each step of a Hopper launch, alone (needs --backend hopper)
  save FILE      the outputs of a fixed seeded call (B2 H8 N2048 d128 bf16, causal off and on), to compare
                 two builds of quantattn bit for bit
  compare A B    whether two saved outputs are identical, and their largest difference

--backend (after the subcommand) picks the backend the calls ask for (default hopper; "quantized" is auto's kernel choice
without the hand-off to torch SDPA; "auto" may give a call this small to SDPA). The Triton launch path is
chosen by QUANTATTN_DIRECT_LAUNCH (1, the default: quantattn's direct launches; 0: Triton's own launcher).

Usage (GPU machine, repository root):
  python3 scripts/call_costs.py first
  python3 scripts/call_costs.py host --backend quantized
  QUANTATTN_DIRECT_LAUNCH=0 python3 scripts/call_costs.py where --backend triton
  PYTHONPATH=/path/to/other/checkout python3 scripts/call_costs.py save /tmp/other.pt
  python3 scripts/call_costs.py compare /tmp/other.pt /tmp/this.pt

`parts` reads internal modules (quantattn.hopper.launch, .kernels, .driver); the other subcommands use
only the public `quantattn.sageattn`. quantattn is imported inside each subcommand, so that `first`
times the import too.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time

import torch

TINY = (1, 1, 64, 128)  # B, H, N, d: the GPU work is negligible next to the host's


def first(backend: str) -> None:
    t0 = time.perf_counter()
    import quantattn

    q, k, v = (torch.randn(1, 8, 1024, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    t1 = time.perf_counter()
    quantattn.sageattn(q, k, v, backend=backend)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    print(f"backend={backend}: first call {t2 - t1:.2f} s (import + inputs {t1 - t0:.2f} s)")


def _tiny_call(backend: str):
    import quantattn

    q, k, v = (torch.randn(*TINY, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    call = lambda: quantattn.sageattn(q, k, v, backend=backend)  # noqa: E731
    for _ in range(50):
        call()
    torch.cuda.synchronize()
    return call


def host(backend: str) -> None:
    call = _tiny_call(backend)
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(300):
            call()
        torch.cuda.synchronize()
        runs.append((time.perf_counter() - t0) / 300 * 1e6)
    print(
        f"backend={backend}: host time per whole call on {list(TINY)} {statistics.median(runs):.1f} us "
        f"(runs {', '.join(f'{r:.1f}' for r in runs)})"
    )


def where(backend: str, top: int = 25) -> None:
    call = _tiny_call(backend)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        call()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def parts() -> None:
    """µs per call of each step of a Hopper launch, each timed alone on the tiny problem."""
    import timeit

    import quantattn
    from quantattn.config import QuantConfig
    from quantattn.hopper import driver, kernels, launch

    q, k, v = (torch.randn(*TINY, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    kv = launch.hopper_preprocess(k, v, QuantConfig())
    out = torch.empty_like(q)
    steps = {
        "sageattn (whole)": lambda: quantattn.sageattn(q, k, v, backend="hopper"),
        "launch.hopper_preprocess": lambda: launch.hopper_preprocess(k, v, QuantConfig()),
        "launch.hopper_attention": lambda: launch.hopper_attention(q, kv, False, 0.1, out),
        "attention_spec": lambda: kernels.attention_spec(128, False, "bf16"),
        "AttentionParams()": kernels.AttentionParams,
        "ensure_context": lambda: driver.ensure_context(0),
        "current_stream": lambda: torch.cuda.current_stream(q.device).cuda_stream,
        "torch.empty x1": lambda: torch.empty(64, device="cuda"),
    }
    for name, fn in steps.items():
        fn()
        n = 2000
        t = min(timeit.repeat(fn, number=n, repeat=3)) / n * 1e6
        torch.cuda.synchronize()
        print(f"{name:20s} {t:7.1f} us")


def save(path: str, backend: str) -> None:
    import quantattn

    g = torch.Generator(device="cuda").manual_seed(1234)
    q, k, v = (torch.randn(2, 8, 2048, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    outs = {c: quantattn.sageattn(q, k, v, is_causal=c, backend=backend) for c in (False, True)}
    torch.save({c: o.cpu() for c, o in outs.items()}, path)
    print(f"saved {path} (backend={backend})")


def compare(a: str, b: str) -> None:
    x, y = torch.load(a), torch.load(b)
    for c in x:
        d = (x[c].float() - y[c].float()).abs()
        print(f"causal={c}: identical={torch.equal(x[c], y[c])} max|diff|={d.max().item():.3g}")


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--backend", default="hopper", help="the backend the calls ask for (default hopper)")
    p = argparse.ArgumentParser(prog="scripts/call_costs.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("first", parents=[common], help="first call in a fresh process (s)")
    sub.add_parser("host", parents=[common], help="host time per whole call on a tiny problem (us)")
    sub.add_parser("where", parents=[common], help="cProfile of 300 tiny calls")
    sub.add_parser("parts", help="us per step of a Hopper launch")
    sub.add_parser("save", parents=[common], help="save a seeded call's outputs").add_argument("file")
    cmp = sub.add_parser("compare", help="compare two saved outputs (no GPU needed)")
    cmp.add_argument("a")
    cmp.add_argument("b")
    args = p.parse_args(argv)
    if args.cmd == "compare":
        compare(args.a, args.b)
        return 0
    if not torch.cuda.is_available():
        print("scripts/call_costs.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.cmd == "first":
        first(args.backend)
    elif args.cmd == "host":
        host(args.backend)
    elif args.cmd == "where":
        where(args.backend)
    elif args.cmd == "parts":
        parts()
    else:
        save(args.file, args.backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
