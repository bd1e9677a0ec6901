#!/usr/bin/env python3
"""Merges our measurements and PyTorch's into bench/results/pytorch-comparison.{json,md}.

Called by bench/compare.sh, which produced the inputs in one run on the same
machine with the same thread count. For every figure it writes both values
and `speedup` (how many times faster we are: ours/theirs for throughput,
theirs/ours for wall time; above 1 means we win). For the training and
inference steps it also gives the machine's fp32 GEMM rate on the step's own
matrix shapes (the faster of candle's and torch's medians of 7 repeats,
measured in the same run) and the fraction of it each framework's step
reaches.

This machine's speed drifts by up to 2x between runs, so compare.sh
measures the throughput of both frameworks several times, alternating, and
every throughput figure here is the median over those repeats (all values
are kept in the JSON).

usage: compare.py WORK_DIR COMMAND  (WORK_DIR holds ours-throughput-R.json
and torch-throughput-R.json for R = 1, 2, ..., ours-pipeline/report.json,
ours-pipeline-wall.txt, torch-pipeline.json)
"""
import glob
import statistics
import datetime
import json
import os
import platform
import re
import subprocess
import sys

STEPS = [
    # (key in torch's figures, key in ours, description)
    ("teacher_train", "teacher_1200_1200_dropout",
     "train 784-1200-1200-10, dropout 0.2/0.5, max-norm, ±2 px jitter, batch 128"),
    ("student_train", "mlp_800_800_hard", "train 784-800-800-10 on hard labels, batch 128"),
    ("distill_step", "distill_800_800_T20", "distil 784-800-800-10 at T = 20, batch 128"),
    ("teacher_infer", "teacher_inference_1200_1200",
     "teacher inference into logits (ours: batches of 256 on each thread; PyTorch: batch 1024)"),
]


def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def locked_version(name):
    try:
        text = open("Cargo.lock").read()
    except OSError:
        return "unknown"
    m = re.search(r'name = "%s"\nversion = "([^"]+)"' % re.escape(name), text)
    return m.group(1) if m else "unknown"


def stamp(torch_version):
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = run(["git", "rev-parse", "HEAD"])
    if run(["git", "status", "--porcelain", "--untracked-files=no"]) not in ("", "unknown"):
        commit += "-dirty"
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "rustc": run(["rustc", "--version"]),
        "candle": locked_version("candle-core"),
        "torch": torch_version,
        "python": platform.python_version(),
    }


def load(path):
    with open(path) as f:
        return json.load(f)


def repeats(work, prefix):
    paths = sorted(glob.glob(os.path.join(work, f"{prefix}-throughput-*.json")))
    if not paths:
        sys.exit(f"no {prefix}-throughput-*.json in {work}")
    return [load(p) for p in paths]


def main():
    work, command = sys.argv[1], sys.argv[2]
    ours_runs = repeats(work, "ours")
    torch_runs = repeats(work, "torch")
    ours_tp, torch_tp = ours_runs[0], torch_runs[0]
    ours_report = load(os.path.join(work, "ours-pipeline", "report.json"))
    ours_wall = float(open(os.path.join(work, "ours-pipeline-wall.txt")).read())
    torch_pipe = load(os.path.join(work, "torch-pipeline.json"))

    figures = []
    for torch_key, ours_key, what in STEPS:
        ours_all = [r["examples_per_second"][ours_key] for r in ours_runs]
        theirs_all = [r["figures"][torch_key]["examples_per_second"] for r in torch_runs]
        candle_gemm = statistics.median(r["step_gemm"][torch_key]["gemm_gflops_median"]
                                        for r in ours_runs)
        torch_gemm = statistics.median(r["figures"][torch_key]["gemm_gflops_median"]
                                       for r in torch_runs)
        ours, theirs = statistics.median(ours_all), statistics.median(theirs_all)
        flops = ours_tp["step_gemm"][torch_key]["flops_per_example"]
        machine = max(candle_gemm, torch_gemm)
        figures.append({
            "name": torch_key,
            "what": what,
            "unit": "examples/s",
            "ours": ours,
            "pytorch": theirs,
            "ours_repeats": ours_all,
            "pytorch_repeats": theirs_all,
            "speedup": ours / theirs,
            "flops_per_example": flops,
            "gemm_gflops_median": {"candle": candle_gemm, "torch": torch_gemm,
                                   "machine": machine},
            "fraction_of_machine_gemm": {"ours": ours * flops / 1e9 / machine,
                                         "pytorch": theirs * flops / 1e9 / machine},
        })
    figures.append({
        "name": "mnist_pipeline_wall",
        "what": "whole MNIST pipeline (teacher, baseline, transfer set, student, evaluation), "
                f"{torch_pipe['epochs']} epochs per model",
        "unit": "s",
        "ours": ours_wall,
        "pytorch": torch_pipe["wall_seconds"],
        "speedup": torch_pipe["wall_seconds"] / ours_wall,
    })
    ours_errors = {m["name"]: m["test_errors"] for m in ours_report["models"]}
    torch_errors = {name: m["test_errors"] for name, m in torch_pipe["models"].items()}
    result = {
        "command": command,
        "stamp": stamp(torch_tp["torch_version"]),
        "threads": {"ours": ours_tp["threads"], "pytorch": torch_tp["threads"]},
        "batch": ours_tp["batch"],
        "steps": {"ours": ours_tp["steps"], "pytorch": torch_tp["steps"]},
        "throughput_repeats": len(ours_runs),
        "matmul_gflops_2048_candle": [r["matmul_gflops_2048"] for r in ours_runs],
        "figures": figures,
        "distill_shard_wait": ours_runs[-1].get("distill_shard_wait"),
        "ours_inference_into_transfer_set": statistics.median(
            r["examples_per_second"].get("teacher_inference_into_transfer_set_1200_1200", 0)
            for r in ours_runs),
        "pipeline_test_errors": {"epochs": torch_pipe["epochs"], "ours": ours_errors,
                                 "pytorch": torch_errors},
    }
    os.makedirs("bench/results", exist_ok=True)
    with open("bench/results/pytorch-comparison.json", "w") as f:
        json.dump(result, f, indent=2)
    body = markdown(result)
    with open("bench/results/pytorch-comparison.md", "w") as f:
        f.write("# Ours vs. PyTorch on the same CPU\n\n" + body)
    update_readme("bench/README.md", "pytorch-comparison", body)
    print(body)


