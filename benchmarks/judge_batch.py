"""Seconds per judged pair with one pair per `generate` call against several (left-padded), in one run.

    python benchmarks/judge_batch.py [--pairs 16] [--batch 8] [--judge DIR]

Default judge: the tiny random Qwen3-VL of `examples/tiny_model.py --arch judge`, built in a temp
folder. Its answers are random tokens and run to the 96-token limit, so every call generates the
same number of tokens whatever the batch: the comparison is of batching alone. Images: random
512 x 512 pixels (256 image tokens each, as SD-Turbo's images give Qwen3-VL), one prompt each.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.tiny_model import make_tiny_judge  # noqa: E402
from rewards.judge import load_judge  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=16, help="pairs judged per timing")
    ap.add_argument("--batch", type=int, default=8, help="pairs per generate call, against 1")
    ap.add_argument("--repeats", type=int, default=3, help="timings per batch size (median reported)")
    ap.add_argument("--judge", help="judge folder (default: a tiny random Qwen3-VL)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    image = lambda: Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))
    pairs = [(image(), image(), f"prompt number {i}: a photo of {i} red apples on a table") for i in range(args.pairs)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.judge or str(make_tiny_judge(Path(tmp) / "judge"))
        results, answers = {}, {}
        for batch in (1, args.batch):
            judge = load_judge(folder, batch_size=batch)
            judge(pairs[:batch])  # warm-up
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                answers[batch] = judge(pairs)
                times.append(time.perf_counter() - t)
            results[batch] = statistics.median(times) / len(pairs)
    for batch, s in results.items():
        print(f"batch {batch}: {s:.3f} s per pair")
    print(f"batch {args.batch} is {results[1] / results[args.batch]:.2f}x faster per pair; "
          f"answers equal across batch sizes: {answers[1] == answers[args.batch]}")


if __name__ == "__main__":
    main()
