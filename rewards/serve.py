"""Any drpo.py reward as an HTTP service on LitServe, shared by many trainers (the client: rewards/remote.py).

    python -m rewards.serve --reward hpsv3 --port 8100 --accelerator cuda --devices 1   # the reward's own GPU
    python drpo.py --model sd-turbo --reward http://127.0.0.1:8100                   # any number of trainers
    python eval.py --lora runs/drpo --reward http://127.0.0.1:8100

Why LitServe (Lightning AI, Apache-2.0): it is a thin layer over FastAPI that batches requests from many clients
(--max-batch-size, --batch-timeout) and runs one worker process per device (--devices, --workers-per-device),
which is all a reward service needs; Ray Serve does the same across machines but is a cluster framework to run.

The protocol: POST URL/score with JSON {"prompts": [str, ...], "images": [base64 PNG, ...]} -> {"scores": [float,
...]}, one score per image, exactly the in-process reward's (PNG is lossless: the server sees the trainer's pixels).
GET URL/health answers "ok" once every worker has loaded the reward. Nothing is pickled on the wire. The server
binds 127.0.0.1 unless --host says otherwise: it has no authentication, so put it on a trusted network only.

What the service promises (docs/rewards.md), and who keeps it:
- A request holds at most MAX_IMAGES images, MAX_BYTES in all (LitServe refuses more), each at most MAX_SIDE pixels a
  side and MAX_PIXELS decoded pixels in all: each image's header is read before anything is decoded, so a
  decompression bomb or an oversized request is a 4xx that costs the worker nothing. Decoding happens in the worker,
  never on the HTTP server's event loop, which stays free to answer /health.
- Each client's failure stays in its own request: a bad image, or a reward that refuses one request's images (NaN
  scores, a prompt GenEval lacks) or raises, answers that request alone; the requests batched with it are scored.
- A worker that dies (killed, out of memory) fails its requests in flight and is restarted (LitServe's
  restart_workers); the server goes on serving.
- A client that does not finish sending its body within --body-timeout seconds is answered 408 and cut off.
- SIGTERM and Ctrl-C stop the server whole: workers included, without tracebacks.

An ensemble (`--reward hpsv3,imagereward`) is z-scored per request, as in process: each request is one prompt's
candidates. Batching concatenates requests for each member's network, then splits the scores again.
"""
import argparse
import asyncio
import base64
import binascii
import io
import logging
import os
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path

import litserve as ls
from pydantic import BaseModel, model_validator
from starlette.responses import JSONResponse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # drpo.py, for `python -m rewards.serve`
import drpo  # noqa: E402

MAX_IMAGES = 256
MAX_SIDE = 4096
MAX_PIXELS = 2 ** 25  # decoded pixels per request (96 MB as RGB): 24 images of 1024 x 1024 fit, 3 of 4096 do not
MAX_BYTES = 256 * 2 ** 20


def decode_pngs(texts):
    """A request's base64 PNG texts -> RGB PIL images, in the worker. Every header is read and checked (PNG, side,
    the request's pixels) before any image is decoded; ValueError names the image and what is wrong with it."""
    from PIL import Image, UnidentifiedImageError
    opened, pixels = [], 0
    for i, text in enumerate(texts):
        try:
            image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
        except Image.DecompressionBombError as e:
            raise ValueError(f"images[{i}] declares too many pixels ({e})") from None
        except (binascii.Error, ValueError, UnidentifiedImageError):
            raise ValueError(f"images[{i}] is not base64 PNG data") from None
        if image.format != "PNG":
            raise ValueError(f"images[{i}] is {image.format}, not PNG: send PNG, which is lossless")
        if max(image.size) > MAX_SIDE:
            raise ValueError(f"images[{i}] is {image.size[0]}x{image.size[1]}; at most {MAX_SIDE} pixels a side")
        pixels += image.size[0] * image.size[1]
        if pixels > MAX_PIXELS:
            raise ValueError(f"the request's images hold more than {MAX_PIXELS} pixels (images[{i}] passes it); "
                             f"send fewer or smaller images per request")
        opened.append(image)
    try:
        for image in opened:
            image.load()  # decoded here: a cut or damaged file fails now
        return [image if image.mode == "RGB" else image.convert("RGB") for image in opened]  # one copy each
    except OSError as e:  # a cut or damaged file: the header read, the pixels not
        raise ValueError(f"a damaged PNG ({e})") from None


class ScoreRequest(BaseModel):
    prompts: list[str]
    images: list[str]

    @model_validator(mode="after")
    def check(self):  # in the HTTP process, cheap: counts only (the images are read in the worker)
        if not 1 <= len(self.images) <= MAX_IMAGES or len(self.prompts) != len(self.images):
            raise ValueError(f"send 1 to {MAX_IMAGES} images and one prompt per image, got {len(self.images)} "
                             f"images and {len(self.prompts)} prompts")
        return self


