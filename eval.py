"""Did DrPO help? Score the base generator and finetuned LoRAs on held-out prompts.

    python eval.py --model sd-turbo --lora runs/drpo --reward pickscore,aesthetic,hpsv3 \
        --prompts prompts.txt --seeds 4 --out eval/

Every model sees the same noise for seed s: torch.randn((1, *latent shape)) from a CPU generator
seeded with s, shared by all prompts (then, for a sampler that adds fresh noise between steps, one more
draw per step from the same generator, as the stock pipeline draws them), sampled exactly as drpo.py trains.
Given a run folder (or one of its loras/ snapshots), the run's model, steps, timesteps and resolution are
used. Each LoRA is compared with the base on the same (prompt, seed) pairs: mean difference, a 95 % paired
bootstrap interval, and the win rate (ties count half).

Writes EVALDIR/results.json, scores.csv (one row per image), table.md (also printed) and
grid.png (first prompts, first seed; base, then each LoRA, left to right).

    python eval.py --lora runs/drpo --snapshots --reward brightness --out steps/

Every loras/step_N of the run, and steps.png: the held-out scores against the update.

    python eval.py --model sd-turbo --lora runs/drpo --geneval evaluation_metadata.jsonl --out geneval/

GenEval: the metadata's prompts, 4 seeds each, every image judged by rewards/geneval.py (its
Mask2Former is transformers' COCO checkpoint, not the benchmark's mmdetection file, so scores are
close to but not the official ones). Prints accuracy per task and the overall score (the mean of
the task accuracies); geneval.csv has each image's verdict and the reason it failed.

    python eval.py --model sd-turbo --lora runs/drpo --judge --prompts prompts.txt --out judge/

Pairwise judge (rewards/judge.py, default Qwen/Qwen3-VL-8B-Instruct): each LoRA against the base,
and each pair of LoRAs, on the same (prompt, seed) images, judged in both orders. Reports the
authors' two rates on the one order their hash picks, the same rates on position-consistent
verdicts (a win only when both orders agree) with a 95 % bootstrap interval over prompts, the
share of pairs whose orders agree, ties and invalid answers; judge.csv has every answer and
images/ the images judged. Alone, it scores no rewards unless --reward is given.

    python eval.py --curves runs/a runs/b --out curves/     # several runs' curves on one figure
"""
import argparse
import csv
import errno
import functools
import io
import itertools
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import torch

import drpo

DEFAULT_REWARDS = "pickscore,aesthetic,clip,hpsv3"
HELDOUT = Path(__file__).resolve().parent / "prompts" / "heldout.txt"  # none of them in drpo.DEFAULT_PROMPTS
RUN_SETTINGS = ("model", "inference_steps", "timesteps", "resolution")  # a run's settings that decide its samples
# Named prompt sets of the paper: hub dataset, split, column.
PROMPT_SETS = {"parti": ("nateraw/parti-prompts", "train", "Prompt"),
               "pickapic": ("yuvalkirstain/pickapic_v2_no_images", "test_unique", "caption")}


def load_prompts(spec, limit=None):
    """A text file (one prompt per line) or a named set fetched with `datasets`."""
    if spec in PROMPT_SETS and not Path(spec).exists():
        repo, split, column = PROMPT_SETS[spec]
        fetch = (f"python -c \"import datasets; print(*datasets.load_dataset('{repo}', split='{split}')"
                 f"['{column}'], sep=chr(10))\" > {spec}.txt")
        try:
            import datasets

            prompts = list(dict.fromkeys(datasets.load_dataset(repo, split=split)[column]))  # unique, in order
        except ImportError as e:
            raise ImportError(f"--prompts {spec} needs the `datasets` package: `pip install datasets`, or pass a "
                              f"text file with one prompt per line") from e
        except Exception as e:  # offline, or the hub refused: say how to get a file
            raise OSError(f"could not fetch the {spec} prompts ({repo}): {str(e).splitlines()[0]}. On a machine with "
                          f"internet run\n  {fetch}\nthen pass --prompts {spec}.txt") from e
    else:
        prompts = drpo.read_prompts(spec)
    return prompts[:limit] if limit else prompts


def network_of(model):
    """(name, network) of --model's trainable network ("unet" or "transformer"), built from its config on the meta
    device: its modules and their shapes, without a single weight loaded."""
    import diffusers
    path, _ = drpo.model_class(model)
    index = diffusers.DiffusionPipeline.load_config(path)
    name = "unet" if "unet" in index else "transformer"
    cls = getattr(diffusers, index[name][1])
    with torch.device("meta"):
        return name, cls.from_config(cls.load_config(path, subfolder=name))


def check_targets(model, targets):
    """drpo.py's --lora-targets: each must name a Linear or Conv2d of the network (peft's rule: the module's name or
    its last dotted parts), checked on network_of(model) before any model loads."""
    name, net = network_of(model)
    layers = [n for n, m in net.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    for target in targets.split(","):
        if not any(n == target or n.endswith("." + target) for n in layers):
            known = sorted({re.sub(r"^.*?\.?([a-z_]+[a-z_0-9]*(\.\d+)?)$", r"\1", n) for n in layers})
            raise ValueError(f"--lora-targets: {target!r} names no Linear or Conv2d layer of this {name}; its layers "
                             f"end in {', '.join(known)}")


def check_lora(network, folder):
    """Refuse a LoRA that does not fit the generator's network (diffusers would load mismatched shapes silently).
    network: network_of(--model), so this runs before any model loads."""
    from safetensors.torch import load_file

    path = Path(folder) / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"--lora {folder}: no pytorch_lora_weights.safetensors there; pass the --output-dir "
                                f"of a drpo.py run, one of its loras/ folders, or any diffusers-format LoRA folder")
    try:
        weights = load_file(path)
    except Exception as e:  # safetensors' errors for a cut or foreign file
        raise ValueError(f"--lora {folder}: {path} is damaged or not a safetensors file ({e}); save it again, or "
                         f"pass another LoRA") from None
    name, net = network
    modules = dict(net.named_modules())
    found = 0
    for key, w in weights.items():
        m = re.fullmatch(rf"{name}\.(.+)\.(lora\.down|lora\.up|lora_A|lora_B)(\.default)?\.weight", key)
        if not m:
            continue
        found += 1
        module, down = modules.get(m[1]), m[2] in ("lora.down", "lora_A")
        if module is None:
            raise ValueError(f"--lora {folder} adapts {m[1]}, which this --model does not have: a LoRA trained "
                             f"for another architecture? Evaluate it with the model it was trained on")
        fan = module.in_features if down else module.out_features
        if w.shape[1 if down else 0] != fan:
            raise ValueError(f"--lora {folder}: {key} has shape {tuple(w.shape)} but {m[1]} has "
                             f"{'in' if down else 'out'} features {fan}: a LoRA for another architecture?")
    if not found:
        raise ValueError(f"--lora {folder} holds no LoRA weights for this model (keys `{name}.*.lora.down/up"
                         f".weight`): a LoRA for another family? Evaluate it with the model it was trained on")


