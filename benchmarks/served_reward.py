"""What serving a reward costs: update time with the reward served (python -m rewards.serve) against in process,
and a VLM server with added latency per request, where a micro-step's requests are in flight together.

    python benchmarks/served_reward.py --out /tmp/served     # tiny model, CPU; prints JSON (docs/cost.md)

Each case is a short tiny run; times are the runs' own phase timings (metrics.jsonl, phases_s), first update
dropped (warm-up), so the ratios come from one run of this script on one machine.
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import drpo  # noqa: E402
from examples import scripted_vlm  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timings(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    mean = lambda f: sum(map(f, rows)) / len(rows)
    return {"update_s": mean(lambda m: m["seconds"]), "reward_s": mean(lambda m: m["phases_s"]["reward"])}


def train(out, reward, steps, *extra):
    common = ["--model", "tiny", "--candidates", "8", "--n-pos", "3", "--n-neg", "3", "--grad-accum", "2",
              "--max-steps", str(steps), "--sample-every", "0", "--eval-every", "0", "--overwrite", "--seed", "0"]
    assert drpo.main([*common, "--reward", reward, "--output-dir", str(out), *extra]) == 0
    return timings(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--latency", type=float, default=0.2)
    a = ap.parse_args()
    out, result = Path(a.out), {}

    result["in_process"] = train(out / "local", "brightness", a.steps)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "rewards.serve", "--reward", "brightness", "--port", str(port),
                               "--accelerator", "cpu", "--devices", "1"], cwd=ROOT, start_new_session=True)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        result["served"] = train(out / "served", f"http://127.0.0.1:{port}", a.steps)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    result["served_over_in_process"] = {k: result["served"][k] / result["in_process"][k] for k in ("update_s",
                                                                                                  "reward_s")}
    # 8 candidates: 7 pairs x 2 orders = 14 requests per micro-step, 2 micro-steps per update
    for concurrency in (16, 1):
        vlm = scripted_vlm.make_server(0, latency=a.latency)
        threading.Thread(target=vlm.serve_forever, daemon=True).start()
        try:
            t = train(out / f"vlm_{concurrency}", "vlm", 3, "--reward-url",
                      f"http://127.0.0.1:{vlm.server_address[1]}/v1", "--reward-model", "scripted",
                      "--reward-concurrency", str(concurrency))
        finally:
            vlm.shutdown()
            vlm.server_close()
        result[f"vlm_latency_{a.latency}s_concurrency_{concurrency}"] = {
            "reward_s_per_micro_step": t["reward_s"] / 2, "in_latencies": t["reward_s"] / 2 / a.latency,
            "requests_per_micro_step": 14}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
