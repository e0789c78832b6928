"""GenEval (Ghosh et al., github.com/djghosh13/geneval, MIT): object-focused checks of a text-to-image model.

A self-contained file: it needs torch, transformers (and scipy, which transformers' Mask2Former
imports), PIL and numpy, and can be copied into any project.

Each GenEval prompt comes with metadata, one JSON object per line of `evaluation_metadata.jsonl`:
`tag` (single_object, two_object, counting, colors, position, color_attr), `prompt`, `include`
(clauses `{"class", "count", "color"?, "position"?: [relation, index of an earlier clause]}`)
and `exclude` (`{"class", "count"}`). Scoring an image has two parts:

- the models produce detections: a Mask2Former instance segmenter finds COCO objects
  (`detect`), and CLIP ViT-L/14 names the colour of an object from its masked crop;
- `decide(metadata, detections)`, a pure function, applies the official scorer's rules
  (thresholds, sorting, the cap of 16 per class, counts, colours, relative positions).

The official benchmark runs an mmdetection Mask2Former Swin-S COCO checkpoint. Here the detector
is transformers' `facebook/mask2former-swin-small-coco-instance`: the same architecture and
training data, but not the same file, so scores are close to, not identical with, the official
ones. Detections follow the official recipe from the raw outputs (top 100 query-class pairs,
score = class probability x mean mask sigmoid inside the mask, box = the mask's tight box).

As a training reward, `geneval_reward` grades instead of deciding: (clauses met + confidence) /
(clauses + 1), so a correct image outranks a partly correct one, which outranks a wrong one, and
detector confidence breaks ties among equals.
"""
import json

import torch

DETECTOR = "facebook/mask2former-swin-small-coco-instance"
CLIP = "openai/clip-vit-large-patch14"
# The 80 COCO classes in the detector's label order (GenEval's object_names.txt).
CLASSES = tuple((
    "person|bicycle|car|motorcycle|airplane|bus|train|truck|boat|traffic light|fire hydrant|"
    "stop sign|parking meter|bench|bird|cat|dog|horse|sheep|cow|elephant|bear|zebra|giraffe|backpack|"
    "umbrella|handbag|tie|suitcase|frisbee|skis|snowboard|sports ball|kite|baseball bat|"
    "baseball glove|skateboard|surfboard|tennis racket|bottle|wine glass|cup|fork|knife|spoon|bowl|"
    "banana|apple|sandwich|orange|broccoli|carrot|hot dog|pizza|donut|cake|chair|couch|potted plant|"
    "bed|dining table|toilet|tv|laptop|computer mouse|tv remote|computer keyboard|cell phone|"
    "microwave|oven|toaster|sink|refrigerator|book|clock|vase|scissors|teddy bear|hair drier|"
    "toothbrush"
).split("|"))
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
THRESHOLD, COUNTING_THRESHOLD = 0.3, 0.9  # detector score a kept object must exceed
MAX_OBJECTS = 16  # kept per class
POSITION_THRESHOLD = 0.1  # fraction of the two objects' sizes an offset must exceed to count
BACKGROUND = (153, 153, 153)  # fills what lies outside an object's mask before its colour is named


def read_metadata(path):
    """evaluation_metadata.jsonl -> list of dicts, checked line by line."""
    rows = []
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n} is not JSON ({e}); GenEval metadata has one object per line") from e
            if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and "tag" in row and "include" in row):
                raise ValueError(f"{path}, line {n}: a GenEval metadata line needs prompt, tag and include")
            rows.append(row)
    return rows


def relative_position(a, b):
    """The relations of box a to box b ([x0, y0, x1, y1], y down): a subset of left of, right of,
    above, below. Offsets shrink by POSITION_THRESHOLD of the sizes; nearly coincident -> none."""
    center = [(a[i] + a[i + 2]) / 2 - (b[i] + b[i + 2]) / 2 for i in (0, 1)]
    size = [abs(a[i + 2] - a[i]) + abs(b[i + 2] - b[i]) for i in (0, 1)]
    revised = [max(abs(o) - POSITION_THRESHOLD * s, 0) * (1 if o > 0 else -1 if o < 0 else 0)
               for o, s in zip(center, size)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    norm = (center[0] ** 2 + center[1] ** 2) ** 0.5
    dx, dy = revised[0] / norm, revised[1] / norm
    return {rel for rel, holds in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                   ("below", dy > 0.5)) if holds}


