"""Summarise the Nsight Compute CSVs that `make gpu-check` writes (ncu-*.csv).

Each CSV holds one training step or one eval forward (benchmarks/profile_step.py
under `ncu --csv --metrics ...`). Per file: the launches (kernels) in the
pass, their summed GPU time, DRAM bytes, and executed instructions per element
(warp instructions x 32 threads / elements of the input tensor: thread
instructions, the unit of the offline census and of DESIGN.md's budget). The
kernels that touch every element are listed by name; the O(K*C) kernels are
counted together, since their cost is the launch, not the work.

    python benchmarks/ncu_summary.py benchmarks/results/cuda/<gpu>   # writes ncu-summary.md there
"""
import csv
import glob
import os
import re
import sys
from collections import defaultdict

# A kernel that executes fewer thread instructions than this per element of
# the input works on per-channel data, not on the tensor.
ELEMENT_KERNEL_MIN_INSTRUCTIONS = 1.0


def read_profile(path):
    """(description, elements, kernels) of one CSV; kernels as dicts of metric -> value, in launch order."""
    with open(path) as f:
        text = f.read()
    match = re.search(r"^profiled: (.*elements=(\d+))$", text, re.MULTILINE)
    if match is None:
        raise ValueError(f"{path}: no 'profiled:' line (did the profiled program finish?)")
    header = text.index('"ID"')
    kernels = defaultdict(dict)
    for row in csv.DictReader(text[header:].splitlines()):
        kernel = kernels[int(row["ID"])]
        kernel["name"] = row["Kernel Name"]
        kernel[row["Metric Name"]] = float(row["Metric Value"].replace(",", ""))
    return match.group(1), int(match.group(2)), [kernels[i] for i in sorted(kernels)]


def short_name(name):
    """A kernel's name without template arguments and parameter lists."""
    name = re.sub(r"\(.*", "", name)
    depth, out = 0, []
    for ch in name:
        depth += ch == "<"
        if depth == 0:
            out.append(ch)
        depth -= ch == ">"
    return "".join(out).replace("void ", "").strip()


def summarise(path):
    description, elements, kernels = read_profile(path)
    per_element = [32 * k["smsp__inst_executed.sum"] / elements for k in kernels]
    time_us = sum(k["gpu__time_duration.sum"] for k in kernels) / 1e3
    dram = sum(k["dram__bytes_read.sum"] + k["dram__bytes_write.sum"] for k in kernels)
    element_kernels = [(short_name(k["name"]), p, k["gpu__time_duration.sum"] / 1e3,
                        int(k["launch__registers_per_thread"]))
                       for k, p in zip(kernels, per_element) if p >= ELEMENT_KERNEL_MIN_INSTRUCTIONS]
    small = [k for k, p in zip(kernels, per_element) if p < ELEMENT_KERNEL_MIN_INSTRUCTIONS]
    return {
        "file": os.path.basename(path),
        "description": description,
        "launches": len(kernels),
        "time_us": time_us,
        "dram_bytes_per_element": dram / elements,
        "instructions_per_element": sum(per_element),
        "element_kernels": element_kernels,
        "small_kernels": len(small),
        "small_kernels_time_us": sum(k["gpu__time_duration.sum"] for k in small) / 1e3,
    }


def format_summary(summaries):
    lines = [
        "Nsight Compute, one pass each (benchmarks/profile_step.py; clocks not locked). Instructions are thread "
        "instructions (warp instructions x 32) per element of the input; 'small' kernels execute under "
        f"{ELEMENT_KERNEL_MIN_INSTRUCTIONS:g} per element (per-channel work, launch-bound).",
        "",
        "| profile | launches | GPU time us | DRAM B/elem | instr/elem | element kernels (instr/elem, us, regs) "
        "| small kernels (count, us) |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for s in summaries:
        kernels = "; ".join(f"{name} ({p:.0f}, {t:.0f}, {r})" for name, p, t, r in s["element_kernels"])
        lines.append(
            f"| {s['file'][len('ncu-'):-len('.csv')]} | {s['launches']} | {s['time_us']:.0f} "
            f"| {s['dram_bytes_per_element']:.1f} | {s['instructions_per_element']:.0f} | {kernels} "
            f"| {s['small_kernels']}, {s['small_kernels_time_us']:.0f} |"
        )
    lines += ["", "Profiles: " + "; ".join(f"{s['file']}: {s['description']}" for s in summaries)]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python benchmarks/ncu_summary.py RESULTS_DIR")
    paths = sorted(glob.glob(os.path.join(argv[0], "ncu-*.csv")))
    if not paths:
        raise SystemExit(f"no ncu-*.csv in {argv[0]}")
    table = format_summary([summarise(p) for p in paths])
    with open(os.path.join(argv[0], "ncu-summary.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
