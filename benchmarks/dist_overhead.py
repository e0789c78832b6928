"""What torchrun costs on one machine: one update of 2 processes x accumulation 1 against
1 process x accumulation 2 on the tiny model (the same candidates; README "Several GPUs").

    python benchmarks/dist_overhead.py --out /tmp/dist      # CPU: gloo, 2 processes

Both runs take the same flags; seconds per update come from the loop's stopwatch
(metrics.jsonl `seconds`, rank 0), median over the updates after the first.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def seconds_per_update(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["seconds"] for r in rows[1:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    flags = ["--model", args.model, "--reward", "brightness", "--candidates", "24", "--max-steps", str(args.steps),
             "--sample-every", "0", "--overwrite"]
    one = [sys.executable, str(ROOT / "drpo.py"), *flags, "--grad-accum", "2", "--output-dir", f"{args.out}/one"]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "drpo.py"), *flags, "--grad-accum", "1", "--output-dir", f"{args.out}/two"]
    for cmd in (one, two):
        subprocess.run(cmd, check=True, env=os.environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = {"one_process_accum2_s": seconds_per_update(f"{args.out}/one"),
              "two_processes_accum1_s": seconds_per_update(f"{args.out}/two"), "threads": os.cpu_count()}
    result["ratio_two_over_one"] = result["two_processes_accum1_s"] / result["one_process_accum2_s"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
