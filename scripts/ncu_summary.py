#!/usr/bin/env python3
"""Sums Nsight Compute's per-kernel durations (ncu --csv --metrics gpu__time_duration.sum)
by kernel name: launches, total and mean microseconds, largest first."""
import csv
import sys
from collections import defaultdict

SCALE_TO_US = {  # ncu writes either spelling
    "nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6, "s": 1e6,
}


def short_name(name):
    """The kernel's name without its return type and parameter list."""
    if name.endswith(")"):  # cut the outermost trailing (...) group
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    return name.removeprefix("void ").replace("(anonymous namespace)::", "")


def main(path):
    with open(path, newline="") as f:
        rows = [line for line in f if line.startswith('"')]  # ncu's own and the program's lines are not CSV
    total = defaultdict(float)
    count = defaultdict(int)
    for row in csv.DictReader(rows):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(row["Metric Value"].replace(",", "")) * SCALE_TO_US[row["Metric Unit"]]
        name = short_name(row["Kernel Name"])
        total[name] += value
        count[name] += 1
    print(f"{'kernel':60s} {'launches':>8s} {'total us':>10s} {'mean us':>9s}")
    for name in sorted(total, key=total.get, reverse=True):
        print(f"{name[:60]:60s} {count[name]:8d} {total[name]:10.1f} {total[name] / count[name]:9.2f}")
    print(f"{'all':60s} {sum(count.values()):8d} {sum(total.values()):10.1f}")


if __name__ == "__main__":
    main(sys.argv[1])
