"""A pairwise preference judge: a vision-language model (default Qwen/Qwen3-VL-8B-Instruct) shown two
images of one prompt says which is better, as JSON. The comparison of the DrPO paper's project page.

A self-contained file: it needs torch, transformers and PIL, and can be copied into any project.

    judge = load_judge("Qwen/Qwen3-VL-8B-Instruct", "cuda")       # or a local folder
    answers = judge([(image_a, image_b, prompt), ...])            # raw texts, batched
    verdicts = [parse_verdict(a) for a in answers]                # "A", "B", "tie" or None (invalid)

The protocol follows the authors' evaluation script (UGVly/DrPO at 61329a4, since removed): bf16,
greedy decoding, at most 96 new tokens, one user message holding image A, image B, a line naming
them and the instruction; one order per pair, swapped when the first 8 hex digits of
sha256(f"{salt}:{prompt_id}:{seed}") are odd (`swapped`); rates wins / (valid - ties) and
(wins + ties / 2) / valid. The instruction below is our own wording of their criteria (their
repository states no license); `load_judge(template=...)` takes any text with a {prompt} field,
theirs included. Answers are parsed strictly: a JSON object with a "winner" of A, B or tie, or
the answer is invalid. Nothing is guessed from free text.

Inputs are built without Qwen3-VL's processor class (it insists on a video processor, which needs
torchvision): the PIL image processor of the model folder, the tokenizer's chat template, and each
image's <|image_pad|> expanded to its grid / merge_size^2 tokens, as the processor does.
"""
import hashlib
import json
import re
from pathlib import Path

import torch

DEFAULT_MODEL = "Qwen/Qwen3-VL-8B-Instruct"
SALT = "qwen3vl_pairwise_v1"
NAMES = "The first image is Image A. The second image is Image B.\n\n"
INSTRUCTION = """You judge text-to-image generation. Two images were generated for the same prompt. Decide \
which one a careful viewer would prefer: the one that better does what the prompt asks while also \
looking good.

Prompt: "{prompt}"

Weigh these in order, and move to a later one only when the earlier ones leave the images level:
1. Prompt alignment: the objects the prompt names, their attributes, how they relate, the style, \
counts and composition.
2. Visual quality: artifacts, anatomy, geometry, textures, lighting, and whether the image is \
rendered consistently.
3. Overall appeal.

The names A and B say nothing about the images; do not let them sway you. Count against an image: \
obvious artifacts, broken shapes, key objects missing or extra, required text that cannot be \
read, and content the prompt does not call for. Answer "tie" only when the two are genuinely \
comparable.

Reply with one JSON object and nothing else, no markdown:
{"winner": "A" or "B" or "tie", "confidence": a number from 0.0 to 1.0, "reason": "fewer than 25 words"}"""


def swapped(prompt_id, seed, salt=SALT):
    """The authors' one order per pair: B shown first when sha256("salt:prompt_id:seed")[:8] is odd."""
    return int(hashlib.sha256(f"{salt}:{prompt_id}:{seed}".encode()).hexdigest()[:8], 16) % 2 == 1


def first_object_with(text, key):
    """The first JSON object in text that has key, or None. Code fences and text around it are allowed."""
    text = re.sub(r"```(?:json)?", "", str(text))
    decoder = json.JSONDecoder()
    for start in (m.start() for m in re.finditer(r"\{", text)):
        try:
            obj, _ = decoder.raw_decode(text, start)
        except ValueError:
            continue
        if isinstance(obj, dict) and key in obj:
            return obj
    return None


def parse_verdict(text):
    """An answer -> "A", "B", "tie", or None when it holds no JSON object with such a "winner".

    Code fences and text around the object are allowed; the first object with a "winner" decides.
    Case and surrounding spaces of the winner do not matter ("b", " Tie "). A bare "A" is not JSON:
    invalid, as is anything else a judge might ramble."""
    obj = first_object_with(text, "winner")
    return None if obj is None else {"a": "A", "b": "B", "tie": "tie"}.get(str(obj["winner"]).strip().lower())


def winner_of(verdict, a, b):
    """A parsed verdict for (a in slot A, b in slot B) -> the winning model's name, "tie", or None."""
    return {"A": a, "B": b, "tie": "tie"}.get(verdict)


def consistent(first, second):
    """Two orders' winners (model names, "tie" or None) -> the position-consistent verdict: a model only
    when both orders name it; "tie" for any other valid pair; None when either answer is invalid."""
    if first is None or second is None:
        return None
    return first if first == second else "tie"


