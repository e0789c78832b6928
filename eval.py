"""Did DrPO help? Score the base generator and finetuned LoRAs on held-out prompts.

    python eval.py --model sd-turbo --lora runs/drpo --reward pickscore,aesthetic,hpsv3 \
        --prompts prompts.txt --seeds 4 --out eval/

Every model sees the same noise for seed s: torch.randn((1, C, H/8, W/8)) from a CPU generator
seeded with s, shared by all prompts, sampled in one step exactly as drpo.py trains. Each LoRA is
compared with the base on the same (prompt, seed) pairs: mean difference, a 95 % paired
bootstrap interval, and the win rate (ties count half).

Writes EVALDIR/results.json, scores.csv (one row per image), table.md (also printed) and
grid.png (first prompts, first seed; base, then each LoRA, left to right).

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
import itertools
import json
import math
import re
import sys
from pathlib import Path

import torch

import drpo

DEFAULT_REWARDS = "pickscore,aesthetic,clip,hpsv3"
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


def check_lora(model, folder):
    """Refuse a LoRA that does not fit this generator's network (diffusers would load mismatched shapes silently)."""
    from safetensors.torch import load_file

    path = Path(folder) / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"--lora {folder}: no pytorch_lora_weights.safetensors there; pass the --output-dir "
                                f"of a drpo.py run (or any diffusers-format LoRA folder)")
    modules = dict(model.net.named_modules())
    found = 0
    for key, w in load_file(path).items():
        m = re.fullmatch(rf"{model.name}\.(.+)\.(lora\.down|lora\.up|lora_A|lora_B)(\.default)?\.weight", key)
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
        raise ValueError(f"--lora {folder} holds no LoRA weights for this model (keys `{model.name}.*.lora.down/up"
                         f".weight`): a LoRA for another family? Evaluate it with the model it was trained on")


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
            cell = f"{s['mean']:.4g} ± {s['std']:.2g}"
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
    """curves.png: over updates, the reward's mean and spread, the gap, the distance to the base
    samples and the gradient norm, one line per run (on pairs: the distances to the chosen and
    rejected images instead of the reward). matplotlib is imported here only: the method needs torch."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("curves.png skipped: `pip install matplotlib` to draw it", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for run in map(Path, runs):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        col = {k: [r.get(k, math.nan) for r in rows] for k in (rows[-1] if rows else ())}
        if "reward_mean" in col:
            mean, std = col["reward_mean"], col["reward_std"]
            axes[0].plot(col["step"], mean, label=run.name)
            axes[0].fill_between(col["step"], [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                 alpha=0.2)
        elif col:
            axes[0].plot(col["step"], col["dist_pos"], label=f"{run.name}: chosen")
            axes[0].plot(col["step"], col["dist_neg"], "--", label=f"{run.name}: rejected")
        for ax, key in zip(axes[1:], ("gap", "dist_ref", "grad_norm")):
            ax.plot(col.get("step", []), col.get(key, []))
    for ax, title in zip(axes, ("reward, mean ± std (pairs: distances)", "gap (pairs: rejected − chosen)",
                                "feature distance to the base samples", "gradient norm (before clipping)")):
        ax.set(title=title, xlabel="update")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    drpo.atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


def build_parser():
    p = argparse.ArgumentParser(description="Compare a base one-step generator with DrPO LoRAs on held-out prompts.",
                                formatter_class=drpo.HelpFormatter)
    p.add_argument("--model", default="sd-turbo", help="`sd-turbo`, `sdxl-turbo`, `sana-sprint`, a hub id, a local "
                   "diffusers pipeline folder, or `tiny` / `tiny-sdxl` / `tiny-sana` (offline demos)")
    p.add_argument("--lora", action="append", default=[], help="a drpo.py --output-dir (or diffusers-format LoRA "
                   "folder); repeat to compare several; labelled by folder name")
    p.add_argument("--reward", help=f"comma list of metrics, each a drpo.py reward name or `module:function` "
                   f"(default: {DEFAULT_REWARDS}; none when --judge is given)")
    p.add_argument("--prompts", help="text file with one prompt per line, or `parti` / `pickapic` (the paper's sets, "
                   "fetched from the hub with `datasets`)")
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
    p.add_argument("--seeds", type=int, default=4, help="noises per prompt: seeds 0 .. N-1")
    p.add_argument("--out", default="eval", help="folder for results.json, scores.csv, table.md, grid.png")
    p.add_argument("--resolution", type=int, help="image side in pixels (default: the model's native size)")
    p.add_argument("--timestep", type=int, help="the one step's timestep, as trained (default: the stock pipeline's)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="generator dtype; auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--reward-device", help="device of the reward models (default: --device)")
    p.add_argument("--reward-batch", type=int, default=8, help="images per reward call")
    drpo.add_reward_path_flags(p)
    p.add_argument("--grid-prompts", type=int, default=4, help="rows of grid.png")
    return p


def evaluate(args):
    from tqdm import tqdm

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = drpo.precision_dtype(args.precision, device)
    for name in ("seeds", "max_prompts", "reward_batch", "grid_prompts", "judge_batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if (args.prompts is None) == (args.geneval is None):
        raise ValueError("pass --prompts (rewards on your prompts) or --geneval evaluation_metadata.jsonl, one of them")
    if args.judge_template and not args.judge:
        raise ValueError("--judge-template is the instruction of --judge; add --judge")
    template = read_template(args.judge_template)
    drpo.check_model(args.model, args.resolution, args.timestep)  # configs only: checked before any load
    paths = {k: getattr(args, k) for k in drpo.REWARD_PATHS}
    if args.geneval:  # GenEval: its prompts, each image judged (1 = correct) by its metadata's checks
        geneval = drpo.beside("rewards.geneval")
        metadata = geneval.read_metadata(args.geneval)[:args.max_prompts]
        prompts, verdicts = [m["prompt"] for m in metadata], []
        detect = geneval.load_detector(args.reward_device or device, paths["geneval_detector"], paths["geneval_clip"])
        by_prompt = {m["prompt"]: m for m in metadata}

        def decide_images(images, prompts):
            metas = [by_prompt[p] for p in prompts]
            verdicts.extend(geneval.decide(m, d) for m, d in zip(metas, detect(images, metas)))
            return torch.tensor([float(c) for c, _ in verdicts[-len(images):]])

        rewards = {"geneval": decide_images}
    else:
        prompts = load_prompts(args.prompts, args.max_prompts)
        names = [r.strip() for r in (args.reward or ("" if args.judge else DEFAULT_REWARDS)).split(",") if r.strip()]
        rewards = {r: drpo.load_reward(r, args.reward_device or device, args.reward_batch, **paths) for r in names}
        if args.paper_scales and "imagereward" in rewards:
            rewards["imagereward"] = lambda images, prompts, fn=rewards["imagereward"]: 10 * fn(images, prompts)
    if args.judge:  # loaded before sampling: a missing judge should cost seconds, not a whole sampling pass
        judge = drpo.beside("rewards.judge").load_judge(args.judge, args.reward_device or device, template=template,
                                                        batch_size=args.judge_batch)
    model = drpo.load_generator(args.model, dtype, device, args.timestep)
    pipe, labels = model.pipe, {}
    for folder in args.lora:
        check_lora(model, folder)
        label = Path(folder).resolve().name
        taken = label in labels or label in ("base", "tie", "invalid")  # names the tables and judge.csv use
        labels[f"{label}-{len(labels) + 1}" if taken else label] = folder
    seeds = list(range(args.seeds))
    noises = torch.cat([torch.randn((1, *drpo.latent_shape(model, args.resolution)),
                                    generator=torch.Generator().manual_seed(s)) for s in seeds])

    # scores[reward][label]: (prompts * seeds,) in prompt-major order; grid: first seed per row
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scores, grid = {r: {} for r in rewards}, []
    bar = tqdm(total=(1 + len(labels)) * len(prompts), desc="eval", dynamic_ncols=True)
    for label, folder in [("base", None), *labels.items()]:
        if folder:
            pipe.load_lora_weights(folder)
        per = {r: [] for r in rewards}
        for i, prompt in enumerate(prompts):
            images = drpo.sample_images(model, [prompt], noises)
            if args.judge:  # kept on disk for the judge (and for looking at what it judged)
                (out / "images" / label).mkdir(parents=True, exist_ok=True)
                for s, im in zip(seeds, images):
                    im.save(image_path(out, label, i, s))
            for r, fn in rewards.items():
                per[r].append(fn(images, [prompt] * len(images)).double())
            if i < args.grid_prompts:
                grid.append((i, label, images[0]))
            bar.update(1)
            bar.set_postfix({f"{label}/{r}": f"{torch.cat(v).mean().item():.4g}" for r, v in per.items()})
        for r in rewards:
            scores[r][label] = torch.cat(per[r])
        if folder:
            pipe.unload_lora_weights()
    bar.close()

    summary = {r: {"base": {"mean": s["base"].mean().item(), "std": s["base"].std().item()},
                   **{label: paired_stats(s["base"], s[label]) for label in labels}} for r, s in scores.items()}
    results = {"scores": summary, "prompts": prompts, "seeds": seeds, "loras": labels, "settings": vars(args)}
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
    drpo.image_grid([im for _, _, im in grid], 1 + len(labels)).save(out / "grid.png")
    tables = [markdown_table(summary) if rewards else None, tasks_table(results["geneval"]) if args.geneval else None,
              judge_table(results["judge"]) if args.judge else None]
    table = "\n\n".join(t for t in tables if t)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return results


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.curves:
        missing = [d for d in args.curves if not (Path(d) / "metrics.jsonl").is_file()]
        if missing:
            print(f"error: --curves {' '.join(missing)}: no metrics.jsonl there; pass drpo.py --output-dir folders",
                  file=sys.stderr)
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
