"""Any drpo.py reward as an HTTP service on LitServe, shared by many trainers (the client: rewards/remote.py).

    python -m rewards.serve --reward hpsv3 --port 8100 --accelerator cuda --devices 1   # the reward's own GPU
    python drpo.py --model sd-turbo --reward http://127.0.0.1:8100                   # any number of trainers
    python eval.py --lora runs/drpo --reward http://127.0.0.1:8100

Why LitServe (Lightning AI, Apache-2.0): it is a thin layer over FastAPI that batches requests from many clients
(--max-batch-size, --batch-timeout) and runs one worker process per device (--devices, --workers-per-device),
which is all a reward service needs; Ray Serve does the same across machines but is a cluster framework to run.

The protocol: POST URL/score with JSON {"prompts": [str, ...], "images": [base64 PNG, ...]} -> {"scores": [float,
...]}, one score per image, exactly the in-process reward's (PNG is lossless: the server sees the trainer's pixels).
GET URL/health answers "ok" once every worker has loaded the reward. Nothing is pickled on the wire. A request holds
at most MAX_IMAGES images of at most MAX_SIDE pixels a side and MAX_BYTES in all; anything else is refused with a
4xx and the reason, before it reaches a worker, so one client's bad request never fails another's batch. The
server binds 127.0.0.1 unless --host says otherwise: it has no authentication, so put it on a trusted network only.

An ensemble (`--reward hpsv3,imagereward`) is z-scored per request, as in process: each request is one prompt's
candidates. Batching concatenates requests for each member's network, then splits the scores again.
"""
import argparse
import base64
import binascii
import io
import sys
from pathlib import Path

import litserve as ls
from fastapi import HTTPException
from pydantic import BaseModel, model_validator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # drpo.py, for `python -m rewards.serve`
import drpo  # noqa: E402

MAX_IMAGES = 256
MAX_SIDE = 4096
MAX_BYTES = 256 * 2 ** 20


def decode_png(text, i=0):
    """Base64 PNG text -> RGB PIL image; ValueError naming image i and what is wrong with it."""
    from PIL import Image, UnidentifiedImageError
    try:
        data = base64.b64decode(text, validate=True)
        image = Image.open(io.BytesIO(data))
    except (binascii.Error, ValueError, UnidentifiedImageError):
        raise ValueError(f"images[{i}] is not base64 PNG data") from None
    if image.format != "PNG":
        raise ValueError(f"images[{i}] is {image.format}, not PNG: send PNG, which is lossless")
    if max(image.size) > MAX_SIDE:
        raise ValueError(f"images[{i}] is {image.size[0]}x{image.size[1]}; at most {MAX_SIDE} pixels a side")
    try:
        return image.convert("RGB")
    except OSError as e:  # a cut or damaged file: the header read, the pixels not
        raise ValueError(f"images[{i}] is a damaged PNG ({e})") from None


class ScoreRequest(BaseModel):
    prompts: list[str]
    images: list[str]

    @model_validator(mode="after")
    def check(self):  # in the HTTP process: a bad request gets 422 with the reason and never reaches a worker
        if not 1 <= len(self.images) <= MAX_IMAGES or len(self.prompts) != len(self.images):
            raise ValueError(f"send 1 to {MAX_IMAGES} images and one prompt per image, got {len(self.images)} "
                             f"images and {len(self.prompts)} prompts")
        for i, text in enumerate(self.images):  # decoded in full (again in the worker): a damaged file shows only then
            decode_png(text, i)
        return self


