#!/usr/bin/env python3
"""Each fused kernel of a bench_kernels --json report beside its "apart:" row (the same
work in separate launches, timed right after it): microseconds both ways and the
fused one's share, per configuration, with the training steps' times."""
import json
import sys


def main(path):
    with open(path) as f:
        report = json.load(f)
    for cfg in report["configs"]:
        print(f"{cfg['config']}: step {cfg['step_ms_fp32']:.3f} ms fp32, {cfg['step_ms_tf32']:.3f} ms tf32; "
              f"queued {cfg['queued_step_ms_fp32']:.3f} ms fp32, {cfg['queued_step_ms_tf32']:.3f} ms tf32; "
              f"fp32 with a launch per op {cfg['step_ms_fp32_ops']:.3f} ms, "
              f"with a kernel per block {cfg['step_ms_fp32_blocks']:.3f} ms")
        kernels = cfg["kernels"]
        for fused, apart in zip(kernels, kernels[1:]):
            if apart["kernel"].startswith("apart:") and not fused["kernel"].startswith("apart:"):
                f_us, a_us = fused["ms"] * 1e3, apart["ms"] * 1e3
                verdict = "fused faster" if f_us < a_us else "APART FASTER"
                print(f"  {fused['kernel']:<44} {f_us:8.1f} us, apart {a_us:8.1f} us ({f_us / a_us:5.2f}, {verdict})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: bench_pairs.py BENCH_JSON")
    main(sys.argv[1])