def rates(winners, model):
    """{wins, losses, ties, valid, invalid, win_rate = wins / (valid - ties), preference = (wins + ties/2) / valid}
    of `model` among winners (model names, "tie", None for invalid)."""
    valid = [w for w in winners if w is not None]
    wins, ties = sum(w == model for w in valid), sum(w == "tie" for w in valid)
    decided = len(valid) - ties
    return {"wins": wins, "losses": decided - wins, "ties": ties, "valid": len(valid),
            "invalid": len(winners) - len(valid), "win_rate": wins / decided if decided else float("nan"),
            "preference": (wins + ties / 2) / len(valid) if valid else float("nan")}


def _chat_template(model):
    """The folder's chat template (chat_template.jinja or .json), or None for the tokenizer's own."""
    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        path = cached_file(model, name, _raise_exceptions_for_missing_entries=False)
        if path:
            text = Path(path).read_text(encoding="utf-8")
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


def load_judge(model=DEFAULT_MODEL, device="cpu", dtype=None, template=None, batch_size=8, max_new_tokens=96):
    """A judge callable: [(image A, image B, prompt), ...] -> the model's raw answers, batch_size pairs
    per `generate` call (left padding, greedy). template: the instruction with a {prompt} field
    (default INSTRUCTION); dtype: None = bf16 on CUDA, else fp32. `judge.text(prompt)` is the chat
    text one pair's message renders to, before the images' tokens are expanded; `judge.inputs(pairs)`
    what `generate` is given for them."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    template = INSTRUCTION if template is None else template
    if "{prompt}" not in template:
        raise ValueError("the judge's instruction template has no {prompt} field; write {prompt} where the prompt goes")
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
        processor = Qwen2VLImageProcessorPil.from_pretrained(model)
        chat_template = _chat_template(model)
        net = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype).to(device).eval()
    except OSError as e:
        hub_id = model if not Path(model).expanduser().exists() and not str(model).startswith((".", "/", "~")) \
            else DEFAULT_MODEL
        raise OSError(f"could not load the judge {model} ({str(e).splitlines()[0]}). Download it where there is "
                      f"internet, `hf download {hub_id} --local-dir DIR`, then pass --judge DIR") from e
    merge = processor.merge_size ** 2
    pad = "<|image_pad|>"

    def text(prompt):
        words = NAMES + template.replace("{prompt}", prompt)  # replace, not format: the text holds JSON braces
        message = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": words}]}]
        return tokenizer.apply_chat_template(message, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=True)

    def inputs(pairs):
        """generate's inputs for [(image A, image B, prompt), ...]: token ids with each <|image_pad|> run as
        long as its image's merged patches, left-padded, and the images' patches and grids."""
        vis = processor(images=[im.convert("RGB") for a, b, _ in pairs for im in (a, b)], return_tensors="pt")
        runs = iter(int(g.prod()) // merge for g in vis["image_grid_thw"])
        texts = []
        for _, _, prompt in pairs:
            pieces = text(prompt).split(pad)
            texts.append(pieces[0] + "".join(pad * next(runs) + piece for piece in pieces[1:]))
        tok = tokenizer(texts, padding=True, return_tensors="pt")
        return {"input_ids": tok.input_ids, "attention_mask": tok.attention_mask,
                "pixel_values": vis["pixel_values"].to(dtype), "image_grid_thw": vis["image_grid_thw"]}

    @torch.no_grad()
    def judge(pairs):
        answers = []
        for i in range(0, len(pairs), batch_size):
            batch = {k: v.to(device) for k, v in inputs(pairs[i:i + batch_size]).items()}
            out = net.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
            answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return answers

    judge.text, judge.inputs = text, inputs
    return judge


def preference_ci(winners_by_prompt, model, resamples=10_000, seed=0):
    """95 % percentile-bootstrap interval of `model`'s preference share (wins + ties / 2) / valid,
    resampling prompts (each with all its seeds' verdicts): [[winner, ...] per prompt] -> [lo, hi]."""
    count = lambda f: torch.tensor([sum(f(w) for w in ws) for ws in winners_by_prompt], dtype=torch.float64)
    score, valid = count(lambda w: (w == model) + 0.5 * (w == "tie")), count(lambda w: w is not None)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(winners_by_prompt), (resamples, len(winners_by_prompt)), generator=g)
    shares = score[idx].sum(1) / valid[idx].sum(1)  # NaN where a resample holds no valid verdict
    shares = shares[~shares.isnan()]
    if len(shares) == 0:
        return [float("nan"), float("nan")]
    return torch.quantile(shares, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