def markdown(r):
    s = r["stamp"]
    out = [f"{s['date']} on {s['host']} ({s['cpu']}, {s['cpus']} logical CPUs); commit "
           f"`{s['commit']}`; {s['rustc']}; candle {s['candle']}; torch {s['torch']}, Python "
           f"{s['python']}. Threads: ours {r['threads']['ours']}, PyTorch {r['threads']['pytorch']}.",
           "", f"Command: `{r['command']}`.", "",
           "| figure | ours | PyTorch | speedup | GEMM rate on the step's shapes, GFLOP/s (candle / torch) "
           "| fraction of it: ours | PyTorch |",
           "|---|---|---|---|---|---|---|"]
    for f in r["figures"]:
        if f["unit"] == "s":
            out.append(f"| {f['what']} | {f['ours']:.1f} s | {f['pytorch']:.1f} s | "
                       f"{f['speedup']:.2f} | | | |")
        else:
            g = f["gemm_gflops_median"]
            fr = f["fraction_of_machine_gemm"]
            out.append(f"| {f['what']} | {f['ours']:,.0f} ex/s | {f['pytorch']:,.0f} ex/s | "
                       f"{f['speedup']:.2f} | {g['candle']:.0f} / {g['torch']:.0f} | "
                       f"{fr['ours']:.0%} | {fr['pytorch']:.0%} |")
    e = r["pipeline_test_errors"]
    out += ["", f"Test errors of the pipelines ({e['epochs']} epochs per model):", "",
            "| model | ours | PyTorch |", "|---|---|---|"]
    for name in ["teacher-0", "baseline", "student"]:
        out.append(f"| {name} | {e['ours'].get(name, '–')} | {e['pytorch'].get(name, '–')} |")
    into = r.get("ours_inference_into_transfer_set")
    infer = next((f for f in r["figures"] if f["name"] == "teacher_infer"), None)
    if into and infer:
        out += ["", f"Teacher inference into a transfer set on disk (shards of 2,000 rows "
                f"written on another thread, manifest included): {into:,.0f} ex/s, "
                f"{into / infer['ours']:.0%} of our inference alone."]
    w = r.get("distill_shard_wait")
    if w:
        out += ["", f"The distillation step reads its transfer set from disk ({w['shards']} shards), "
                f"the next shard on another thread while it trains: it waited {w['seconds'] * 1000:.0f} ms "
                f"for shards in its {w['epoch_seconds']:.1f} s epoch, the first shard included."]
    out.append("")
    out.append(f"Throughput figures are medians of {r['throughput_repeats']} alternating runs of "
               "each framework (every value is in the JSON); the pipelines ran once each. "
               "A speedup above 1 means we are faster. The fraction is the step's useful "
               "GEMM work (its FLOPs per example × examples/s) over the faster library's GEMM "
               "rate on the same shapes, measured in the same run.")
    return "\n".join(out) + "\n"


def update_readme(path, name, body):
    try:
        text = open(path).read()
    except OSError:
        return
    start_tag, end_tag = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    start = text.find(start_tag)
    end = text.find(end_tag)
    if start < 0 or end < 0:
        return
    start += len(start_tag)
    with open(path, "w") as f:
        f.write(text[:start] + "\n" + body + text[end:])


if __name__ == "__main__":
    main()
