"""A vision-language model served over the OpenAI chat-completions protocol ranks the candidates: --reward vlm.

    vllm serve Qwen/Qwen3-VL-8B-Instruct --port 8000          # or SGLang, `transformers serve`, a hosted API
    python drpo.py --model sd-turbo --reward vlm --reward-url http://127.0.0.1:8000/v1 \\
        --reward-model Qwen/Qwen3-VL-8B-Instruct

DrPO only needs each prompt's ranking of its own K candidates, so a judge that compares two images is enough.

--reward vlm (pairwise). The first image of each prompt in a reward call is the anchor (in training: the prompt's
first candidate, a sample of the current model like the others). Every other candidate is compared with it in both
image orders, with rewards/judge.py's instruction (or --reward-template) and its strict JSON parsing. Its score is 1
when both orders prefer it, 0 when both prefer the anchor, and 0.5 otherwise (a tie, or orders that disagree: a
position bias). The anchor scores 0.5: level with itself. Why this anchor: it costs no extra sample, and it moves
with the model, so the comparison stays informative as training improves every candidate; a fixed anchor such as
the base model's sample is soon beaten by all. 2 (K - 1) requests per prompt.

--reward vlm-rating (pointwise). Each image alone gets a rating from 0 to 10, as JSON. K requests per prompt,
no position bias, but coarser: models rate absolutely far less reliably than they compare.

Invalid answers (no JSON object with a valid "winner" or "score", a truncated answer) are never a win or a loss:
each is asked once more (a server that decodes greedily answers the same again), then counted invalid and given a
neutral score: pairwise, the candidate scores 0.5, as for a tie; rating, the mean of the prompt's valid ratings
(5 when there are none). `reward.counts()` gives and resets the requests and invalid answers since its last
call: drpo.py logs them per update in metrics.jsonl as vlm_requests and vlm_invalid.

A call's requests are all in flight at once, at most --reward-concurrency. Connection errors, timeouts, 429 and
5xx are retried with backoff (0.5 s doubling to 8 s) for --reward-retry seconds; then the run stops with the URL
and the remedy. The API key is read from the environment variable --reward-api-key-env names (OPENAI_API_KEY, as the
client library does), and is never written anywhere; with the variable unset a placeholder is sent, which local
servers accept.
"""
import concurrent.futures
import os
import re
import threading
import time
import urllib.parse
from pathlib import Path

import torch

from rewards.judge import INSTRUCTION, NAMES, consistent, first_object_with, parse_verdict, winner_of
from rewards.remote import png_b64  # the service client's PNG encoding

RATING = """You judge text-to-image generation. This image was generated for the prompt:

"{prompt}"

Rate it from 0 to 10, weighing in this order: how well it does what the prompt asks (the objects it names, their \
attributes and relations, style, counts, composition), then visual quality (artifacts, anatomy, geometry, \
textures, lighting), then overall appeal. Use the whole scale: 0 is unrelated or broken, 10 flawless.

Reply with one JSON object and nothing else, no markdown:
{"score": a number from 0 to 10, "reason": "fewer than 25 words"}"""

# The flags of the served rewards (drpo.py and eval.py): argparse keyword -> add_argument's settings.
FLAGS = {
    "reward_url": dict(metavar="URL", help="--reward vlm / vlm-rating: the server's OpenAI-compatible base, e.g. "
                       "http://127.0.0.1:8000/v1"),
    "reward_model": dict(metavar="NAME", help="--reward vlm / vlm-rating: the model name the server serves"),
    "reward_template": dict(metavar="FILE", help="--reward vlm / vlm-rating: the instruction, verbatim, with a "
                            "{prompt} field (default: rewards/judge.py's pairwise one, or the rating one)"),
    "reward_concurrency": dict(type=int, metavar="N", help="--reward vlm / vlm-rating: requests in flight at once "
                               "(default 16)"),
    "reward_api_key_env": dict(metavar="VAR", help="--reward vlm / vlm-rating: the environment variable holding "
                               "the API key (default OPENAI_API_KEY); the key itself is never written anywhere"),
    "reward_timeout": dict(type=float, metavar="S", help="a served reward's (vlm, http://) seconds per request "
                           "(default 120)"),
    "reward_retry": dict(type=float, metavar="S", help="a served reward's (vlm, http://) seconds of retries on "
                         "connection errors, 429 and 5xx before the run stops (default 50)"),
}
VLM_ONLY = ("reward_url", "reward_model", "reward_template", "reward_concurrency", "reward_api_key_env")


