"""The client of a reward service (`python -m rewards.serve`): --reward http://HOST:PORT in drpo.py and eval.py.

Standard library only, so a trainer needs nothing the service needs. The protocol is in rewards/serve.py.
"""
import base64
import io
import json
import time
import urllib.error
import urllib.request

TRANSIENT = (429, 500, 502, 503, 504)  # a busy or restarting server: retried with backoff


def png_b64(image):
    """A PIL image as base64 PNG text (lossless; compress level 1: fast, a little larger)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def post_json(url, payload, timeout, retry_s, what):
    """POST payload as JSON to url (None: GET) -> the answer's bytes. Connection errors, timeouts, 429 and 5xx are
    retried with backoff (0.5 s doubling to 8 s) until retry_s seconds have passed, then ConnectionError; other
    4xx: ValueError with the server's reason. `what` names the server in messages."""
    body, start, wait = None if payload is None else json.dumps(payload).encode(), time.monotonic(), 0.5
    while True:
        request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return answer.read()
        except urllib.error.HTTPError as e:
            if e.code not in TRANSIENT:
                raise ValueError(f"{what} refused the request: HTTP {e.code} {e.read()[:300].decode(errors='replace')}")
            error = f"HTTP {e.code}"
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            error = str(getattr(e, "reason", e))
        if time.monotonic() - start + wait > retry_s:
            raise ConnectionError(f"{what} did not answer for {time.monotonic() - start:.0f} s (last: {error}). Start "
                                  f"it, or fix the URL, or raise --reward-retry; a training run's last checkpoint is "
                                  f"intact: continue it with --resume") from None
        time.sleep(wait)
        wait = min(2 * wait, 8.0)


def served_reward(url, reward_timeout=None, reward_retry=None, **_):
    """A reward callable (images: list of PIL, prompts) -> 1-D float tensor, scored by the service at url
    (`python -m rewards.serve`). Waits (reward_retry seconds at most, default 50) until the service answers its
    health check; each request may take reward_timeout seconds (default 120). Other keywords are ignored."""
    import torch

    timeout, retry_s = reward_timeout or 120.0, 50.0 if reward_retry is None else reward_retry
    url = url.rstrip("/")
    what = f"the reward service at {url}"
    health = post_json(f"{url}/health", None, timeout, retry_s, what)
    if health.strip() != b"ok":
        raise ValueError(f"{url}/health answered {health[:80]!r}, not a reward service's ok; check the URL")

    def reward(images, prompts):
        payload = {"prompts": list(prompts), "images": [png_b64(im) for im in images]}
        answer = json.loads(post_json(f"{url}/score", payload, timeout, retry_s, what))
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, list) or len(scores) != len(images):
            raise ValueError(f"{what} answered {str(answer)[:200]!r}, not {len(images)} scores")
        return torch.tensor(scores, dtype=torch.float32)

    reward.batch_size = None  # load_reward sends a whole call (one prompt's images) in one request
    return reward