class BodyTimedOut(BaseException):
    """Raised into the app when a body stalls: a BaseException, so that FastAPI's body parser does not turn it into
    a 400 "error parsing the body" before BodyTimeout answers 408."""


class BodyTimeout:
    """ASGI middleware: a request whose body does not arrive within `seconds` is answered 408 and closed, so a client
    that stalls holds no connection for long (uvicorn times out idle connections, not slow bodies)."""

    def __init__(self, app, seconds):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, body_done, deadline = [False], [False], time.monotonic() + self.seconds

        async def timed_receive():  # timed until the body's last part; later reads (disconnects) as they come
            if body_done[0]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                raise BodyTimedOut from None
            body_done[0] = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def tracked_send(message):
            started[0] |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, timed_receive, tracked_send)
        except BodyTimedOut:
            if not started[0]:
                await JSONResponse({"detail": f"the request body did not arrive within {self.seconds} s"},
                                   status_code=408, headers={"Connection": "close"})(scope, receive, send)


class RewardAPI(ls.LitAPI):
    """One worker: the reward loaded on its device, scoring batches of requests."""

    def __init__(self, args):
        super().__init__(max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout, api_path="/score")
        self.args = args

    def setup(self, device):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server, which stops its workers
        a = self.args
        paths = {k: getattr(a, k) for k in drpo.REWARD_PATHS}
        self.reward = drpo.load_reward(a.reward, device, a.reward_batch, drpo.precision_dtype(a.reward_precision,
                                       device), geneval_metadata=a.prompts, **paths)

    def decode_request(self, request: ScoreRequest):  # in the worker; an error answers this request alone
        try:
            return decode_pngs(request.images), request.prompts
        except ValueError as e:
            return 422, str(e)

    def batch(self, requests):
        return requests

    def predict(self, requests):  # one (images, prompts), or a list of them when batching
        requests = requests if isinstance(requests, list) else [requests]
        good = [r for r in requests if isinstance(r[0], list)]
        try:
            scored = self.score(good)
        except Exception:  # one request failed the batch: each alone, so that only its own client hears of it
            scored = [self.score_alone(r) for r in good]
        scored = iter(scored)
        return [next(scored) if isinstance(r[0], list) else r for r in requests]

    def score(self, requests):
        """Each request's scores, from one pass over all their images, combined over each request alone (an
        ensemble's z-scores are per request, as per call in process)."""
        images = [im for ims, _ in requests for im in ims]
        prompts = [p for _, ps in requests for p in ps]
        member_scores = [member(images, prompts) for member in self.reward.members.values()]
        out, start = [], 0
        for ims, _ in requests:
            out.append(self.reward.combine([s[start:start + len(ims)] for s in member_scores]).tolist())
            start += len(ims)
        return out

    def score_alone(self, request):
        try:
            return self.score([request])[0]
        except ValueError as e:  # the reward refused these images, e.g. NaN scores or a prompt geneval lacks
            return 422, str(e)
        except Exception as e:  # the reward's own error: this request's, not the server's
            return 500, f"the reward raised {type(e).__name__}: {e}"

    def unbatch(self, outputs):
        return outputs

    def encode_response(self, result):  # scores, or (status, reason) for this request alone
        if isinstance(result, tuple):
            return JSONResponse({"detail": result[1]}, status_code=result[0])
        return {"scores": result}


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
    p.add_argument("--body-timeout", type=float, default=60, help="seconds a client has to send a request's body")
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
    for name in ("port", "workers_per_device", "max_batch_size", "reward_batch", "body_timeout"):
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
                          healthcheck_path="/health", restart_workers=True,
                          middlewares=[(BodyTimeout, {"seconds": args.body_timeout})])
    for signum in (signal.SIGTERM, signal.SIGINT):  # either one: LitServe stops every worker it started
        signal.signal(signum, stop)
    threading.Thread(target=say_ready, args=(args,), daemon=True).start()
    try:
        server.run(host=args.host, port=args.port, generate_client_file=False, log_level="warning",
                   api_server_worker_type="thread")  # in this process: a dead worker's requests are failed here
    except KeyboardInterrupt:
        pass
    print("rewards.serve: stopped", file=sys.stderr, flush=True)
    os._exit(0)  # the workers are gone; LitServe's HTTP and monitoring threads are not meant to outlive it


def stop(signum, frame):
    """SIGTERM or Ctrl-C: LitServe's own shutdown (KeyboardInterrupt), without the errors it logs on the way."""
    logging.getLogger("litserve").setLevel(logging.CRITICAL + 1)
    raise KeyboardInterrupt


def say_ready(args, seconds=3600):
    """Print the address once the service answers its health check (the workers have loaded the reward)."""
    url, deadline = f"http://127.0.0.1:{args.port}/health", time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.read() == b"ok":
                    return print(f"rewards.serve: --reward {args.reward} ready on http://{args.host}:{args.port}",
                                 file=sys.stderr, flush=True)
        except OSError:
            pass
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