def add_flags(group):
    for key, settings in FLAGS.items():
        group.add_argument("--" + key.replace("_", "-"), **settings)


def check_flags(a, rewards):
    """The served rewards' flags in a (vars of the arguments), against the rewards in use (names)."""
    vlm = next((r for r in rewards if r in ("vlm", "vlm-rating")), None)
    served = [r for r in rewards if r.startswith(("http://", "https://"))]
    for url in served:
        try:
            ok = urllib.parse.urlsplit(url).hostname and urllib.parse.urlsplit(url).port
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"--reward {url}: not a URL like http://HOST:PORT of a reward service")
    for key in (k for k in FLAGS if a.get(k) is not None):
        if not (vlm or served and key not in VLM_ONLY):
            raise ValueError(f"--{key.replace('_', '-')} is a setting of " + ("--reward vlm / vlm-rating" if key in
                             VLM_ONLY else "a served reward (vlm, http://)") + ", which no --reward uses; drop it")
    if vlm:
        for key in ("reward_url", "reward_model"):
            if not a.get(key):
                raise ValueError(f"--reward {vlm} needs --{key.replace('_', '-')} (" + FLAGS[key]["help"].split(": ")[1]
                                 + ")")
        if not re.match(r"https?://", a["reward_url"]):
            raise ValueError(f"--reward-url {a['reward_url']}: not an http:// or https:// URL")
        if a.get("reward_template"):
            read_template(a["reward_template"])
    for key, rule in (("reward_concurrency", "at least 1"), ("reward_timeout", "positive"), ("reward_retry", "0 or "
                      "positive")):
        value = a.get(key)
        if value is not None and (value < 1 if key == "reward_concurrency" else value <= 0 if key == "reward_timeout"
                                  else value < 0):
            raise ValueError(f"--{key.replace('_', '-')} must be {rule}, got {value}")


