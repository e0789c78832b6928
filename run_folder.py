"""The run folder of drpo.py: one owner, whole saves, what --resume compares, what an update writes (docs/running.md).

- One owner: the process that runs holds an flock on OUT/.drpo.lock for the whole run; another one is refused with
  the holder's process, host and start time. A new run starts only in an empty folder, in one that holds nothing
  but an earlier attempt of the same run that saved nothing, or with --overwrite; --resume with no checkpoint is a
  new run.
- Whole saves: the LoRA, its card and checkpoint.pt are all written aside, so a full disk changes nothing; then
  renamed into place, the checkpoint last. A save cut at any point leaves a whole checkpoint and a LoRA at most
  one save newer; --resume rewrites the LoRA and card from the checkpoint and removes what the cut save left.
- What --resume compares: every setting that shapes the run (all but RESUME_FREE), the sha256 of the prompts or
  pairs file, and the micro-steps per update; config.json must be whole (--force continues anyway, recorded).
- After each update (save_outputs): metrics.jsonl, the LoRA snapshot, the sample grid, curves.png, the checkpoint;
  with --report-to, the same metrics and pictures in TensorBoard or W&B as well (Tracker).
"""
import contextlib
import errno
import importlib
import io
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

import drpo
import eval as ev

LOCK = ".drpo.lock"  # flocked by the process that runs in the folder (own)


