"""Summarises one job of bench/gpu.sh (standard library only: the GPU
machine's Python may have nothing else):

    python3 bench/gpu_summary.py JOB_DIR WALL_SECONDS GPU_CSV

JOB_DIR holds job/report.json and gpu-samples.csv (nvidia-smi --query-gpu
... --format=csv -l 1). Writes JOB_DIR/summary.json and summary.md and
prints the latter: the GPU, the job's wall time, per model its training
examples/s and test errors, and the GPU's utilisation and memory while the
job ran (mean and peak over the samples)."""

import csv
import json
import sys
from pathlib import Path


def number(text):
    """The leading number of an nvidia-smi field such as '35 %' or '1024 MiB'."""
    try:
        return float(text.strip().split()[0])
    except (ValueError, IndexError):
        return None


def gpu_samples(path):
    """Utilisation and memory over the samples: mean and peak of each."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f, skipinitialspace=True):
            rows.append({k.strip(): v for k, v in row.items() if k})
    columns = {
        "gpu_utilization_percent": "utilization.gpu [%]",
        "memory_utilization_percent": "utilization.memory [%]",
        "memory_used_mib": "memory.used [MiB]",
        "power_draw_w": "power.draw [W]",
    }
    stats = {"samples": len(rows)}
    for name, column in columns.items():
        values = [v for v in (number(r.get(column, "")) for r in rows) if v is not None]
        if values:
            stats[name] = {"mean": sum(values) / len(values), "peak": max(values)}
    return stats


def model_rows(report):
    """Per model: training examples/s (examples x epochs / training
    seconds, validation included) and test errors."""
    rows = []
    for m in report["models"]:
        epochs = len(m.get("validation_errors_per_epoch") or [])
        seconds = m.get("train_seconds")
        row = {
            "name": m["name"],
            "role": m["role"],
            "architecture": m["architecture"],
            "test_errors": m["test_errors"],
            "test_examples": report["test_examples"],
        }
        if epochs and seconds:
            examples = m.get("training_examples") or report["train_examples"]
            row.update(epochs=epochs, train_seconds=seconds,
                       examples_per_second=examples * epochs / seconds)
        rows.append(row)
    return rows


def main():
    job_dir, wall, gpu_csv = Path(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
    report = json.loads((job_dir / "job" / "report.json").read_text())
    gpu = gpu_csv.read_text().strip().splitlines()[-1]
    summary = {
        "gpu": gpu,
        "wall_seconds": wall,
        "models": model_rows(report),
        "gpu_during_job": gpu_samples(job_dir / "gpu-samples.csv"),
    }
    (job_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"GPU: {gpu}", f"job wall time: {wall:.1f} s", "",
             "| model | architecture | epochs | train s | examples/s | test errors |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for m in summary["models"]:
        rate = f'{m["examples_per_second"]:.0f}' if "examples_per_second" in m else ""
        secs = f'{m["train_seconds"]:.1f}' if "train_seconds" in m else ""
        lines.append(f'| {m["name"]} | {m["architecture"]} | {m.get("epochs", "")} | {secs} '
                     f'| {rate} | {m["test_errors"]} / {m["test_examples"]} |')
    g = summary["gpu_during_job"]
    lines.append("")
    lines.append(f'GPU during the job ({g["samples"]} samples, 1 s apart):')
    for name, v in g.items():
        if isinstance(v, dict):
            lines.append(f'- {name}: mean {v["mean"]:.1f}, peak {v["peak"]:.1f}')
    text = "\n".join(lines) + "\n"
    (job_dir / "summary.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
