"""How long from a stop signal to a saved state (docs/running.md, "Stopping"): a tiny run is sent SIGTERM at a
spread of moments and timed from the signal to its exit (its checkpoint saved). Printed: each delay, and the
longest, for a run without and with a held-out evaluation every update (an evaluation in progress is not cut).

    python benchmarks/stop_latency.py            # the offline tiny model, 2 CPU cores: about 3 minutes
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def stopped_after(seconds, extra, out):
    """Start a tiny run, send SIGTERM `seconds` after its first update is logged; (seconds to exit, exit code)."""
    cmd = [sys.executable, str(HERE / "drpo.py"), "--model", "tiny", "--reward", "brightness", "--max-steps", "50",
           "--lr", "1e-3", "--sample-every", "0", "--output-dir", str(out), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and any("reward_mean" in line for line in metrics.read_text().splitlines())):
        if proc.poll() is not None:
            raise SystemExit(f"the run ended before its first update: {' '.join(cmd)}")
        time.sleep(0.05)
    time.sleep(seconds)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(600)
    return time.perf_counter() - sent, code


def main(argv=None):
    ap = argparse.ArgumentParser(description="Time from SIGTERM to a saved state, on the tiny model.")
    ap.add_argument("--delays", default="0,0.3,0.7,1.1,1.6,2.2", help="seconds after the first update")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    delays = [float(d) for d in args.delays.split(",")]
    settings = {"training": ["--eval-every", "0"],
                "with held-out evaluation every update": ["--eval-every", "1", "--eval-seeds", "2"]}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in settings.items():
            rows = []
            for i, delay in enumerate(delays):
                took, code = stopped_after(delay, extra, Path(tmp) / f"{len(results)}-{i}")
                rows.append({"delay_s": delay, "to_exit_s": round(took, 2), "exit_code": code})
                print(f"{name}: SIGTERM {delay:.1f} s after update 1 -> stopped and saved in {took:.2f} s "
                      f"(exit {code})", flush=True)
            results[name] = {"runs": rows, "longest_s": max(r["to_exit_s"] for r in rows)}
            print(f"{name}: longest {results[name]['longest_s']:.2f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
