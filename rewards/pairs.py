"""Offline preference pairs for drpo.py --pairs: the JSON-lines file read and checked (docs/pairs.md).

Self-contained (the standard library and Pillow): each line is {"prompt", "chosen", "rejected"}, the images'
paths relative to the file's folder or absolute. drpo.py appends a prompt's chosen / rejected images to its
candidates as positives / negatives, VAE-encoded once (latents_of) and framed as the samples are.
"""
import functools
import json
from pathlib import Path

import torch


@functools.lru_cache(maxsize=1)  # check_args and train read the same file: check its images once
def read_pairs(path):
    """--pairs FILE.jsonl: one {"prompt", "chosen", "rejected"} per line (image paths relative to the
    file's folder, or absolute) -> {prompt: (chosen paths, rejected paths)} in file order. Every
    line and image is checked here, before anything loads; errors name the file and line."""
    from PIL import Image
    path, pairs = Path(path), {}
    if not path.is_file():
        raise FileNotFoundError(f"--pairs {path}: no such file; give a JSON-lines file with one "
                                f'{{"prompt": ..., "chosen": IMAGE, "rejected": IMAGE}} per line')
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"--pairs {path}, line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not JSON ({e}); write one JSON object per line") from e
        missing = [k for k in ("prompt", "chosen", "rejected")
                   if not (isinstance(row, dict) and isinstance(row.get(k), str) and row[k])]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}; each line needs prompt, chosen and rejected, "
                             f"each a non-empty string")
        images = [(path.parent / Path(row[k]).expanduser()).resolve() for k in ("chosen", "rejected")]
        for key, image in zip(("chosen", "rejected"), images):  # (an absolute path stays as it is)
            try:
                with Image.open(image) as im:
                    im.verify()
            except Exception as e:  # missing, or one of the several errors PIL raises for a broken file
                raise ValueError(f"{where}: {key} image {image} cannot be read as an image ({e})") from e
        if images[0] == images[1]:
            raise ValueError(f"{where}: chosen and rejected are the same image, which states no preference; "
                             f"remove the line")
        for side, image in zip(pairs.setdefault(row["prompt"], ([], [])), images):
            side.append(image)
    if not pairs:
        raise ValueError(f"--pairs {path} is empty; write one JSON object per line")
    return pairs


def latents_of(pairs, model, side):
    """{image path: its latent} for every image of read_pairs' pairs, encoded once; model: drpo's generator."""
    paths = sorted({p for chosen, rejected in pairs.values() for p in (*chosen, *rejected)})
    return dict(zip(paths, encode_images(model, paths, side)))


@torch.no_grad()
def encode_images(model, paths, side, batch_size=8):
    """Images -> latents (model.encode x scaling_factor), framed as the samples are: resized to cover
    side x side px, then center-cropped, by the pipeline's own image processor."""
    from PIL import Image
    pipe, latents = model.pipe, []
    for i in range(0, len(paths), batch_size):
        images = [Image.open(p).convert("RGB") for p in paths[i:i + batch_size]]
        x = pipe.image_processor.preprocess(images, side, side, resize_mode="crop").to(pipe.vae.device, pipe.vae.dtype)
        latents.append(model.encode(x).float() * pipe.vae.config.scaling_factor)
    return torch.cat(latents)