@contextlib.contextmanager
def deferred_signals():
    """SIGTERM, SIGINT and SIGUSR1 (preemption, Ctrl-C) only note that a stop was asked (the list
    yielded): the loop then finishes its update, saves and stops. Ctrl-C after that stops at once."""
    import threading
    asked = []

    def note(signum, frame):
        if asked and signum == signal.SIGINT:
            raise KeyboardInterrupt
        asked.append(signum)

    main = threading.current_thread() is threading.main_thread()  # only the main thread may take signals
    previous = {s: signal.signal(s, note) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)} if main else {}
    try:
        yield asked
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def own(out):
    """The run folder, this process's alone until the returned file closes (when train returns, or the process
    ends, however it ends): an flock on OUT/.drpo.lock. Another process is refused, naming the holder."""
    import fcntl
    import socket
    out = Path(out)
    if out.is_file():
        raise FileExistsError(f"--output-dir {out} is a file; pass a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / LOCK, "a+")
    except OSError as e:
        raise OSError(f"--output-dir {out}: cannot write there ({e.strerror}); choose a folder you can write") from e
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise FileExistsError(f"--output-dir {out} is in use by {holder}; wait for that run to end, or choose "
                              f"another folder") from None
    lock.truncate(0)
    lock.write(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    lock.flush()
    return lock


CHECKPOINT_KEYS = {"lora", "optimizer", "rng", "step", "order"}
# Settings that may change on --resume: they do not change what the run computes.
RESUME_FREE = {"max_steps", "save_every", "sample_every", "eval_every", "save_lora_every", "grid_prompts",
               "grid_noises", "device", "reward_device", "grad_chunk", "gradient_checkpointing", "reward_batch",
               "cache_conditioning", "offload",  # exact: the same update
               "grad_accum", "world_size", "resume", "force", "overwrite", "output_dir", "mae_ckpt", "dinov2",
               "prompts", "pairs",  # where the file lies; its content is data_sha256
               "report_to",  # where the metrics are shown as well
               "forced_changes", *drpo.REWARD_PATHS, "reward_url", "reward_api_key_env", "reward_concurrency",
               "reward_timeout", "reward_retry"}  # a served reward's address and patience


def load_checkpoint(path):
    """checkpoint.pt as plain tensors, numbers and lists (weights_only: nothing in the file is run)."""
    prev = path.with_name("checkpoint.prev.pt")
    fix = (f"To resume from the one before: `cp {prev} {path}`; or start over with "
           f"--overwrite" if prev.is_file() else "Start over with --overwrite, or pass another --output-dir")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated (zip reader errors), foreign pickles (UnpicklingError), ...
        raise ValueError(f"{path} is missing, damaged or not a DrPO checkpoint, so nothing was loaded or run "
                         f"from it ({str(e).splitlines()[0]}). {fix}") from e
    if not (isinstance(ckpt, dict) and CHECKPOINT_KEYS <= set(ckpt)):
        missing = sorted(CHECKPOINT_KEYS - set(ckpt if isinstance(ckpt, dict) else ()))
        raise ValueError(f"{path} is not a DrPO checkpoint (it lacks {missing}). {fix}")
    return ckpt


def read_json(path, what="a JSON object"):
    """A run file's JSON object, or a one-line error that names the file."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path} is missing or damaged ({e}); it should hold {what}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a {type(value).__name__}, not {what}")
    return value


def read_metrics(path):
    """metrics.jsonl's rows. A cut last line (a full disk, a kill while writing) is dropped; any other line that is
    not a JSON object with a step is an error that names the file and the line."""
    lines = path.read_text().splitlines() if path.is_file() else []
    rows = []
    for n, line in enumerate(lines, 1):
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
        if len(rows) < n and n == len(lines):  # the last line is cut
            break
        if not (len(rows) == n and isinstance(rows[-1], dict) and isinstance(rows[-1].get("step"), int)):
            raise ValueError(f"{path}, line {n} is not a metrics row (a JSON object with a step); repair or remove it")
    return rows


def start_or_resume(args, model, optimizer, rng, rank, world):
    """(step, prompt order, Tracker) to start from. A new run clears what an earlier attempt left (check_args refuses a
    folder with anything else); --resume loads the LoRA, the optimizer and the loop's random state from the
    checkpoint, drops the metrics and snapshots after it, and rewrites the LoRA and its card from it (a save cut
    between them and the checkpoint leaves them one save newer). Leftovers of a cut save are removed."""
    from peft.utils import set_peft_model_state_dict
    out = Path(args.output_dir)
    step, order = 0, []
    if args.resume and (out / "checkpoint.pt").exists():
        ckpt = load_checkpoint(out / "checkpoint.pt")
        set_peft_model_state_dict(model.net, ckpt["lora"])
        optimizer.load_state_dict(ckpt["optimizer"])
        rng.set_state(ckpt["rng"])
        step, order = ckpt["step"], ckpt["order"]
    if rank == 0:
        leftovers = [*out.glob(".saving*"), *out.glob("loras/.step_*.saving"), *out.glob("*.tmp"),
                     *out.glob("samples/*.tmp")]  # of a cut save or write
        for stale in leftovers + [p for p in out.glob("loras/step_*") if snapshot_step(p) > step]:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()  # and the snapshots after the checkpoint
        if step:  # the log, the LoRA and its card as of the checkpoint
            rows = [row for row in read_metrics(out / "metrics.jsonl") if row["step"] <= step]
            text = "".join(json.dumps(row) + "\n" for row in rows)
            drpo.atomic_write(out / "metrics.jsonl", lambda p: p.write_text(text))
            heldout = next((r for r in reversed(rows) if any(k.startswith("eval/") for k in r)), None)
            with disk_full_said(out, step):
                drpo.save_lora(model, out, ev.model_card(args, model, step, heldout, out))
        else:  # nothing of an earlier attempt may be resumed or shown as this run's
            for stale in ("checkpoint.pt", "checkpoint.prev.pt", "pytorch_lora_weights.safetensors", "README.md",
                          "metrics.jsonl", WANDB_ID):
                (out / stale).unlink(missing_ok=True)
            for stale in ("loras", "tensorboard", "wandb"):
                shutil.rmtree(out / stale, ignore_errors=True)
        drpo.atomic_write(out / "config.json", lambda p: p.write_text(json.dumps({**vars(args), "world_size": world},
                                                                               indent=2)))
    return step, order, Tracker(args, out, step, rank)


WANDB_ID = "wandb-run-id"  # the W&B run a resumed run continues


class Tracker:
    """--report-to: every metrics.jsonl row as scalars (nested dicts as NAME/KEY, warnings as text) and the pictures,
    in TensorBoard (OUT/tensorboard) or W&B (OUT/wandb, project $WANDB_PROJECT or "drpo"; the config, and the model
    card at the end). A resumed run continues the same run: TensorBoard drops what was logged after the checkpoint
    (purge_step), W&B resumes the run whose id is in OUT/wandb-run-id. Without --report-to, or on ranks > 0, every
    call does nothing."""

    def __init__(self, args, out, step, rank):
        self.out, self.tb, self.wandb = out, None, None
        if rank == 0 and args.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=step + 1 if step else None)
        elif rank == 0 and args.report_to == "wandb":
            import wandb
            run_id = (out / WANDB_ID).read_text().strip() if step and (out / WANDB_ID).is_file() else None
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "drpo"), name=out.name, dir=str(out),
                                    id=run_id, resume="allow", config=vars(args))
            (out / WANDB_ID).write_text(self.wandb.id)

    def __bool__(self):  # something to log to
        return bool(self.tb or self.wandb)

    def log(self, row, step):
        flat = dict(flat_row(row))
        for key, value in flat.items() if self.tb else ():
            self.tb.add_text(key, value, step) if isinstance(value, str) else self.tb.add_scalar(key, value, step)
        if self.wandb:
            self.wandb.log(flat, step=step)

    def image(self, tag, image, step):
        if self.tb:
            import numpy as np
            self.tb.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        if self.wandb:
            import wandb
            self.wandb.log({tag: wandb.Image(image)}, step=step)

    def close(self):
        if self.tb:
            self.tb.close()
        if self.wandb:
            if (self.out / "README.md").is_file():
                self.wandb.save(str(self.out / "README.md"), base_path=str(self.out), policy="now")  # the card
            self.wandb.finish()


def flat_row(row, prefix=""):
    """(NAME, value) of a metrics row's numbers and texts, nested dicts as NAME/KEY (the step is the x-axis)."""
    for key, value in row.items():
        if isinstance(value, dict):
            yield from flat_row(value, f"{prefix}{key}/")
        elif key != "step" and (isinstance(value, (str, int, float)) and not isinstance(value, bool)):
            yield prefix + key, value


def check_report_to(args):
    """--report-to's package, checked before any model loads."""
    if args.report_to:
        try:
            importlib.import_module(args.report_to)  # the package is named as the flag's value
        except ImportError:
            raise ImportError(f"--report-to {args.report_to} needs the {args.report_to} package: pip install -r "
                              f"requirements-track.txt (or pip install {args.report_to}), or leave it out") from None


def snapshot_step(folder):
    """The update of a loras/step_N folder; -1 for any other name (a folder the user put there is left alone)."""
    return int(folder.name[5:]) if folder.name[5:].isdigit() else -1


def save_checkpoint(out, model, optimizer, rng, step, order, card):
    """The diffusers-format LoRA with its card and checkpoint.pt, everything --resume needs (the one before kept as
    checkpoint.prev.pt). All are written aside first, so a full disk changes nothing in the folder; then renamed
    into place, the checkpoint last: a save cut between the renames leaves a whole checkpoint and a LoRA one save
    newer, which --resume rewrites from it."""
    state = {"lora": drpo.lora_state(model.net), "optimizer": optimizer.state_dict(), "rng": rng.get_state(),
             "step": step, "order": order}  # tensors, numbers and lists: loads with weights_only=True
    tmp, buffer = out / f".saving-{step:06d}", io.BytesIO()
    try:
        with disk_full_said(out, step):
            torch.save(state, buffer)  # in memory first: writing the bytes, a full disk is an OSError that says so
            tmp.mkdir(exist_ok=True)
            (tmp / "checkpoint.pt").write_bytes(buffer.getvalue())
            drpo.save_lora(model, tmp, card)
            if (out / "checkpoint.pt").exists():
                shutil.copyfile(out / "checkpoint.pt", tmp / "checkpoint.prev.pt")
            for name in ("pytorch_lora_weights.safetensors", "README.md", "checkpoint.prev.pt", "checkpoint.pt"):
                if (tmp / name).exists():  # renames only: no byte left to write
                    os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def disk_full_said(out, step):
    """A full disk while saving becomes disk_full's message (safetensors says it as "os error 28")."""
    try:
        yield
    except Exception as e:
        if getattr(e, "errno", None) == errno.ENOSPC or "os error 28" in str(e):
            raise disk_full(out, step) from e
        raise


def disk_full(out, step):
    return OSError(f"the disk is full: update {step} could not be saved in {out}. The last checkpoint and the "
                   f"snapshots there are whole; free some space and continue with --resume")




def check_output_dir(args, out, world):
    """--output-dir belongs to one run. --resume needs the run's checkpoint, config.json and metrics.jsonl whole and
    its settings unchanged (--force: recorded in config.json). A new run (or --resume with no checkpoint) starts in
    an empty folder, or in one that holds only an earlier attempt of itself that saved nothing, or with --overwrite."""
    check_report_to(args)
    held = sorted(p.name for p in out.iterdir() if p.name != LOCK) if out.is_dir() else []
    if args.resume and {"checkpoint.pt", "checkpoint.prev.pt"} & set(held):  # (a lone prev: load says how to use it)
        load_checkpoint(out / "checkpoint.pt")  # damaged or foreign: said now, before any model loads
        read_metrics(out / "metrics.jsonl")
        try:
            args.forced_changes = changed_settings(read_json(out / "config.json", "the run's settings"), args, world)
        except ValueError as e:
            if not args.force:
                raise ValueError(f"--resume: {e}, so these settings cannot be compared with the run's; restore it, "
                                 f"or add --force to continue with these settings") from e
            args.forced_changes = [f"config.json unreadable, settings not compared ({e})"]
        if args.forced_changes and not args.force:
            raise ValueError(f"--resume: settings that shape the run differ from those of the run in {out}:\n  "
                             + "\n  ".join(args.forced_changes) + "\nResume with the run's settings, start a new run "
                             "in another --output-dir, or add --force if you mean to change them")
        return
    attempt = {"config.json", "metrics.jsonl", "curves.png", "samples", "tensorboard", "wandb", WANDB_ID}
    own_start = set(held) <= attempt and not changed_settings(read_json(out / "config.json"), args, world) \
        if "config.json" in held else not held
    if held and not own_start and not args.overwrite:
        raise FileExistsError(f"--output-dir {out} holds {', '.join(held[:4])}{', ...' * (len(held) > 4)}" + (
            ", but no checkpoint to resume from" if args.resume else " (another run?)") + ": a new run would replace "
            "them. Continue a run there with --resume, start over with --overwrite, or choose another folder")


def changed_settings(old, args, world):
    """The settings that shape the run and differ from those of the old run's config.json (a setting it does not
    record, from an older drpo.py, is not compared)."""
    new = json.loads(json.dumps({**vars(args), "world_size": world}))  # tuples as lists, as saved
    changes = [f"{k}: {old[k]!r} -> {new.get(k)!r}" for k in sorted(old)
               if k not in RESUME_FREE and old[k] != new.get(k)]
    accum = old.get("grad_accum", 1) * old.get("world_size", 1), args.grad_accum * world
    if accum[0] != accum[1]:  # micro-steps per update: may move between grad_accum and processes
        changes.append(f"grad_accum x world size: {accum[0]} -> {accum[1]}")
    return changes


def write_metrics(out, step, log, grad_norm, optimizer, times, bar, tracker):
    """drpo.py's metrics.jsonl line of an update, and the progress bar's live figures: those that move when DrPO
    learns. The regression losses are mean(V^2) of fields normalized per radius, so they stay in a narrow band
    whatever the reward does (docs/running.md)."""
    scores, pos, neg = (torch.cat(log.pop(k) or [torch.zeros(0)]) for k in ("scores", "pos", "neg"))
    ranked = {"reward_mean": scores.mean().item(), "reward_std": scores.std().item(), "pos_mean": pos.mean().item(),
              "neg_mean": neg.mean().item(), "gap": (pos.mean() - neg.mean()).item()} if len(scores) else {
              "gap": log["dist_neg"] - log["dist_pos"]}  # offline: rejected minus chosen distance
    metrics = {"step": step, **ranked, **log, "grad_norm": grad_norm.item(), "lr": optimizer.param_groups[0]["lr"],
               "seconds": sum(times.values()), "phases_s": times}
    if len(scores) and scores.min() == scores.max() and not getattr(bar, "said_gap", False):
        bar.said_gap = f"update {step}: every candidate got the same score, so the reward ranks nothing and the " \
                       f"field has nothing to follow; check the reward"
        metrics["warnings"] = {"reward": bar.said_gap}
        bar.write(f"warning: {bar.said_gap}", file=sys.stderr)
    with open(out / "metrics.jsonl", "a") as f:  # strict JSON: NaN and infinities as null
        f.write(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                            for k, v in metrics.items()}) + "\n")
    tracker.log(metrics, step)
    bar.update(1)
    shown = ({"reward": f"{metrics['reward_mean']:.4g}±{metrics['reward_std']:.2g}"} if len(scores) else
             {"chosen": f"{metrics['dist_pos']:.4g}", "rejected": f"{metrics['dist_neg']:.4g}"})
    bar.set_postfix(**shown, gap=f"{metrics['gap']:.3g}", dist_ref=f"{metrics['dist_ref']:.4g}")


