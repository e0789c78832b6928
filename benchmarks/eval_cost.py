"""What the held-out evaluation costs (docs/running.md, "Watching a run"): the same run with
--eval-every 0 and with --eval-every N, wall-clock seconds of each, measured in one process.

    python benchmarks/eval_cost.py                 # the tiny offline model, the README's demo settings
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import drpo  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=25)
    args = ap.parse_args()
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for every in (0, args.eval_every, 0, args.eval_every):  # alternated: the machine's drift hits both
            t0 = time.perf_counter()
            assert drpo.main(["--model", args.model, "--reward", "brightness", "--max-steps", str(args.steps),
                              "--lr", "1e-3", "--grad-accum", "1", "--sample-every", "0", "--overwrite",
                              "--eval-every", str(every), "--output-dir", f"{tmp}/{every}"]) == 0
            seconds.setdefault(every, []).append(time.perf_counter() - t0)
    off, on = min(seconds[0]), min(seconds[args.eval_every])
    evals = 1 + args.steps // args.eval_every  # the base at 0, then every N (the last update is one of them)
    print(json.dumps({"seconds_off": seconds[0], "seconds_on": seconds[args.eval_every], "evaluations": evals,
                      "overhead": on / off - 1, "seconds_per_evaluation": (on - off) / evals,
                      "seconds_per_update": off / args.steps}, indent=2))


if __name__ == "__main__":
    main()
