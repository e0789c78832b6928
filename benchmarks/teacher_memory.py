"""What the teacher features hold in memory on a FLUX-layout transformer with --gradient-checkpointing (docs/cost.md,
"One 24 GB card"). A FLUX transformer of 4 double- and 8 single-stream blocks, 128 wide, at 512 px (1024 image
tokens), K = 8, one update with --features teacher: the peak RSS (VmHWM) of a fresh process. --against DIR runs
another checkout's drpo.py the same way (e.g. a worktree of the commit before the teacher's blocks were
checkpointed one by one), so the difference is what that change saves.

    python benchmarks/teacher_memory.py --against /tmp/before --json benchmarks/results/teacher_memory.json
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(out):
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    sys.path.insert(0, str(ROOT))
    from examples.tiny_model import make_tiny
    pipe = FluxPipeline.from_pretrained(make_tiny(Path(out) / "tiny", arch="flux"))
    torch.manual_seed(0)
    pipe.register_modules(transformer=FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(8, 12, 12)))
    pipe.save_pretrained(Path(out) / "flux")
    return str(Path(out) / "flux")


WORKER = """
import sys, json
sys.path.insert(0, {root!r})
import drpo
rc = drpo.main({argv!r})
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024
print("RESULT " + json.dumps(dict(rc=rc, peak_mb=peak)))
"""


def measure(root, model, features, out):
    argv = ["--model", model, "--reward", "brightness", "--features", features, "--candidates", "8", "--n-pos", "3",
            "--n-neg", "3", "--resolution", "512", "--inference-steps", "1", "--gradient-checkpointing",
            "--grad-accum", "1", "--max-steps", "1", "--eval-every", "0", "--sample-every", "0", "--output-dir", out]
    done = subprocess.run([sys.executable, "-c", WORKER.format(root=str(root), argv=argv)], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if not line:
        sys.exit(done.stderr[-2000:])
    return json.loads(line[7:])["peak_mb"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", help="another checkout's folder")
    ap.add_argument("--json")
    args = ap.parse_args()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = build(tmp)
        for name, root in (("this", ROOT), *((("against", Path(args.against)),) if args.against else ())):
            result[name] = {"teacher_peak_mb": measure(root, model, "teacher", f"{tmp}/{name}")}
            print(name, json.dumps(result[name]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