def seed_noises(model, resolution, seeds):
    """The noises of seed s, shared by every prompt and model, (seeds, draws, *latent shape): torch.randn((1, *latent
    shape)) from a CPU generator seeded with s, then one draw per step if the sampler adds fresh noise, in the
    stock pipeline's order (latent shape: (4, H/8, W/8) for SD and SDXL, (32, H/32, W/32) for SANA)."""
    shape, gens = drpo.latent_shape(model, resolution), [torch.Generator().manual_seed(s) for s in seeds]
    return torch.stack([torch.cat([torch.randn((1, *shape), generator=g) for _ in range(drpo.noise_draws(
        model.recipe))]) for g in gens])


def metrics_of(spec, loaded=None, device="cpu", batch_size=8, dtype=None, **paths):
    """A reward spec as metrics scored one by one, {name: reward}: an ensemble's members apart, unweighted (their
    z-scored sum has mean 0 over any prompt's images); a member of the loaded reward is reused, not loaded again."""
    members = getattr(loaded, "members", {})
    return {name: members.get(name) or drpo.load_reward(name, device, batch_size, dtype, **paths)
            for name, _, _ in drpo.parse_reward_spec(spec)}


@torch.no_grad()
def heldout_scores(model, prompts, noises, metrics, phi=None, each=None):
    """Every prompt sampled on every noise, one prompt at a time, each image scored by every metric: what eval.py
    reports and drpo.py logs while it trains (--eval-every). Returns ({metric: (prompts * noises,) scores,
    prompt-major}, (prompts,) spread of each prompt's samples over the noises, or None without phi or with one
    noise). phi sees the clean samples (feature noise 0); each(i, images) is called with every prompt's images."""
    scores, spreads = {m: [] for m in metrics}, []
    for i, prompt in enumerate(prompts):
        x, cond = sample(model, [prompt], noises)
        images = drpo.to_pil(drpo.decode(model.pipe.vae, x))
        for m, fn in metrics.items():
            scores[m].append(fn(images, [prompt] * len(images)).double())
        if phi is not None and len(noises) > 1:
            spreads.append(drpo.spread(phi(x, torch.zeros_like(x), cond), len(noises)).double())
        if each:
            each(i, images)
    cat = lambda v: torch.cat(v) if v else torch.zeros(0, dtype=torch.float64)
    return {m: cat(v) for m, v in scores.items()}, cat(spreads) if spreads else None


def run_of(folder):
    """config.json of the drpo.py run a LoRA folder comes from: the run folder itself, or RUN for a snapshot
    RUN/loras/step_N (or RUN/loras/best); None for a LoRA from elsewhere."""
    folder = Path(folder).resolve()
    for run in (folder, folder.parent.parent) if folder.parent.name == "loras" else (folder,):
        cfg = run / "config.json"
        if cfg.is_file() and {"candidates", "model"} <= set(config := drpo.beside("run_folder").read_json(cfg)):
            config.setdefault("timesteps", config.get("timestep") and [config["timestep"]])  # a run before 2026-12
            count = lambda v, most=10 ** 4: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= most
            for key, ok, what in (("model", lambda v: isinstance(v, str) and v, "a model name"),
                                  ("inference_steps", count, "a step count"), ("resolution", count, "a side in px"),
                                  ("timesteps", lambda v: isinstance(v, list) and all(count(t + 1) for t in v),
                                   "a list of timesteps"),
                                  ("eval_prompts", lambda v: isinstance(v, str), "a file name"),
                                  ("eval_seeds", count, "a number of seeds")):
                if config.get(key) is not None and not ok(config[key]):
                    raise ValueError(f"{cfg}: {key} is {config[key]!r}, not {what}; repair the run's config.json, or "
                                     f"give --{key.replace('_', '-').replace('eval-', '')} to eval.py")
            return config
    return None


def take_run_settings(args):
    """--model, --inference-steps, --timesteps and --resolution of the runs the --lora folders come from, where not
    given. A given flag that contradicts a run is refused, unless --override; runs that disagree are refused."""
    runs = {f: c for f in args.lora if (c := run_of(f))}
    shown = lambda v: "unset (the model's default)" if v is None else ",".join(map(str, v)) if isinstance(
        v, (list, tuple)) else v
    same = lambda key, a, b: drpo.resolve_model(a) == drpo.resolve_model(b) if key == "model" else \
        json.dumps(a) == json.dumps(b)  # (timesteps: a tuple given, a list in config.json)
    for key in RUN_SETTINGS:
        given, seen, flag = getattr(args, key), [(f, c.get(key)) for f, c in runs.items()], key.replace("_", "-")
        if given is not None and args.override:
            continue
        for (f, v), (g, w) in itertools.combinations(seen, 2):
            if not same(key, v, w):
                raise ValueError(f"--lora {f} was trained with --{flag} {shown(v)} but --lora {g} with {shown(w)}: "
                                 f"evaluate them in separate eval.py runs")
        for f, v in seen:
            if given is not None and not same(key, given, v):
                raise ValueError(f"--{flag} {shown(given)} contradicts the run of --lora {f}, trained with --{flag} "
                                 f"{shown(v)}, so its LoRA would be judged on images unlike those it learned from. "
                                 f"Drop --{flag} to use the run's, or add --override to evaluate with it anyway")
        if given is None and seen:
            setattr(args, key, seen[0][1])
    args.model = args.model or "sd-turbo"
    return runs