def save_outputs(args, model, optimizer, rng, order, watch, prompts, amp, tracker, step, stop, saved):
    """What drpo.py's rank 0 writes after an update: the LoRA snapshot (unless the held-out evaluation has just saved
    it as the best), the sample grid, curves.png, and the checkpoint with the LoRA and its card (docs/running.md)."""
    out, last = Path(args.output_dir), step == args.max_steps
    heldout = watch and watch.last
    if not saved and (step % args.save_lora_every == 0 or last or stop):
        ev.save_snapshot(out, model, args, step, heldout)
    if args.sample_every and (step % args.sample_every == 0 or last):
        noises = torch.randn((args.grid_noises, drpo.noise_draws(model.recipe), *drpo.latent_shape(
            model, args.resolution)), generator=torch.Generator().manual_seed(args.seed + 1))
        shown = prompts[:args.grid_prompts]
        grid = ev.image_grid(amp(ev.sample_images)(model, shown, noises), len(noises), shown, [
            f"update {step}, noise {i}" for i in range(len(noises))], ev.random_model_note(args.model))
        (out / "samples").mkdir(exist_ok=True)
        drpo.atomic_write(out / "samples" / f"step_{step:06d}.png", lambda p: grid.save(p, format="PNG"))
        tracker.image("samples", grid, step)
    if stop or last or (args.sample_every and step % args.sample_every == 0):
        ev.plot_curves([out], out / "curves.png")  # the curves eval.py --curves draws
    if stop or step % args.save_every == 0 or last:
        save_checkpoint(out, model, optimizer, rng, step, order, ev.model_card(args, model, step, heldout, out))