def keep(metadata, detections):
    """The official filtering: per class, scores above the tag's threshold, highest first, at most 16."""
    threshold = COUNTING_THRESHOLD if metadata["tag"] == "counting" else THRESHOLD
    kept = {}
    for d in sorted(detections, key=lambda d: -d["score"]):
        if d["score"] > threshold and len(kept.setdefault(d["label"], [])) < MAX_OBJECTS:
            kept[d["label"]].append(d)
    return kept


def clauses(metadata, detections):
    """[(met, reason, matched objects)] for each include clause, then each exclude clause."""
    kept, groups, out = keep(metadata, detections), [], []
    for req in metadata["include"]:
        name, count = req["class"], req["count"]
        found = kept.get(name, [])[:count]
        reason = ""
        if len(found) < count:
            reason = f"expected {name}>={count}, found {len(found)}"
        elif "color" in req and sum(d.get("color") == req["color"] for d in found) < count:
            colors = [d.get("color") for d in found]
            reason = (f"expected {req['color']} {name}>={count}, found {colors.count(req['color'])} {req['color']}; "
                      f"and " + ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors))
        elif "position" in req:
            relation, target = req["position"]
            if groups[target] is None:
                reason = f"no target for {name} to be {relation}"
            else:  # every (object, target) pair must hold the relation
                for a in found:
                    for b in groups[target]:
                        rels = relative_position(a["box"], b["box"])
                        if relation not in rels and not reason:
                            reason = f"expected {name} {relation} target, found {' and '.join(sorted(rels))} target"
        groups.append(None if reason else found)
        out.append((not reason, reason, found if not reason else []))
    for req in metadata.get("exclude", []):
        n = len(kept.get(req["class"], []))
        met = n < req["count"]
        out.append((met, "" if met else f"expected {req['class']}<{req['count']}, found {n}", []))
    return out


def decide(metadata, detections):
    """The official verdict on one image: (correct, reason).

    metadata: one line of evaluation_metadata.jsonl; detections: every detection of the image,
    unfiltered, as {"label": COCO name, "score": float, "box": [x0, y0, x1, y1], "color": one of
    COLORS (needed only for objects of clauses that name a colour)}."""
    results = clauses(metadata, detections)
    return all(met for met, _, _ in results), "\n".join(reason for _, reason, _ in results if reason)


def grade(metadata, detections):
    """The training reward: (clauses met + mean score of the matched objects) / (clauses + 1), in
    [0, 1); every extra clause met outranks any confidence."""
    results = clauses(metadata, detections)
    scores = [d["score"] for _, _, objs in results for d in objs]
    confidence = min(sum(scores) / len(scores), 0.999) if scores else 0.0
    return (sum(met for met, _, _ in results) + confidence) / (len(results) + 1)