class Watch:
    """drpo.py's held-out evaluation (--eval-every): heldout_scores of fixed (prompt, seed) images, so each figure
    equals eval.py's for that update's LoRA. Process r of a torchrun job scores prompts r, r + world, ..., rank 0
    gathers them, appends a metrics.jsonl line and keeps loras/best. The base is scored once per (re)start and
    logged at update 0. Nothing here draws from the training's random state. A stop signal (stop_asked, drpo's
    deferred_signals) cuts an evaluation short between prompts (drpo.Stopped); a resumed run evaluates that update
    first, so its metrics are the uninterrupted run's. Beside the rewards, each image's statistics (ImageStats) are
    logged as eval/drift/NAME; one that moves far from the base's says so once (warning signs, docs/running.md)."""

    def __init__(self, args, model, phi, reward, step, rank, world, stop_asked=(), tracker=None):
        device = drpo.reward_device_of(args.reward_device, model.net.device, int(os.environ.get("LOCAL_RANK", 0)))
        paths = drpo.reward_options(args)
        self.args, self.model, self.phi, self.rank, self.world, self.out = args, model, phi, rank, world, \
            Path(args.output_dir)
        self.prompts = heldout_prompts(args)
        self.noises = seed_noises(model, args.resolution, range(args.eval_seeds))
        self.metrics = metrics_of(args.eval_reward or args.reward, reward, device, args.reward_batch,
                                  drpo.precision_dtype(args.reward_precision, device),
                                  geneval_metadata=args.eval_prompts, **paths)
        self.first, self.best, self.last = f"eval/{next(iter(self.metrics))}", (None, -math.inf), None
        self.metrics |= ImageStats().metrics  # drift/NAME, scored like a reward
        self.stop_asked, self.tracker, self.warned = stop_asked, tracker, set()
        with drpo.lora_off(model.net):
            self.base = self.score("the base", stoppable=False)
        if step == 0:
            self.log(0, self.base)
            return
        rows = [row for row in drpo.beside("run_folder").read_metrics(self.out / "metrics.jsonl") if self.first in row]
        self.warned = {k for row in rows for k in row.get("warnings", {})}  # said once, over a resume too
        if rank == 0 and rows:  # resumed: the best of the updates logged so far
            top = max(rows, key=lambda row: row[self.first])  # the first of equals, as during the run
            self.best, self.last = (top["step"], top[self.first]), rows[-1]
            point_best(self.out, top["step"])
        if not any(row["step"] == step for row in rows):  # a stop cut this update's evaluation short
            self(step)

    def due(self, step):
        return step % self.args.eval_every == 0 or step == self.args.max_steps

    def score(self, what, stoppable=True):
        """({metric: (prompts * seeds,)}, (prompts,) spreads or None), every process's share gathered on all."""
        from tqdm import tqdm
        mine = self.prompts[self.rank::self.world]
        bar = tqdm(total=len(mine), desc=f"held-out evaluation of {what}", leave=False, dynamic_ncols=True,
                   disable=self.rank != 0)
        self.images = []

        def each(i, images):
            if stoppable and self.stop_asked:
                raise drpo.Stopped(f"a stop signal during the held-out evaluation of {self.args.output_dir}")
            self.images += images[:1] if i < self.args.grid_prompts else []  # the first seed: the tracker's grid
            bar.update(1)
        cuda = [self.model.net.device] if self.model.net.device.type == "cuda" else []
        try:
            with drpo.all_or_none(self.world), torch.random.fork_rng(devices=cuda):
                mine = heldout_scores(self.model, mine, self.noises, self.metrics, self.phi, each)
        finally:
            bar.close()
        if self.world == 1:
            return mine
        shares = [None] * self.world
        torch.distributed.all_gather_object(shares, mine)
        S, P = len(self.noises), len(self.prompts)

        def joined(pick, per):  # rank r's j-th prompt is prompt r + j * world
            full = torch.zeros(P, per, dtype=torch.float64)
            for r, share in enumerate(shares):
                full[r::self.world] = pick(share).view(-1, per)
            return full.flatten()
        scores = {m: joined(lambda sh: sh[0][m], S) for m in self.metrics}
        return scores, None if mine[1] is None else joined(lambda sh: sh[1], 1)

    def __call__(self, step):
        """Every --eval-every updates and at the last, evaluate the LoRA of this update; True on rank 0 when it is the
        best so far (its snapshot then saved)."""
        return self.due(step) and self.log(step, self.score(f"update {step}"))

    def log(self, step, result):
        scores, spreads = result
        if self.rank:
            return False
        row = {"step": step}
        for m, s in scores.items():
            row[f"eval/{m}"], row[f"eval/{m}_gain"] = s.mean().item(), (s - self.base[0][m]).mean().item()
            if not step and m.startswith("drift/"):  # the spread over the base's images its warnings measure against
                row[f"eval/{m}_spread"] = s.std().item()
        if spreads is not None:
            row["eval/spread_seeds"] = spreads.mean().item()
            row["eval/spread_seeds_vs_base"] = (spreads.mean() / self.base[1].mean().clamp_min(1e-12)).item()
        if step and (signs := self.warning_signs(row)):
            from tqdm import tqdm
            row["warnings"] = signs
            for sign in signs.values():
                tqdm.write(f"warning: {sign}", file=sys.stderr)  # where the bars are
        best = row[self.first] > self.best[1]
        self.best = (step, row[self.first]) if best else self.best
        self.last = {**row, "best_step": self.best[0]}
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(self.last) + "\n")
        if self.tracker:
            self.tracker.log(self.last, step)
            shown = self.prompts[::self.world][:len(self.images)]  # rank 0's first prompts, their first seed
            self.tracker.image("eval/images", image_grid(self.images, 1, shown, (f"update {step}",),
                                                         random_model_note(self.args.model)), step)
        if best:
            save_snapshot(self.out, self.model, self.args, step, self.last, best=True)
        return best

    def warning_signs(self, row):
        """{statistic: what it says}, once per statistic and run: an image statistic whose mean moved more than
        DRIFT_WARN of its spread over the base's images, or a diversity fallen below SPREAD_WARN of the base's."""
        signs = {}
        for m in (m for m in self.metrics if m.startswith("drift/")):
            spread = self.base[0][m].std().item()
            if abs(row[f"eval/{m}_gain"]) > DRIFT_WARN * spread and m not in self.warned:
                signs[m] = (f"update {row['step']}: the held-out images' {m[6:]} moved {row[f'eval/{m}_gain']:+.3g} "
                            f"from the base's, {abs(row[f'eval/{m}_gain']) / max(spread, 1e-12):.1f}x its spread "
                            f"over the base's images: look at them for reward hacking (docs/running.md)")
        if row.get("eval/spread_seeds_vs_base", 1) < SPREAD_WARN and "spread" not in self.warned:
            signs["spread"] = (f"update {row['step']}: the held-out images' diversity over seeds fell to "
                               f"{row['eval/spread_seeds_vs_base']:.2f} of the base's: a collapse onto one look?")
        self.warned |= set(signs)
        return signs


DRIFT_WARN, SPREAD_WARN = 1.0, 0.5  # see docs/running.md, "Warning signs"


class ImageStats:
    """Statistics of images that a reward may not measure, each a metric (images, prompts) -> (n,) tensor named
    drift/NAME; the statistics of a call's images are computed once for all of them."""
    NAMES = ("brightness", "saturation", "contrast", "dark_fraction", "bright_fraction", "edge_density",
             "colour_entropy", "jpeg_kb")

    def __init__(self):
        self.images, self.values = None, None
        self.metrics = {f"drift/{name}": functools.partial(self.statistic, name) for name in self.NAMES}

    def statistic(self, name, images, prompts):
        if images is not self.images:
            self.images, self.values = images, [image_statistics(im) for im in images]
        return torch.tensor([v[name] for v in self.values], dtype=torch.float64)


