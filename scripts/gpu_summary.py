"""Collect the JSON that scripts/gpu_check.sh wrote into one summary: codec speed and memory against diffusers,
the fraction of the GPU's bf16 peak the SD VAE reaches at 512^2, the fp16 fallback, training against the
reference loop, and dataset encoding with its share of time waiting for data. Prints the rows of the GPU
benchmark page (docs/benchmarks/gpu.md). A step that failed or was skipped (OUT/steps.tsv) leaves its part of
the summary empty, and the summary says which.

    python scripts/gpu_summary.py runs/gpu-check
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Dense bf16 tensor-core peak in FLOP/s, from the vendors' data sheets (without sparsity), by device name.
BF16_PEAK = {"H200": 989.4e12, "H100 PCIe": 756.5e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362.1e12,
             "RTX 4090": 165.2e12}


def peak_of(device_name: str | None) -> float | None:
    for name, peak in BF16_PEAK.items():  # the more specific names come first
        if device_name and name in device_name:
            return peak
    return None


def codec_rows(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("codec-*.json")):
        rows += json.loads(path.read_text())["timings"]
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """vaegan / diffusers images per second for every (dtype, compile, size, op)."""
    keyed = {(row["dtype"], row["compile"], row["size"], row["op"], row["impl"]): row for row in rows}
    result = []
    for (dtype, compiled, size, op, impl), row in sorted(keyed.items()):
        theirs = keyed.get((dtype, compiled, size, op, "diffusers"))
        if impl == "vaegan" and theirs:
            result.append({
                "dtype": dtype, "compile": compiled, "size": size, "op": op,
                "vaegan_images_per_s": row["images_per_s"], "diffusers_images_per_s": theirs["images_per_s"],
                "speedup": row["images_per_s"] / theirs["images_per_s"],
                "vaegan_peak_mib": row.get("peak_mib"), "diffusers_peak_mib": theirs.get("peak_mib"),
            })
    return result


def peak_fraction(rows: list[dict], peak: float | None, size: int = 512) -> dict | None:
    """The best bf16 encode + decode of the SD VAE at size^2, in diffusers' nominal FLOPs per second over peak."""
    candidates = [row for row in rows if row["impl"] == "vaegan" and row["dtype"] == "bf16" and row["size"] == size]
    if not candidates or peak is None:
        return None
    best = {op: max((r for r in candidates if r["op"] == op), key=lambda r: r["images_per_s"])
            for op in ("encode", "decode")}
    flops = sum(best[op]["nominal_flops_per_image"] for op in best)
    seconds = sum(1 / best[op]["images_per_s"] for op in best)
    return {"size": size, "nominal_tflop_per_image": flops / 1e12, "achieved_tflops": flops / seconds / 1e12,
            "peak_tflops": peak / 1e12, "fraction": flops / seconds / peak,
            "compile": {op: best[op]["compile"] for op in best}}


def read(path: Path, key: str | None = None):
    """A benchmark's JSON (its `key` part), or None where its step wrote none."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return data[key] if key else data


def steps(folder: Path) -> list[dict]:
    """gpu_check.sh's log of its steps: name, exit status ('skipped' when the budget was spent), seconds."""
    path = folder / "steps.tsv"
    lines = path.read_text().splitlines() if path.exists() else []
    return [dict(zip(("step", "status", "seconds"), line.split("\t"), strict=True)) for line in lines]


def training_rows(folder: Path) -> list[dict]:
    """The eager run's rows, then the compiled run's vaegan rows, each with its speed-up over its own run's
    reference loop."""
    rows = read(folder / "train.json", "rows") or []
    compiled = read(folder / "train-compile.json", "rows") or []
    return rows + [row for row in compiled if row["implementation"] != "reference" or not rows]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the output folder of scripts/gpu_check.sh")
    args = parser.parse_args(argv)
    folder = args.folder
    device = read(folder / "device.json")
    if device is None:
        raise SystemExit(f"{folder / 'device.json'}: missing; gpu_check.sh's first step did not run")
    rows = codec_rows(folder)
    summary = {
        "device": device,
        "steps": steps(folder),
        "codec": ratios(rows),
        "bf16_peak_fraction": peak_fraction(rows, peak_of(device.get("name"))),
        "fp16_fallback": read(folder / "fp16.json"),
        "training": training_rows(folder),
        "encoding": read(folder / "encode.json", "results") or [],
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    name = device.get("name", device["device"])
    print(f"\n{name} (torch {device['torch']}, CUDA {device['cuda']}), {device['date']}")
    print("| dtype | compile | size | op | vaegan img/s | diffusers img/s | speedup | peak MiB vaegan / diffusers |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | --- |")
    for row in summary["codec"]:
        memory = (f"{row['vaegan_peak_mib']:.0f} / {row['diffusers_peak_mib']:.0f}"
                  if row["vaegan_peak_mib"] is not None else "")
        print(f"| {row['dtype']} | {row['compile']} | {row['size']}² | {row['op']} | {row['vaegan_images_per_s']:.1f} "
              f"| {row['diffusers_images_per_s']:.1f} | {row['speedup']:.2f}× | {memory} |")
    fraction = summary["bf16_peak_fraction"]
    if fraction:
        measured = device.get("bf16_matmul_tflops")
        print(f"SD VAE encode + decode at 512², bf16: {fraction['achieved_tflops']:.0f} TFLOP/s of "
              f"{fraction['nominal_tflop_per_image']:.2f} TFLOP per image = {100 * fraction['fraction']:.0f} % of "
              f"the {fraction['peak_tflops']:.0f} TFLOP/s bf16 peak"
              + (f" ({100 * fraction['achieved_tflops'] / measured:.0f} % of the {measured:.0f} TFLOP/s an 8192³ "
                 "matrix product reaches here)" if measured else ""))
    fallback = summary["fp16_fallback"]
    if fallback:
        print(f"fp16 overflow: plain fp16 finite {fallback['plain_fp16_finite']}, codec finite "
              f"{fallback['codec_fp16_finite']}, max |diff| vs fp32 {fallback['max_abs_diff_vs_fp32']:.3g}")
    for row in summary["training"]:
        print(f"training {row['implementation']} ({row['settings']}): {row['images_per_sec']:.1f} img/s, "
              f"{row.get('speedup', 1.0):.2f}x the reference")
    for row in summary["encoding"]:
        print(f"encoding {row['pipeline']}: {row['images'] / row['seconds']:.1f} img/s end to end, "
              f"{100 * row['data_wait']:.0f} % waiting for data")
    unfinished = [f"{step['step']} ({step['status']})" for step in summary["steps"] if step["status"] != "0"]
    if unfinished:
        print("not measured: " + ", ".join(unfinished))
    return summary


if __name__ == "__main__":
    main()
