#!/usr/bin/env python3
"""Each combined call of a bench_kernels --json report (a fused kernel, or where flash
attention fits at that shape, its kernel with cuBLAS's products) beside its "apart:"
row (the same work in the per-op launches, timed right after it): microseconds both
ways and the combined call's share, per configuration, with the training steps' times, and each "tf32:"
row beside the float32 row of its name; then the seed
correlation step with its phases (the networks' kernels by sublayers, by op and by
block)."""
import json
import sys


def main(path):
    with open(path) as f:
        report = json.load(f)
    for cfg in report["configs"]:
        print(f"{cfg['config']}: step {cfg['step_ms_fp32']:.3f} ms fp32, {cfg['step_ms_tf32']:.3f} ms tf32; "
              f"queued {cfg['queued_step_ms_fp32']:.3f} ms fp32, {cfg['queued_step_ms_tf32']:.3f} ms tf32 "
              f"(kernels chained {cfg.get('queued_step_ms_fp32_chained', float('nan')):.3f} ms fp32, "
              f"{cfg.get('queued_step_ms_tf32_chained', float('nan')):.3f} ms tf32); "
              f"fp32 with a launch per op {cfg['step_ms_fp32_ops']:.3f} ms "
              f"(queued {cfg.get('queued_step_ms_fp32_ops', float('nan')):.3f} ms; "
              f"tf32 {cfg.get('queued_step_ms_tf32_ops', float('nan')):.3f} ms), "
              f"with a kernel per block {cfg['step_ms_fp32_blocks']:.3f} ms")
        kernels = cfg["kernels"]
        for fused, apart in zip(kernels, kernels[1:]):
            if apart["kernel"].startswith("apart:") and not fused["kernel"].startswith("apart:"):
                f_us, a_us = fused["ms"] * 1e3, apart["ms"] * 1e3
                verdict = "combined faster" if f_us < a_us else "APART FASTER"
                print(f"  {fused['kernel']:<44} {f_us:8.1f} us, apart {a_us:8.1f} us ({f_us / a_us:5.2f}, {verdict})")
        by_name = {k["kernel"]: k for k in kernels}
        for k in kernels:  # what --precision tf32 runs, against the float32 row of the same name
            if k["kernel"].startswith("tf32: ") and k["kernel"][6:] in by_name:
                t_us, f_us = k["ms"] * 1e3, by_name[k["kernel"][6:]]["ms"] * 1e3
                print(f"  {k['kernel']:<44} {t_us:8.1f} us, float32 {f_us:8.1f} us ({t_us / f_us:5.2f})")
    step = report["correlation_step"]
    print(f"correlation step {step['step_ms']:.1f} ms: forward and statistics {step['forward_and_statistics_ms']:.1f} "
          f"ms, analysis {step['analysis_ms']:.1f} ms")
    phases = step["forward_and_statistics_phases_ms"]
    for suffix, label in (("", "by sublayers"), ("_ops", "by op"), ("_blocks", "by block")):
        names = [p for p in phases if p.endswith(suffix) and (suffix or not p.endswith(("_ops", "_blocks")))]
        print(f"  phases (ms), networks {label}: " +
              ", ".join(f"{p[:len(p) - len(suffix)]} {phases[p]:.2f}" for p in names))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: bench_pairs.py BENCH_JSON")
    main(sys.argv[1])