def image_statistics(image):
    """One image's: mean luma (brightness), HSV saturation, luma's standard deviation (contrast), the fractions of
    pixels darker than 0.1 and brighter than 0.9, the fraction of pixels on an edge (luma gradient above 0.1), the
    entropy in bits of an 8x8x8 colour histogram, and its size as a JPEG of quality 75 in kB (complexity)."""
    import numpy as np
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    luma, top, low = rgb @ np.array([0.299, 0.587, 0.114]), rgb.max(-1), rgb.min(-1)
    edges = np.abs(np.diff(luma, axis=0))[:, :-1] + np.abs(np.diff(luma, axis=1))[:-1]
    counts = np.histogramdd(rgb.reshape(-1, 3), bins=8, range=[(0, 1)] * 3)[0].ravel()
    p = counts[counts > 0] / counts.sum()
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=75)
    return {"brightness": luma.mean(), "saturation": ((top - low) / np.maximum(top, 1e-8)).mean(),
            "contrast": luma.std(), "dark_fraction": (luma < 0.1).mean(), "bright_fraction": (luma > 0.9).mean(),
            "edge_density": (edges > 0.1).mean(), "colour_entropy": -(p * np.log2(p)).sum(),
            "jpeg_kb": buf.tell() / 1000}


PAIRWISE_VLM = ("it ranks each prompt's images against the first of them, so its mean is about 0.5 for any model "
                "and compares nothing across models")


def heldout_prompts(args):
    """The held-out prompts a run watches (none without --eval-every)."""
    return drpo.read_prompts(args.eval_prompts or HELDOUT, "--eval-prompts") if args.eval_every else []


def check_watch(args):
    """drpo.py's --eval-* and --save-lora-every, checked before any model loads (default --eval-every resolved)."""
    if args.eval_every is None:
        args.eval_every = 25 if (args.reward or args.eval_reward) else 0
    if args.eval_every and not (args.reward or args.eval_reward):
        raise ValueError("--eval-every: with --pairs there is no training reward to evaluate with; name one with "
                         "--eval-reward (e.g. pickscore), or pass --eval-every 0")
    if not args.eval_every:
        return
    drpo.read_prompts(args.eval_prompts or HELDOUT, "--eval-prompts")
    if args.eval_reward is None and args.reward and "vlm" in [n for n, _, _ in drpo.parse_reward_spec(args.reward)]:
        args.eval_reward = "vlm-rating"  # the same server rates each image: pairwise scores compare no two models
    try:
        names = [name for name, _, _ in drpo.parse_reward_spec(args.eval_reward or args.reward)]
    except ValueError as e:
        raise ValueError(f"--eval-reward {args.eval_reward}: {e}" if args.eval_reward else str(e)) from e
    if "geneval" in names and not str(args.eval_prompts).endswith(".jsonl"):
        raise ValueError("--eval-reward geneval (or a geneval training reward) needs --eval-prompts "
                         "evaluation_metadata.jsonl: GenEval reads each prompt's checks there")
    if "vlm" in names:
        raise ValueError(f"--eval-reward vlm cannot watch the run: {PAIRWISE_VLM}; pass --eval-reward vlm-rating "
                         f"(the same server rates each image) or another reward")


def save_snapshot(out, model, args, step, heldout, best=False):
    """loras/step_NNNNNN/: the LoRA of this update and its card, a folder to upload or load (no optimizer state: that
    is in the run folder's checkpoint.pt). Written aside first, so a full disk loses no earlier snapshot; with
    best, loras/best (a relative symlink) then points to it."""
    snap = out / "loras" / f"step_{step:06d}"
    tmp = snap.with_name(f".{snap.name}.saving")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        drpo.save_lora(model, tmp, model_card(args, model, step, heldout, snap))
        shutil.rmtree(snap, ignore_errors=True)
        os.replace(tmp, snap)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise drpo.beside("run_folder").disk_full(out, step) from e
        raise
    if best:
        point_best(out, step)


def point_best(out, step):
    """loras/best -> step_NNNNNN, replaced atomically (None: removed)."""
    link, tmp = out / "loras" / "best", out / "loras" / ".best.link"
    tmp.unlink(missing_ok=True)
    if link.is_dir() and not link.is_symlink():  # a copy (a run folder copied without symlinks)
        shutil.rmtree(link)
    if step is None:
        return link.unlink(missing_ok=True)
    os.symlink(f"step_{step:06d}", tmp)
    os.replace(tmp, link)


@torch.no_grad()
def sample(model, prompts, noises):
    """Samples of every prompt on every noise (prompt-major), LoRA as set: (latents, their conditioning)."""
    cond = drpo.rows(model.conditioning(prompts, noises.shape[-1] * model.pipe.vae_scale_factor),
                lambda v: v.repeat_interleave(len(noises), 0))
    z = noises.repeat(len(prompts), *[1] * (noises.dim() - 1)).to(model.net.device, model.net.dtype)
    return drpo.generate(model.net, z, cond, model.recipe), cond


def sample_images(model, prompts, noises):
    """sample() as PIL images."""
    return drpo.to_pil(drpo.decode(model.pipe.vae, sample(model, prompts, noises)[0]))


