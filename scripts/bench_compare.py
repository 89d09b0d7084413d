#!/usr/bin/env python3
"""Two bench_kernels --json reports of one card side by side (a build from before and the
current one, say): each configuration's training steps, then the second's kernel rows
beside the first's where it has them, in microseconds, with the second's time over the
first's. Cards of one kind differ by up to 20% (docs/PERFORMANCE.md), so only reports
from the same machine compare. Usage: bench_compare.py BEFORE.json AFTER.json"""
import json
import sys

STEPS = ["step_ms_fp32", "queued_step_ms_fp32", "step_ms_tf32", "queued_step_ms_tf32", "queued_step_ms_fp32_chained",
         "queued_step_ms_tf32_chained", "step_ms_fp32_ops", "queued_step_ms_fp32_ops", "queued_step_ms_tf32_ops",
         "step_ms_fp32_blocks"]


def row(name, before, after, unit):
    if before is None and after is None:
        return
    text = lambda v: f"{v:10.3f}" if v is not None else f"{'-':>10}"
    ratio = f"{after / before:6.2f}" if before and after else ""
    print(f"  {name:<58} {text(before)} {text(after)} {unit} {ratio}")


def main(before_path, after_path):
    with open(before_path) as f:
        before = json.load(f)
    with open(after_path) as f:
        after = json.load(f)
    print(f"before: {before.get('device', '?')}\nafter:  {after.get('device', '?')}")
    configs = {c["config"]: c for c in before["configs"]}
    for cfg in after["configs"]:
        old = configs.get(cfg["config"])
        if old is None:
            continue
        print(f"{cfg['config']}{'':<{58 - len(cfg['config'])}}     before      after    after/before")
        for key in STEPS:
            row(key, old.get(key), cfg.get(key), "ms")
        old_us = {k["kernel"]: k["ms"] * 1e3 for k in old["kernels"]}
        for k in cfg["kernels"]:
            row(k["kernel"], old_us.get(k["kernel"]), k["ms"] * 1e3, "us")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