def load_detector(device="cpu", detector=None, clip=None, dtype=torch.float32, short_side=800, long_side=1333):
    """detect(images, metadatas) -> one list of detections per image, for decide / grade.

    detector: a Mask2Former instance-segmentation folder or hub id; clip: a CLIP folder or hub id
    (colours). short_side / long_side: the test-time resize of the official config (800, 1333)."""
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel, Mask2FormerForUniversalSegmentation

    detector, clip = str(detector or DETECTOR), str(clip or CLIP)
    try:
        net = Mask2FormerForUniversalSegmentation.from_pretrained(detector, dtype=dtype).to(device).eval()
        clip_model = CLIPModel.from_pretrained(clip, dtype=dtype).to(device).eval()
        tokenizer, processor = AutoTokenizer.from_pretrained(clip), CLIPImageProcessorPil.from_pretrained(clip)
    except OSError as e:
        raise OSError(f"GenEval needs the Mask2Former detector and CLIP ViT-L/14 ({str(e).splitlines()[0]}). Download "
                      f"them with `hf download {DETECTOR} --local-dir DET` and `hf download {CLIP} --local-dir CLIP`, "
                      f"then pass --geneval-detector DET --geneval-clip CLIP") from e
    mean = torch.tensor([123.675, 116.28, 103.53], device=device).view(3, 1, 1)  # ImageNet, 0-255 scale
    std = torch.tensor([58.395, 57.12, 57.375], device=device).view(3, 1, 1)
    color_text = {}

    def color_classifier(name):
        """(10, D): per colour, the normalized mean of the three templates' normalized text embeddings."""
        if name not in color_text:
            templates = (f"a photo of a {{}} {name}", f"a photo of a {{}}-colored {name}", "a photo of a {} object")
            tok = tokenizer([t.format(c) for c in COLORS for t in templates], padding=True, return_tensors="pt")
            tok = tok.to(device)
            emb = clip_model.text_projection(clip_model.text_model(input_ids=tok.input_ids,
                                                                   attention_mask=tok.attention_mask).pooler_output)
            emb = F.normalize(emb.float(), dim=-1)
            color_text[name] = F.normalize(emb.view(len(COLORS), len(templates), -1).mean(1), dim=-1)
        return color_text[name]

    def raw_detections(image):
        """Every (query, class) pair of the top 100, with its score, box and mask at image size."""
        w, h = image.size
        scale = min(long_side / max(w, h), short_side / min(w, h))
        rw, rh = int(w * scale + 0.5), int(h * scale + 0.5)
        x = torch.from_numpy(np.asarray(image.convert("RGB").resize((rw, rh), Image.BILINEAR), dtype=np.float32))
        x = (x.permute(2, 0, 1).to(device) - mean) / std
        x = F.pad(x, (0, -rw % 32, 0, -rh % 32))  # pad right / bottom to multiples of 32
        out = net(pixel_values=x[None].to(dtype))
        probs = out.class_queries_logits[0].float().softmax(-1)[:, :-1]  # (queries, classes), no-object dropped
        top = probs.flatten().topk(min(100, probs.numel()))
        query, label = top.indices // probs.shape[1], top.indices % probs.shape[1]
        logits = F.interpolate(out.masks_queries_logits[0, query][None].float(), size=x.shape[1:], mode="bilinear",
                               align_corners=False)[..., :rh, :rw]
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)[0]
        masks = logits > 0
        mask_score = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
        in_column, in_row = masks.any(1), masks.any(2)  # (n, w), (n, h): which columns / rows a mask covers
        dets = []
        for i in range(len(query)):
            xs, ys = in_column[i].nonzero()[:, 0], in_row[i].nonzero()[:, 0]
            box = [xs[0].item(), ys[0].item(), xs[-1].item() + 1, ys[-1].item() + 1] if len(xs) else [0, 0, 0, 0]
            dets.append({"label": CLASSES[label[i]], "score": (top.values[i] * mask_score[i]).item(), "box": box})
        return dets, masks

    @torch.no_grad()
    def detect(images, metadatas):
        results = []
        for image, meta in zip(images, metadatas):
            image = image.convert("RGB")
            dets, masks = raw_detections(image)
            # Colours only where a clause asks for one, for the objects it can take (the first kept ones).
            kept = keep(meta, [dict(d, index=i) for i, d in enumerate(dets)])
            for req in (r for r in meta["include"] if "color" in r):
                objs = kept.get(req["class"], [])[:req["count"]]
                if not objs:
                    continue
                crops = []
                for d in objs:
                    mask = Image.fromarray(masks[d["index"]].cpu().numpy())
                    crops.append(Image.composite(image, Image.new("RGB", image.size, BACKGROUND), mask).crop(d["box"]))
                pixels = processor(images=crops, return_tensors="pt").pixel_values.to(device, dtype)
                emb = clip_model.visual_projection(clip_model.vision_model(pixel_values=pixels).pooler_output)
                emb = F.normalize(emb.float(), dim=-1)
                for d, c in zip(objs, (emb @ color_classifier(req["class"]).T).argmax(1).tolist()):
                    dets[d["index"]]["color"] = COLORS[c]
            results.append(dets)
        return results

    return detect


def geneval_reward(metadata, device="cpu", detector=None, clip=None, dtype=torch.float32):
    """The graded GenEval reward (see grade) for prompts of a metadata file (or a list of its rows):
    each image's metadata is found through its prompt."""
    if metadata is None:
        raise ValueError("the geneval reward needs the GenEval metadata: evaluation_metadata.jsonl from the GenEval "
                         "repository's prompts/ folder (in drpo.py: --prompts evaluation_metadata.jsonl)")
    rows = metadata if isinstance(metadata, list) else read_metadata(metadata)
    by_prompt = {row["prompt"]: row for row in rows}
    detect = load_detector(device, detector, clip, dtype)

    def score(images, prompts):
        missing = sorted(set(prompts) - set(by_prompt))
        if missing:
            raise ValueError(f"the GenEval reward has no metadata for the prompt(s) {missing[:3]}; train on the "
                             f"prompts of the metadata file (--prompts evaluation_metadata.jsonl)")
        metas = [by_prompt[p] for p in prompts]
        return [grade(m, d) for m, d in zip(metas, detect(images, metas))]

    return score