def image_grid(images, cols, rows=(), columns=(), note=None):
    """Paste equally sized PIL images row by row into one image, cols per row, labelled: each row's name (a prompt,
    shortened) in a band on the left, each column's (a noise, a model, an update) in a band on top, and a note
    (e.g. that the model has random weights) in a band below."""
    from PIL import Image, ImageDraw, ImageFont
    w, h = images[0].size
    font = ImageFont.load_default(size=12)
    left, top, bottom = 150 * bool(rows), 18 * bool(columns), 18 * bool(note)
    width = max(left + w * cols, math.ceil(font.getlength(note or "")) + 8)  # the note fits
    grid = Image.new("RGB", (width, top + h * math.ceil(len(images) / cols) + bottom), "white")
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        grid.paste(im, (left + (i % cols) * w, top + (i // cols) * h))
    for r, name in enumerate(rows):
        draw.text((4, top + r * h + h // 2), name if len(name) <= 24 else name[:23] + "…", fill="black", font=font,
                  anchor="lm")
    for c, name in enumerate(columns):
        draw.text((left + c * w + w // 2, top // 2), str(name)[:max(4, w // 7)], fill="black", font=font, anchor="mm")
    if note:
        draw.text((4, grid.height - bottom // 2), note, fill="firebrick", font=font, anchor="lm")
    return grid


def random_model_note(model):
    """What a grid of a tiny random model (examples/tiny_model.py marks its folders) should say about its images."""
    marked = (Path(drpo.resolve_model(model)) / "RANDOM_WEIGHTS.txt").is_file()
    return "random weights: coloured noise, not pictures" if marked else None


def model_card(args, model, step, heldout, folder):
    """A LoRA folder's README.md, laid out like the model cards of the diffusers LoRA training scripts (YAML
    metadata, then text): the stock call that samples what training sampled, the reward, the updates done."""
    base = drpo.resolve_model(args.model)
    side = drpo.latent_shape(model, args.resolution)[-1] * model.pipe.vae_scale_factor
    call, hub = {**model.stock_call, "height": side, "width": side}, not Path(base).exists()  # hub: a hub id
    figures = ", ".join(f"`{k}` {v:.4g}" for k, v in (heldout or {}).items() if k.startswith("eval/"))
    signal = f"the reward `{args.reward}`" if args.reward else f"the preference pairs of `{args.pairs}`"
    return "\n".join([
        "---", *([f"base_model: {base}"] if hub else []), "library_name: diffusers", "tags:", "- text-to-image",
        "- diffusers", "- lora", "- drpo", "inference: true", "---", "",
        f"# DrPO LoRA for {base}", "",
        f"LoRA weights for `{base}` ({type(model.pipe).__name__}), finetuned with DrPO (Drifting Preference "
        f"Optimization, arXiv 2606.02521) toward {signal}, after {step} updates.", "",
        "## How to use", "", "```python", f"from diffusers import {type(model.pipe).__name__}",
        f"pipe = {type(model.pipe).__name__}.from_pretrained({base!r})",
        f"pipe.load_lora_weights({str(folder)!r})",
        f"image = pipe(\"a photo of a cat\", {', '.join(f'{k}={v!r}' for k, v in call.items())}).images[0]", "```", "",
        "These keywords sample what training sampled (the same steps, timesteps and image size); other settings "
        "give other images.", "",
        "## Training details", "",
        f"- updates: {step}; LoRA rank {args.lora_rank}, alpha {args.lora_alpha}, on `{args.lora_targets}`",
        f"- K = {args.candidates} candidates per prompt, {args.n_pos} positives / {args.n_neg} negatives, features "
        f"`{args.features}`, lr {args.lr}, seed {args.seed}",
        f"- held-out evaluation (update {heldout['step']}): {figures}" if figures else "- no held-out evaluation yet",
        "- every setting of the run: the run folder's config.json; the optimizer state that `--resume` needs is "
        "its checkpoint.pt, kept out of LoRA folders so that what is shared holds the weights only", ""])


def paired_stats(base, tuned, resamples=10_000, seed=0):
    """Mean difference, 95 % percentile-bootstrap interval of it, and win rate (ties = 1/2)."""
    d, g = tuned - base, torch.Generator().manual_seed(seed)
    means = torch.cat([d[torch.randint(len(d), (1000, len(d)), generator=g)].mean(1)  # 1000 resamples at a time
                       for _ in range(resamples // 1000)])
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=d.dtype)).tolist()
    return {"mean": tuned.mean().item(), "std": tuned.std().item(), "diff_vs_base": d.mean().item(),
            "ci95": [lo, hi], "win_rate": ((d > 0).double() + 0.5 * (d == 0).double()).mean().item()}


def markdown_table(scores):
    rewards = list(scores)
    lines = ["| model | " + " | ".join(rewards) + " |", "| --- |" + " --- |" * len(rewards)]
    for label in scores[rewards[0]]:
        cells = []
        for r in rewards:
            s = scores[r][label]
            cell = f"{s['mean']:.4g}" + (f" ± {s['std']:.2g}" if math.isfinite(s["std"]) else "")  # one image: no ±
            if "diff_vs_base" in s:
                cell += (f" ({s['diff_vs_base']:+.3g} [{s['ci95'][0]:+.3g}, {s['ci95'][1]:+.3g}], "
                         f"win {100 * s['win_rate']:.0f}%)")
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def geneval_tasks(metadata, correct, n_seeds):
    """{model: {task: accuracy in %, ..., "overall": mean of the task accuracies}} from 0/1 scores."""
    tags = [m["tag"] for m in metadata for _ in range(n_seeds)]
    tasks = {}
    for label, c in correct.items():
        acc = {t: 100 * c[[i for i, tag in enumerate(tags) if tag == t]].mean().item() for t in dict.fromkeys(tags)}
        tasks[label] = {**acc, "overall": sum(acc.values()) / len(acc)}
    return tasks


def tasks_table(tasks):
    cols = list(next(iter(tasks.values())))
    lines = ["| GenEval (%) | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    return "\n".join(lines + [f"| {label} | " + " | ".join(f"{a[c]:.1f}" for c in cols) + " |"
                              for label, a in tasks.items()])


def write_verdicts(path, metadata, seeds, labels, verdicts):
    """geneval.csv: one row per image with its verdict and, when wrong, why (verdicts in generation order)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "prompt_index", "seed", "tag", "prompt", "correct", "reason"])
        rows = [(label, i, s, m["tag"], m["prompt"]) for label in labels for i, m in enumerate(metadata) for s in seeds]
        for row, (correct, reason) in zip(rows, verdicts):
            w.writerow([*row, int(correct), reason])


def read_template(path):
    """--judge-template FILE: the judge's instruction exactly as written (None: the port's own)."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(f"--judge-template {path}: no such file; write the instruction, with {{prompt}} "
                                f"where the prompt goes, in a text file")
    text = Path(path).read_text(encoding="utf-8")
    if "{prompt}" not in text:
        raise ValueError(f"--judge-template {path} has no {{prompt}} field; write {{prompt}} where the prompt goes")
    return text


def image_path(out, label, prompt_index, seed):
    return out / "images" / label / f"{prompt_index:05d}_{seed}.png"


def judge_all(judge, labels, prompts, seeds, out, batch_size):
    """Judge each LoRA against the base and each pair of LoRAs, every (prompt, seed) in both orders.
    Writes judge.csv (one row per pair and order); returns {"X vs Y": statistics of X}."""
    from PIL import Image
    from tqdm import tqdm

    J = drpo.beside("rewards.judge")
    comparisons = [(x, "base") for x in labels[1:]] + list(itertools.combinations(labels[1:], 2))
    jobs = [(x, y, i, s, a, b) for x, y in comparisons for i in range(len(prompts)) for s in seeds
            for a, b in ((x, y), (y, x))]  # (model in slot A, model in slot B)
    answers = []
    for k in tqdm(range(0, len(jobs), batch_size), desc="judge", dynamic_ncols=True):  # images read batch by batch
        answers += judge([(Image.open(image_path(out, a, i, s)), Image.open(image_path(out, b, i, s)), prompts[i])
                          for _, _, i, s, a, b in jobs[k:k + batch_size]])
    rows, winners = [], {}
    for (x, y, i, s, a, b), answer in zip(jobs, answers):
        verdict = J.parse_verdict(answer)
        winner = winners.setdefault((x, y, i, s), {})[a == x] = J.winner_of(verdict, a, b)  # key: X shown as A
        rows.append({"comparison": f"{x} vs {y}", "prompt_index": i, "seed": s, "prompt": prompts[i], "model_a": a,
                     "model_b": b, "authors_order": int(J.swapped(i, s) == (a == y)), "answer": answer,
                     "verdict": verdict or "invalid", "winner": winner or "invalid"})
    with open(out / "judge.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    results = {}
    for x, y in comparisons:
        pairs = [winners[x, y, i, s] for i in range(len(prompts)) for s in seeds]
        one = [w[not J.swapped(i, s)] for w, (i, s) in zip(pairs, itertools.product(range(len(prompts)), seeds))]
        both = [J.consistent(w[True], w[False]) for w in pairs]
        valid = [w for w in pairs if None not in w.values()]
        said = [v for w in pairs for v in w.values()]
        per_prompt = [both[i * len(seeds):(i + 1) * len(seeds)] for i in range(len(prompts))]
        results[f"{x} vs {y}"] = {
            "one_order": J.rates(one, x),  # the authors' protocol: X as image A unless their hash swaps
            "consistent": {**J.rates(both, x), "ci95": J.preference_ci(per_prompt, x)},
            "agreement": sum(w[True] == w[False] for w in valid) / len(valid) if valid else math.nan,
            "tie_answers": said.count("tie"), "invalid_answers": said.count(None), "answers": len(said)}
    return results


def judge_table(judged):
    lines = ["| judge: first model vs second | one order: win rate | one order: preference | consistent: win rate "
             "| consistent: preference [95 % CI] | orders agree | tie / invalid answers |", "| --- |" + " --- |" * 6]
    pct = lambda v: "–" if math.isnan(v) else f"{100 * v:.1f} %"
    for name, r in judged.items():
        one, con = r["one_order"], r["consistent"]
        lines.append(f"| {name} | {pct(one['win_rate'])} | {pct(one['preference'])} | {pct(con['win_rate'])} | "
                     f"{pct(con['preference'])} [{pct(con['ci95'][0])}, {pct(con['ci95'][1])}] | "
                     f"{pct(r['agreement'])} | {r['tie_answers']} / {r['invalid_answers']} of {r['answers']} |")
    return "\n".join(lines)


def plot_curves(runs, path):
    """curves.png, one line per run over updates: the training reward's mean and spread beside the held-out scores
    (eval/NAME, from --eval-every: a training reward that keeps rising while these fall is being hacked), the
    diversity, the gap, the distance to the base samples and the gradient norm (on pairs: the distances to the
    chosen and rejected images instead of the reward). matplotlib is imported here only: the method needs torch."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("curves.png skipped: `pip install matplotlib` to draw it", file=sys.stderr)
        return
    fig, axes = plt.subplots(2, 3, figsize=(14, 6.8))
    (train_ax, eval_ax, spread_ax), rest = axes
    lasts = []
    for run in map(Path, runs):
        rows = drpo.beside("run_folder").read_metrics(run / "metrics.jsonl")
        held = [r for r in rows if any(k.startswith("eval/") for k in r)]
        rows = [r for r in rows if r not in held]
        col = {k: [r.get(k, math.nan) for r in rows] for k in (rows[-1] if rows else ())}
        lasts += rows[-1:]
        if "reward_mean" in col:
            mean, std = col["reward_mean"], col["reward_std"]
            train_ax.plot(col["step"], mean, label=run.name)
            train_ax.fill_between(col["step"], [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                  alpha=0.2)
        elif col:
            train_ax.plot(col["step"], col["dist_pos"], label=f"{run.name}: chosen")
            train_ax.plot(col["step"], col["dist_neg"], "--", label=f"{run.name}: rejected")
        names = [k for k in (held[0] if held else ()) if k.startswith("eval/") and not k.endswith("_gain")
                 and not k.startswith(("eval/spread", "eval/drift/"))]  # the rewards (drift/: metrics.jsonl)
        for k in names:
            eval_ax.plot([r["step"] for r in held], [r[k] for r in held], marker=".", label=f"{run.name}: {k[5:]}")
        if "spread_candidates" in col:
            spread_ax.plot(col["step"], col["spread_candidates"], label=f"{run.name}: K candidates (training)")
        if held and "eval/spread_seeds" in held[0]:
            spread_ax.plot([r["step"] for r in held], [r["eval/spread_seeds"] for r in held], marker=".",
                           label=f"{run.name}: held-out seeds")
        for ax, key in zip(rest, ("gap", "dist_ref", "grad_norm")):
            ax.plot(col.get("step", []), col.get(key, []))
    kinds = {"reward_mean" in r or "dist_pos" not in r for r in lasts}  # True: a reward run, False: --pairs
    pick = lambda reward, pairs: " / ".join(t for t, k in ((reward, True), (pairs, False)) if k in kinds)
    ranked = pick("training reward, mean ± std", "distance to chosen / rejected")
    gap = pick("positives − negatives", "rejected − chosen distance")
    for ax, title in zip(axes.flat, (ranked, "held-out scores (update 0: the base)", "diversity: feature spread of a "
                                     "prompt's samples", f"gap: {gap}", "feature distance to the base samples",
                                     "gradient norm (before clipping)")):
        ax.set(title=title, xlabel="update")
    for ax in (train_ax, eval_ax, spread_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    drpo.atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


def build_parser():
    p = argparse.ArgumentParser(description="Compare a base one- or few-step generator with DrPO LoRAs on held-out "
                                "prompts.", formatter_class=drpo.HelpFormatter)
    p.add_argument("--model", help=f"an alias ({', '.join([*drpo.MODEL_ALIASES, *drpo.TINY_MODELS])}), a hub id or "
                   "a diffusers pipeline folder (default: the --lora runs' model, else sd-turbo)")
    p.add_argument("--lora", action="append", default=[], help="a drpo.py --output-dir, one of its loras/step_N or "
                   "loras/best, or any diffusers-format LoRA folder; repeat to compare several; labelled by folder "
                   "name. A run's --model, --inference-steps, --timesteps and --resolution are used unless given")
    p.add_argument("--snapshots", action="store_true", help="evaluate every loras/step_N of the --lora runs and draw "
                   "OUT/steps.png, the held-out scores against the update")
    p.add_argument("--override", action="store_true", help="evaluate with a --model, steps, timesteps or "
                   "--resolution that contradicts the --lora run's (refused without it)")
    p.add_argument("--reward", help=f"comma list of metrics, each a drpo.py reward name or `module:function` "
                   f"(default: {DEFAULT_REWARDS}; none with --judge or --geneval)")
    p.add_argument("--prompts", help="text file with one prompt per line, or `parti` / `pickapic` (the paper's sets, "
                   "fetched from the hub with `datasets`; default: the run's --eval-prompts, else prompts/heldout.txt)")
    p.add_argument("--geneval", metavar="FILE.jsonl", help="run GenEval on its evaluation_metadata.jsonl instead of "
                   "rewards on --prompts")
    p.add_argument("--judge", nargs="?", const="Qwen/Qwen3-VL-8B-Instruct", metavar="MODEL",
                   help="judge every pair of models in both image orders with a vision-language model: a hub id or "
                   "folder (default when given alone: Qwen/Qwen3-VL-8B-Instruct; docs/evaluation.md)")
    p.add_argument("--judge-template", metavar="FILE", help="the judge's instruction, verbatim, with a {prompt} field "
                   "(default: rewards/judge.py's INSTRUCTION)")
    p.add_argument("--judge-batch", type=int, default=8, help="pairs per judge generate call")
    p.add_argument("--curves", nargs="+", metavar="RUN_DIR", help="instead of evaluating: draw the curves of these "
                   "drpo.py runs (their metrics.jsonl) on one figure, OUT/curves.png")
    p.add_argument("--paper-scales", action="store_true", help="report ImageReward x10 as the paper's tables do "
                   "(PickScore and aesthetic are reported as computed)")
    p.add_argument("--max-prompts", type=int, help="use only the first N prompts")
    p.add_argument("--seeds", type=int, help="noises per prompt: seeds 0 .. N-1 (default: the run's --eval-seeds, "
                   "else 4)")
    p.add_argument("--out", default="eval", help="folder for results.json, scores.csv, table.md, grid.png")
    p.add_argument("--resolution", type=int, help="image side in pixels (default: the run's, else the model's native "
                   "size)")
    p.add_argument("--inference-steps", type=int, help="the generator's sampling steps (default: the run's, else the "
                   "model's own)")
    p.add_argument("--timesteps", "--timestep", type=drpo.ints, help="a UNet scheduler's timesteps, one per step "
                   "(default: the run's, else the stock pipeline's)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="generator dtype; auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--reward-device", help="device of the reward models (default: --device)")
    p.add_argument("--reward-batch", type=int, default=8, help="images per reward call")
    drpo.add_reward_path_flags(p)
    p.add_argument("--grid-prompts", type=int, default=4, help="rows of grid.png")
    return p


def snapshots_of(runs):
    """--snapshots: every RUN/loras/step_N of the one run folder, in update order."""
    if len(runs) != 1:
        raise ValueError(f"--snapshots evaluates the snapshots of one run: give one --lora RUN, not {len(runs)}")
    snapshot_step = drpo.beside("run_folder").snapshot_step
    steps = sorted((f for f in (Path(runs[0]) / "loras").glob("step_*") if snapshot_step(f) >= 0), key=snapshot_step)
    if not steps:
        raise FileNotFoundError(f"--snapshots: {runs[0]} has no loras/step_N folders; pass a drpo.py --output-dir "
                                f"(it keeps one every --save-lora-every updates)")
    return list(map(str, steps))


def check(args):
    """Every setting and input file of eval.py, before any model, reward or judge loads. Takes the --lora runs'
    settings where not given; returns (the judge's template, the prompts, the GenEval metadata or None)."""
    for name in ("seeds", "max_prompts", "reward_batch", "grid_prompts", "judge_batch", "inference_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.geneval and (args.prompts or args.reward):
        raise ValueError("--geneval scores its metadata's prompts with its own checks: drop --prompts and --reward, "
                         "or run them in a separate eval.py run")
    if args.judge_template and not args.judge:
        raise ValueError("--judge-template is the instruction of --judge; add --judge")
    if args.geneval and not Path(args.geneval).is_file():
        raise FileNotFoundError(f"--geneval {args.geneval}: no such file; pass evaluation_metadata.jsonl from the "
                                f"GenEval repository's prompts/ folder (docs/geneval.md)")
    if Path(args.out).is_file():
        raise FileExistsError(f"--out {args.out} is a file; pass a folder for the results")
    if args.judge and args.judge.startswith((".", "/", "~")) and not Path(args.judge).expanduser().is_dir():
        raise FileNotFoundError(f"--judge {args.judge}: no such folder; pass a Qwen3-VL folder or a hub id")
    drpo.reward_device_of(args.device, None, 0, "--device")
    drpo.reward_device_of(args.reward_device, None, 0)
    if args.snapshots:
        args.lora = snapshots_of(args.lora)
    for folder in args.lora:  # before the model: a mistyped path is said at once, not after a download
        if not (Path(folder) / "pytorch_lora_weights.safetensors").is_file():
            raise FileNotFoundError(f"--lora {folder}: no pytorch_lora_weights.safetensors there; pass the "
                                    f"--output-dir of a drpo.py run, one of its loras/ folders, or a diffusers LoRA")
    if args.resolution is not None and not 0 < args.resolution <= 4096:
        raise ValueError(f"--resolution must be a side of at most 4096 pixels, got {args.resolution}")
    template = read_template(args.judge_template)
    runs = take_run_settings(args)  # the runs' --model, steps, timesteps, --resolution where not given
    drpo.check_model(args.model, args.resolution, args.inference_steps, args.timesteps)  # configs only, before loading
    network = network_of(args.model)
    for folder in args.lora:
        check_lora(network, folder)
    if not args.prompts and not args.geneval:  # the runs' held-out prompts, else the shipped held-out list
        run, args.prompts = next(((f, c["eval_prompts"]) for f, c in runs.items() if c.get("eval_prompts")),
                                 (None, HELDOUT))
        if run and not Path(args.prompts).is_file():
            raise FileNotFoundError(f"--lora {run}: its run's --eval-prompts {args.prompts} no longer exists; pass "
                                    f"--prompts FILE to eval.py")
    args.seeds = args.seeds or next((c["eval_seeds"] for c in runs.values() if c.get("eval_seeds")), 4)
    args.reward = args.reward if args.reward is not None else "" if args.judge or args.geneval else DEFAULT_REWARDS
    names = [n for n, _, _ in drpo.parse_reward_spec(args.reward)] if args.reward else []
    if "vlm" in names:
        raise ValueError(f"--reward vlm cannot evaluate: {PAIRWISE_VLM}; use --reward vlm-rating (the same server "
                         f"rates each image), or --judge for win rates against the base")
    drpo.check_reward_paths(vars(args), names + ["geneval"] * bool(args.geneval))
    if args.geneval:
        metadata = drpo.beside("rewards.geneval").read_metadata(args.geneval)[:args.max_prompts]
        return template, [m["prompt"] for m in metadata], metadata
    return template, load_prompts(args.prompts, args.max_prompts), None


def evaluate(args):
    from tqdm import tqdm

    template, prompts, metadata = check(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = drpo.precision_dtype(args.precision, device)
    paths = drpo.reward_options(args)
    if args.geneval:  # GenEval: its prompts, each image judged (1 = correct) by its metadata's checks
        geneval, verdicts = drpo.beside("rewards.geneval"), []
        detect = geneval.load_detector(args.reward_device or device, paths["geneval_detector"], paths["geneval_clip"])
        by_prompt = {m["prompt"]: m for m in metadata}

        def decide_images(images, prompts):
            metas = [by_prompt[p] for p in prompts]
            verdicts.extend(geneval.decide(m, d) for m, d in zip(metas, detect(images, metas)))
            return torch.tensor([float(c) for c, _ in verdicts[-len(images):]])

        rewards = {"geneval": decide_images}
    else:
        rewards = metrics_of(args.reward, None, args.reward_device or device, args.reward_batch,
                             **paths) if args.reward else {}
        if args.paper_scales and "imagereward" in rewards:
            rewards["imagereward"] = lambda images, prompts, fn=rewards["imagereward"]: 10 * fn(images, prompts)
    if args.judge:  # loaded before sampling: a missing judge should cost seconds, not a whole sampling pass
        judge = drpo.beside("rewards.judge").load_judge(args.judge, args.reward_device or device, template=template,
                                                        batch_size=args.judge_batch)
    model = drpo.load_generator(args.model, dtype, device, args.inference_steps, args.timesteps)
    labels = {}
    for folder in args.lora:
        label = Path(folder).resolve().name if Path(folder).name != "best" else "best"
        taken = label in labels or label in ("base", "tie", "invalid")  # names the tables and judge.csv use
        labels[f"{label}-{len(labels) + 1}" if taken else label] = folder
    seeds = list(range(args.seeds))
    noises = seed_noises(model, args.resolution, seeds)

    # scores[reward][label]: (prompts * seeds,) in prompt-major order; grid: first seed per row
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scores, grid = {r: {} for r in rewards}, []
    bar = tqdm(total=(1 + len(labels)) * len(prompts), desc="eval", dynamic_ncols=True)
    for label, folder in [("base", None), *labels.items()]:
        bar.set_description(f"eval: sampling and scoring {label}")  # what it is doing, model by model
        def each(i, images):
            if args.judge:  # kept on disk for the judge (and for looking at what it judged)
                (out / "images" / label).mkdir(parents=True, exist_ok=True)
                for s, im in zip(seeds, images):
                    im.save(image_path(out, label, i, s))
            if i < args.grid_prompts:
                grid.append((i, label, images[0]))
            bar.update(1)

        if folder:
            model.pipe.load_lora_weights(folder)
        for r, s in heldout_scores(model, prompts, noises, rewards, each=each)[0].items():
            scores[r][label] = s
        bar.set_postfix({f"{label}/{r}": f"{s[label].mean().item():.4g}" for r, s in scores.items()})
        if folder:
            model.pipe.unload_lora_weights()
    bar.close()

    summary = {r: {"base": {"mean": s["base"].mean().item(), "std": s["base"].std().item()},
                   **{label: paired_stats(s["base"], s[label]) for label in labels}} for r, s in scores.items()}
    settings = {**vars(args), "prompts": str(args.prompts) if args.prompts else None}
    results = {"scores": summary, "prompts": prompts, "seeds": seeds, "loras": labels, "settings": settings}
    if args.judge:
        results["judge"] = judge_all(judge, ["base", *labels], prompts, seeds, out, args.judge_batch)
    if args.geneval:
        results["geneval"] = geneval_tasks(metadata, scores["geneval"], len(seeds))
        write_verdicts(out / "geneval.csv", metadata, seeds, ["base", *labels], verdicts)
    drpo.atomic_write(out / "results.json", lambda p: p.write_text(json.dumps(results, indent=2)))
    with open(out / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "prompt_index", "seed", "prompt", *rewards])
        for label in ["base", *labels]:
            for i, prompt in enumerate(prompts):
                for j, s in enumerate(seeds):
                    w.writerow([label, i, s, prompt, *(scores[r][label][i * len(seeds) + j].item() for r in rewards)])
    grid.sort(key=lambda g: g[0])  # rows: prompts; columns: base, then each LoRA
    image_grid([im for _, _, im in grid], 1 + len(labels), prompts[:args.grid_prompts], ["base", *labels],
               random_model_note(args.model)).save(out / "grid.png")
    if args.snapshots and rewards:
        plot_steps(summary, out / "steps.png")
    tables = [markdown_table(summary) if rewards else None, tasks_table(results["geneval"]) if args.geneval else None,
              judge_table(results["judge"]) if args.judge else None]
    table = "\n\n".join(t for t in tables if t)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return results


def plot_steps(summary, path):
    """--snapshots: each reward's held-out mean against the update (the base at 0), with the 95 % paired interval."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(4.5 * len(summary), 3.4), squeeze=False)
    for ax, (r, s) in zip(axes[0], summary.items()):
        points = [(int(k[5:]), v) for k, v in s.items() if k.startswith("step_") and int(k[5:])]  # step 0: the base
        steps, means = [0] + [n for n, _ in points], [s["base"]["mean"]] + [v["mean"] for _, v in points]
        lo = [0] + [v["diff_vs_base"] - v["ci95"][0] for _, v in points]
        hi = [0] + [v["ci95"][1] - v["diff_vs_base"] for _, v in points]
        ax.errorbar(steps, means, yerr=[lo, hi], marker="o", capsize=3)
        best = max(range(len(means)), key=lambda i: means[i])
        ax.plot(steps[best], means[best], marker="*", markersize=16, color="gold", markeredgecolor="black",
                linestyle="none", label=f"best: update {steps[best]}")
        ax.legend(fontsize=8)
        ax.set(title=f"held-out {r}", xlabel="update")
    fig.tight_layout()
    drpo.atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.curves:
        missing = [d for d in args.curves if not (Path(d) / "metrics.jsonl").is_file()]
        if missing:
            print(f"error: --curves {' '.join(missing)}: no metrics.jsonl there; pass drpo.py --output-dir folders",
                  file=sys.stderr)
            return 2
        try:
            for run in args.curves:  # a damaged line is named before anything is drawn or written
                drpo.beside("run_folder").read_metrics(Path(run) / "metrics.jsonl")
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        Path(args.out).mkdir(parents=True, exist_ok=True)
        plot_curves(args.curves, Path(args.out) / "curves.png")
        print(f"wrote {Path(args.out) / 'curves.png'}")
        return 0
    try:
        evaluate(args)
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {Path(args.out) / 'results.json'}, scores.csv, table.md, grid.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