class RewardAPI(ls.LitAPI):
    """One worker: the reward loaded on its device, scoring batches of requests."""

    def __init__(self, args):
        super().__init__(max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout, api_path="/score")
        self.args = args

    def setup(self, device):
        a = self.args
        paths = {k: getattr(a, k) for k in drpo.REWARD_PATHS}
        self.reward = drpo.load_reward(a.reward, device, a.reward_batch, drpo.precision_dtype(a.reward_precision,
                                       device), geneval_metadata=a.prompts, **paths)

    def decode_request(self, request: ScoreRequest):
        return [decode_png(text, i) for i, text in enumerate(request.images)], request.prompts

    def batch(self, requests):
        return requests

    def predict(self, requests):  # one (images, prompts), or a list of them when batching
        requests = requests if isinstance(requests, list) else [requests]
        images = [im for ims, _ in requests for im in ims]
        prompts = [p for _, ps in requests for p in ps]
        try:
            member_scores = [member(images, prompts) for member in self.reward.members.values()]
        except ValueError as e:  # the reward refused its input, e.g. NaN scores or a prompt geneval lacks
            raise HTTPException(422, str(e)) from e
        out, start = [], 0
        for ims, _ in requests:  # each request's scores, combined over that request alone (an ensemble's z-scores)
            out.append(self.reward.combine([s[start:start + len(ims)] for s in member_scores]).tolist())
            start += len(ims)
        return out

    def unbatch(self, outputs):
        return outputs

    def encode_response(self, scores):
        return {"scores": scores}


def build_parser():
    p = argparse.ArgumentParser(description="Serve a drpo.py reward over HTTP (LitServe) for drpo.py and eval.py "
                                "--reward http://HOST:PORT.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--reward", required=True, help="a drpo.py --reward spec: a name, `module:function`, or a "
                   "weighted list like hpsv3:1,imagereward:0.5")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 serves other machines (no "
                   "authentication: trusted networks only)")
    p.add_argument("--port", type=int, default=8100, help="port to listen on")
    p.add_argument("--accelerator", choices=("auto", "cpu", "cuda"), default="auto", help="where the workers run")
    p.add_argument("--devices", default="auto", help="number of devices, one or more workers each (auto: all)")
    p.add_argument("--workers-per-device", type=int, default=1, help="reward copies per device")
    p.add_argument("--max-batch-size", type=int, default=4, help="requests (each one prompt's images) scored together")
    p.add_argument("--batch-timeout", type=float, default=0.01, help="seconds a worker waits to fill a batch")
    p.add_argument("--timeout", type=float, default=300, help="seconds a request may wait in the queue")
    p.add_argument("--reward-batch", type=int, default=8, help="images per reward network call")
    p.add_argument("--reward-precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="reward dtype: auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--prompts", help="GenEval's evaluation_metadata.jsonl, for --reward geneval")
    for key, what in drpo.REWARD_PATHS.items():  # the weight files (a served reward has no VLM settings)
        p.add_argument("--" + key.replace("_", "-"), metavar="PATH", help=f"local {what}")
    return p


def check(args):
    """Every setting and file, before the server starts; a served spec may not itself be served or a VLM."""
    names = [name for name, _, _ in drpo.parse_reward_spec(args.reward)]
    for name in names:
        if name.startswith(("http://", "https://")) or name.startswith("vlm"):
            raise ValueError(f"--reward {name} is already a service; serve the rewards that run in process "
                             f"(a VLM: serve it with vLLM or `transformers serve`, docs/rewards.md)")
    if "geneval" in names and not str(args.prompts).endswith(".jsonl"):
        raise ValueError("--reward geneval needs --prompts evaluation_metadata.jsonl (docs/geneval.md)")
    for name in ("port", "workers_per_device", "max_batch_size", "reward_batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.devices != "auto" and not args.devices.isdigit():
        raise ValueError(f"--devices must be a number or auto, got {args.devices}")
    args.devices = args.devices if args.devices == "auto" else int(args.devices)
    drpo.check_reward_paths(vars(args), names)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check(args)
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server = ls.LitServer(RewardAPI(args), accelerator=args.accelerator, devices=args.devices, timeout=args.timeout,
                          workers_per_device=args.workers_per_device, max_payload_size=MAX_BYTES,
                          healthcheck_path="/health")
    server.run(host=args.host, port=args.port, generate_client_file=False, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
