"""Warning signs the reward cannot hide (docs/running.md): a tiny run hacked on purpose against its control.

The brightness reward prizes one thing only, so a run that follows it fast (a large --lr) is reward hacking by
design: its images get brighter whatever the prompt. The random reward is the control: it ranks by chance, so
nothing should move far. Both runs log each held-out evaluation's image statistics as eval/drift/NAME; this
prints each statistic's move from the base in units of its spread over the base's images, and the warnings;
the report goes to OUT/report.json (a copy: benchmarks/results/hacking_check.json).

    python benchmarks/hacking_check.py --out /tmp/hacking    # the offline tiny model, 2 CPU cores: ~4 minutes
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import drpo  # noqa: E402

RUNS = {"hacked (brightness)": "brightness", "control (random)": "random"}


def moves(out):
    """[(step, {statistic: mean move from the base in units of its spread over the base's images}, warnings)] of a
    run's held-out evaluations after the base's."""
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    base = next(r for r in rows if r["step"] == 0 and "eval/drift/brightness" in r)
    spread = {k[11:-7]: v for k, v in base.items() if k.startswith("eval/drift/") and k.endswith("_spread")}
    return [(r["step"], {k: r[f"eval/drift/{k}_gain"] / max(s, 1e-12) for k, s in spread.items()},
             r.get("warnings", {})) for r in rows if "eval/drift/brightness" in r and r is not base]


def main(argv=None):
    ap = argparse.ArgumentParser(description="A tiny run hacked on purpose (brightness) against its control (random).")
    ap.add_argument("--out", default="hacking", help="folder of the two runs")
    ap.add_argument("--steps", type=int, default=30, help="updates of each run")
    ap.add_argument("--lr", type=float, default=3e-3, help="learning rate: large, to hack fast")
    args = ap.parse_args(argv)
    report = {}
    for name, reward in RUNS.items():
        out = Path(args.out) / reward
        code = drpo.main(["--model", "tiny", "--reward", reward, "--max-steps", str(args.steps), "--lr", str(args.lr),
                          "--grad-accum", "1", "--eval-every", "5", "--eval-seeds", "2", "--sample-every", "0",
                          "--output-dir", str(out), "--overwrite"])
        if code:
            raise SystemExit(f"the {name} run exited with {code}")
        report[name] = moves(out)
        print(f"\n{name}: each statistic's move from the base, in units of its spread over the base's images "
              f"(a warning past {__import__('eval').DRIFT_WARN:g})")
        for step, gains, warnings in report[name]:
            print(f"  update {step:3d}: " + "  ".join(f"{k} {v:+.2f}" for k, v in gains.items()))
            for sign in warnings.values():
                print(f"    warning: {sign}")
    Path(args.out, "report.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