def read_template(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--reward-template {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if "{prompt}" not in text:
        raise ValueError(f"--reward-template {path} has no {{prompt}} field; write {{prompt}} where the prompt goes")
    return text


def parse_rating(text):
    """An answer -> its "score" in [0, 10] as a float, or None: strict, as judge.parse_verdict."""
    score = (first_object_with(text, "score") or {}).get("score")
    ok = isinstance(score, (int, float)) and not isinstance(score, bool) and 0 <= score <= 10
    return float(score) if ok else None


def data_url(image):
    return "data:image/png;base64," + png_b64(image)


def vlm_reward(reward_url, reward_model, reward_template=None, reward_concurrency=None, reward_api_key_env=None,
               reward_timeout=None, reward_retry=None, mode="pairwise", max_tokens=96, **_):
    """A reward callable (images: list of PIL, prompts) -> 1-D float tensor, from the VLM at reward_url (an
    OpenAI-compatible /v1 base) serving reward_model; mode "pairwise" or "rating" (see the module's docstring)."""
    import openai

    template = read_template(reward_template) if reward_template else INSTRUCTION if mode == "pairwise" else RATING
    retry_s = 50.0 if reward_retry is None else reward_retry
    client = openai.OpenAI(base_url=reward_url, api_key=os.environ.get(reward_api_key_env or "OPENAI_API_KEY")
                           or "unset", timeout=reward_timeout or 120.0, max_retries=0)
    pool = concurrent.futures.ThreadPoolExecutor(reward_concurrency or 16, thread_name_prefix="vlm")
    counts, lock = {"vlm_requests": 0, "vlm_invalid": 0}, threading.Lock()
    transient = (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)
    parse = parse_verdict if mode == "pairwise" else parse_rating
    down = []  # the first request that gave up: the others then give up at once, with its message

    def answer(content):
        """One request -> its answer's text, retrying transient failures for retry_s seconds."""
        start, wait = time.monotonic(), 0.5
        while True:
            if down:
                raise ConnectionError(down[0])
            try:
                reply = client.chat.completions.create(model=reward_model, max_tokens=max_tokens, temperature=0.0,
                                                       messages=[{"role": "user", "content": content}])
                return reply.choices[0].message.content or ""
            except transient as e:
                error = f"{type(e).__name__}: {e}"
            except openai.APIStatusError as e:  # 4xx but 429: waiting will not help
                raise ValueError(f"the VLM server at {reward_url} refused the request: HTTP {e.status_code} "
                                 f"{str(e)[:300]}" + (f"; set the API key in ${reward_api_key_env or 'OPENAI_API_KEY'}"
                                                      if e.status_code in (401, 403) else "")) from None
            waited = time.monotonic() - start
            if waited + wait > retry_s:
                down.append(f"the VLM server at {reward_url} did not answer for {waited:.0f} s (last: {error[:200]}). "
                            f"Start it, or fix --reward-url, or raise --reward-retry; a training run's last "
                            f"checkpoint is intact: continue it with --resume")
                raise ConnectionError(down[0]) from None
            time.sleep(wait)
            wait = min(2 * wait, 8.0)

    def ask(urls, prompt):
        """One question (the images' data URLs, the prompt) -> the parsed answer or None, asked twice at most."""
        content = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
        words = (NAMES if mode == "pairwise" else "") + template.replace("{prompt}", prompt)  # the text holds braces
        content.append({"type": "text", "text": words})
        for _ in range(2):
            parsed = parse(answer(content))
            with lock:
                counts["vlm_requests"] += 1
            if parsed is not None:
                return parsed
        with lock:
            counts["vlm_invalid"] += 1
        return None

    def reward(images, prompts):
        down.clear()
        try:
            return scores_of(images, prompts)
        except BaseException:
            down.append(down[0] if down else "the reward call was interrupted")  # the queued requests stop at once
            raise

    def scores_of(images, prompts):
        urls = list(pool.map(data_url, images))
        groups = {}  # prompt -> the indices of its images; the first is the anchor
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        if mode == "rating":
            futures = [pool.submit(ask, [u], p) for u, p in zip(urls, prompts)]
            ratings = [f.result() for f in futures]
            scores = torch.zeros(len(images))
            for idx in groups.values():
                valid = [ratings[i] for i in idx if ratings[i] is not None]
                for i in idx:
                    scores[i] = ratings[i] if ratings[i] is not None else sum(valid) / len(valid) if valid else 5.0
            return scores
        pairs = [(i, idx[0], p) for p, idx in groups.items() for i in idx[1:]]
        futures = [(pool.submit(ask, [urls[i], urls[a]], p), pool.submit(ask, [urls[a], urls[i]], p))
                   for i, a, p in pairs]
        scores = torch.full((len(images),), 0.5)
        for (i, _, _), (first, second) in zip(pairs, futures):
            verdict = consistent(winner_of(first.result(), "candidate", "anchor"),
                                 winner_of(second.result(), "anchor", "candidate"))
            scores[i] = {"candidate": 1.0, "anchor": 0.0}.get(verdict, 0.5)  # tie, disagreement or invalid: 0.5
        return scores

    def take_counts():
        with lock:
            taken = dict(counts)
            counts.update(dict.fromkeys(counts, 0))
        return taken

    reward.counts, reward.batch_size = take_counts, None  # None: load_reward passes a whole call at once
    return reward
