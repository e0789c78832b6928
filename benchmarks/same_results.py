"""Does the code of this tree train exactly what an earlier commit trains? Runs the same tiny runs with both and
compares, bitwise: the final LoRA (and every snapshot in loras/), every number of metrics.jsonl that both write
(timings aside) and every sample grid's pixels (a labelled grid's bands aside).

    python benchmarks/same_results.py --base 9c71be9               # every case, about 20 min on 2 CPU cores
    python benchmarks/same_results.py --base 9c71be9 --cases sd,pairs

The earlier commit is extracted with `git archive` into a scratch folder; both trees train on the same tiny
models (built once by the earlier commit's examples/tiny_model.py) with the same flags. Exit code 0 when every
case is equal; the report is also written as JSON with --json.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
SMALL = ["--candidates", "8", "--n-pos", "3", "--n-neg", "3", "--grad-accum", "2", "--lr", "1e-3", "--seed", "0",
         "--max-steps", "3", "--sample-every", "1", "--grid-prompts", "2", "--eval-every", "0"]
FLOW = ["--inference-steps", "4", "--resolution", "128"]
# name -> (tiny model, flags, how it runs: "one" process, "resume" (2 updates, then --resume to the end), "torchrun")
CASES = {
    "sd": ("sd", ["--reward", "brightness", "--max-steps", "2", "--sample-every", "1"], "one"),  # every other default
    "sdxl": ("sdxl", ["--reward", "brightness", *SMALL], "one"),
    "sana": ("sana-sprint", ["--reward", "brightness", *SMALL], "one"),
    "sd3": ("sd3", ["--reward", "brightness", *SMALL, *FLOW], "one"),
    "flux": ("flux", ["--reward", "brightness", *SMALL, *FLOW, "--grad-steps", "1"], "one"),
    "lcm-4": ("sdxl-lcm", ["--reward", "brightness", *SMALL, "--timesteps", "999,749,499,249"], "one"),
    "chunked": ("sd", ["--reward", "brightness", *SMALL, "--grad-chunk", "2", "--gradient-checkpointing"], "one"),
    "latent": ("sd", ["--reward", "brightness", *SMALL, "--features", "latent"], "one"),
    "pairs": ("sd", ["--pairs", "{pairs}", *SMALL], "one"),
    "heldout": ("sd", ["--reward", "brightness", *SMALL, "--eval-every", "1", "--save-lora-every", "1",
                       "--eval-prompts", "{heldout}", "--eval-seeds", "2"], "one"),
    "resume": ("sd", ["--reward", "brightness", *SMALL, "--max-steps", "4", "--save-every", "2"], "resume"),
    "torchrun": ("sd", ["--reward", "brightness", *SMALL, "--grad-accum", "1"], "torchrun"),
}


def tiny_models(base, work, archs):
    """Each tiny pipeline once, by the earlier commit's own builder; sdxl-lcm: the tiny SDXL with LCM."""
    folders = {}
    for arch in sorted(set(archs)):
        folder = work / "models" / arch
        folders[arch] = folder
        if folder.is_dir():
            continue
        if arch == "sdxl-lcm":
            import diffusers
            shutil.copytree(tiny_models(base, work, ["sdxl"])["sdxl"], folder)
            old = diffusers.DDPMScheduler.load_config(folder, subfolder="scheduler")
            diffusers.LCMScheduler.from_config(old).save_pretrained(folder / "scheduler")
            index = json.loads((folder / "model_index.json").read_text())
            index["scheduler"] = ["diffusers", "LCMScheduler"]
            (folder / "model_index.json").write_text(json.dumps(index))
            continue
        subprocess.run([sys.executable, str(base / "examples" / "tiny_model.py"), str(folder), "--arch", arch],
                       check=True, capture_output=True)
    return folders


def train(tree, flags, how, out):
    """Run drpo.py of tree as a user runs it; returns its exit code."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    script = [str(tree / "drpo.py"), *flags, "--output-dir", str(out)]
    if how == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script]
    else:
        cmd = [sys.executable, *script]
    if how == "resume":  # the first 2 updates, then --resume to the end (--max-steps may change on resume)
        done = subprocess.run([*cmd, "--max-steps", "2"], cwd=tree, env=env, capture_output=True, text=True)
        if done.returncode:
            return done.returncode, done.stderr[-2000:]
        cmd = [*cmd, "--resume"]
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    return done.returncode, done.stderr[-2000:]


def same_pictures(a, b):
    """Two grids hold the same images, pixel for pixel. A labelled grid (eval.image_grid since issue 46) adds a band
    of row names on the left, of column names on top (18 px) and maybe a note below: only its images count."""
    from PIL import Image

    x, y = sorted((Image.open(a).convert("RGB"), Image.open(b).convert("RGB")), key=lambda im: im.width)
    if x.size != y.size:  # y is labelled: cut out its images
        y = y.crop((y.width - x.width, 18, y.width, 18 + x.height))
    return x.tobytes() == y.tobytes()


def compare(a, b):
    """Differences between two run folders: LoRA tensors, metrics numbers, grid pixels. [] when equal."""
    import torch
    from safetensors.torch import load_file

    problems = []
    loras = sorted(p.relative_to(a) for p in a.rglob("pytorch_lora_weights.safetensors"))
    if loras != sorted(p.relative_to(b) for p in b.rglob("pytorch_lora_weights.safetensors")):
        problems.append("different LoRA files")
    for rel in loras:
        x, y = load_file(a / rel), load_file(b / rel) if (b / rel).is_file() else {}
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            problems.append(f"{rel}: tensors differ")
    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (a, b)]
    if len(rows[0]) != len(rows[1]):
        problems.append(f"metrics.jsonl: {len(rows[0])} lines against {len(rows[1])}")
    for i, (x, y) in enumerate(zip(*rows)):
        for key in (x.keys() & y.keys()) - {"seconds", "phases_s"}:
            if x[key] != y[key] and not (x[key] != x[key] and y[key] != y[key]):  # NaN equals NaN here
                problems.append(f"metrics.jsonl line {i + 1}, {key}: {x[key]!r} against {y[key]!r}")
    grids = sorted(p.name for p in (a / "samples").glob("*.png")) if (a / "samples").is_dir() else []
    if grids != (sorted(p.name for p in (b / "samples").glob("*.png")) if (b / "samples").is_dir() else []):
        problems.append("different sample grids")
    for name in grids:
        if (b / "samples" / name).is_file() and not same_pictures(a / "samples" / name, b / "samples" / name):
            problems.append(f"samples/{name}: pixels differ")
    return problems, {"loras": len(loras), "metrics_lines": len(rows[0]), "grids": len(grids)}


def main(argv=None):
    ap = argparse.ArgumentParser(description="Train the same tiny runs with this tree and an earlier commit, and "
                                 "compare LoRAs, metrics and sample grids bitwise.")
    ap.add_argument("--base", required=True, help="the earlier commit (anything `git archive` takes)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--work", help="scratch folder (default: a new temporary one, removed at the end)")
    ap.add_argument("--json", help="also write the report here")
    args = ap.parse_args(argv)
    cases = args.cases.split(",")
    if set(cases) - set(CASES):
        ap.error(f"unknown cases {sorted(set(cases) - set(CASES))}; choose from {', '.join(CASES)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="same_results"))
    base = work / "base"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(HERE), "archive", args.base], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
    models = tiny_models(base, work, [CASES[c][0] for c in cases])
    sys.path.insert(0, str(HERE / "benchmarks"))
    from pairs_check import write_texture_pairs  # noqa: E402
    pairs = write_texture_pairs(work / "pairs", side=64)[0]
    heldout = work / "heldout.txt"
    heldout.write_text("a red apple\na blue car\na green field\n")
    report, failed = {"base": args.base, "cases": {}}, False
    for name in cases:
        arch, flags, how = CASES[name]
        flags = ["--model", str(models[arch]), *(f.format(pairs=pairs, heldout=heldout) for f in flags)]
        outs, seconds = {}, {}
        for label, tree in (("base", base), ("this", HERE)):
            outs[label] = work / "runs" / name / label
            shutil.rmtree(outs[label], ignore_errors=True)
            t = time.perf_counter()
            code, err = train(tree, flags, how, outs[label])
            seconds[label] = round(time.perf_counter() - t, 1)
            if code:
                raise SystemExit(f"{name}: drpo.py of {label} exited with {code}:\n{err}")
        problems, counted = compare(outs["base"], outs["this"])
        failed |= bool(problems)
        report["cases"][name] = {"equal": not problems, "problems": problems[:20], **counted, "seconds": seconds}
        print(f"{name:9s} {'bitwise equal' if not problems else 'DIFFERENT'}: {counted['loras']} LoRA file(s), "
              f"{counted['metrics_lines']} metrics lines, {counted['grids']} grid(s)  ({seconds['this']} s)"
              + "".join(f"\n    {p}" for p in problems[:20]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
