"""ImageReward (THUDM/ImageReward) on transformers' BLIP classes, without the `image-reward` package.

A self-contained file: it needs torch, transformers and PIL, and can be copied into any project.
`imagereward_reward(...)` returns a callable (list of PIL images, list of prompts) -> one float
per image (the paper's tables report it x10).

Why a port: `image-reward` 1.5 does not import on transformers 5, and installing it pulls a
torchvision that replaces a CPU torch with a CUDA build. The model is BLIP: a ViT-L/16 image
encoder, a BERT-base text encoder that cross-attends to the image tokens, and an MLP on the text
output at position 0. This file loads the released `ImageReward.pt` into `BlipVisionModel` and
`BlipTextModel` by key mapping, strictly, and reproduces the published scores (tested against the
published code on a tiny random checkpoint, fixtures/imagereward_tiny).

    reward = imagereward_reward("cuda", ckpt="ImageReward.pt", config="med_config.json",
                                tokenizer="bert-base-uncased")
    scores = reward(images, prompts)
"""
import json
import pickle
import re

import torch

HUB = "THUDM/ImageReward"  # ImageReward.pt and med_config.json
TOKENIZER = "bert-base-uncased"
MEAN, STD = 0.16717362830052426, 1.0333394966054072  # the published score normalization
MAX_LENGTH = 35  # prompts are padded / truncated to 35 tokens
SIDE = 224
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
UNUSED = ("blip.text_encoder.embeddings.position_ids", "blip.vision_proj.", "blip.text_proj.")  # not in the score


def map_key(k):
    """A key of the released checkpoint -> ("vision" | "text" | "head", key in our modules), or None."""
    if k.startswith("blip.visual_encoder."):
        k = k[len("blip.visual_encoder."):]
        for old, new in (("cls_token", "embeddings.class_embedding"),
                         ("pos_embed", "embeddings.position_embedding"),
                         ("patch_embed.proj", "embeddings.patch_embedding"), ("norm1", "layer_norm1"),
                         ("norm2", "layer_norm2"), ("attn.qkv", "self_attn.qkv"),
                         ("attn.proj", "self_attn.projection")):
            k = k.replace(old, new)
        k = re.sub(r"^blocks\.(\d+)\.", r"encoder.layers.\1.", k)
        return "vision", re.sub(r"^norm\.", "post_layernorm.", k)
    if k.startswith("blip.text_encoder."):
        return "text", k[len("blip.text_encoder."):]
    if k.startswith("mlp.layers."):
        return "head", k[len("mlp.layers."):]
    return None


def preprocess(images):
    """The published preprocessing: shorter side to 224 (bicubic, longer side floored), centre crop
    224 with the offset rounded (torchvision's CenterCrop), RGB, /255, CLIP mean and std."""
    import numpy as np
    from PIL import Image

    arrays = []
    for im in images:
        w, h = im.size
        w, h = (SIDE, int(SIDE * h / w)) if w <= h else (int(SIDE * w / h), SIDE)
        im = im.resize((w, h), Image.BICUBIC)
        left, top = int(round((w - SIDE) / 2.0)), int(round((h - SIDE) / 2.0))
        arrays.append(np.asarray(im.crop((left, top, left + SIDE, top + SIDE)).convert("RGB"), dtype=np.float32))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255
    return (x - torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(PIXEL_STD).view(1, 3, 1, 1)


def imagereward_reward(device="cpu", ckpt=None, config=None, tokenizer=None, dtype=torch.float32, vision_heads=None):
    """ImageReward score: (mlp(text output at position 0) - MEAN) / STD, higher is better.

    ckpt: ImageReward.pt, config: its med_config.json (both from the hub repo THUDM/ImageReward
    when None), tokenizer: a bert-base-uncased folder or hub id. The vision encoder's size comes
    from the checkpoint; its heads are width / 64 (ViT-L/16: 16), or the text encoder's head count
    for a width that is no multiple of 64 (tiny test models), unless vision_heads is given.
    """
    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel
    from transformers.utils import cached_file

    try:
        ckpt = ckpt or cached_file(HUB, "ImageReward.pt")
        config = config or cached_file(HUB, "med_config.json")
        tok = BertTokenizer.from_pretrained(str(tokenizer or TOKENIZER))
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        med = json.loads(open(config).read())
    except OSError as e:
        raise OSError(f"ImageReward needs ImageReward.pt, med_config.json and the bert-base-uncased tokenizer "
                      f"({str(e).splitlines()[0]}). Download them with `hf download {HUB} ImageReward.pt "
                      f"med_config.json --local-dir DIR` and `hf download {TOKENIZER} --local-dir TOK`, then pass "
                      f"--imagereward-ckpt DIR/ImageReward.pt --imagereward-config DIR/med_config.json "
                      f"--imagereward-tokenizer TOK") from e
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:  # torch.load: a cut download, or foreign code
        raise ValueError(f"{ckpt} is damaged or not ImageReward's checkpoint ({type(e).__name__}); download it "
                         f"again with `hf download {HUB} ImageReward.pt --local-dir DIR`") from e
    state = state.get("state_dict", state)
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})  # as BLIP's init_tokenizer

    parts, unexpected = {"vision": {}, "text": {}, "head": {}}, []
    for k, v in state.items():
        if k.startswith(UNUSED):
            continue
        mapped = map_key(k)
        if mapped:
            parts[mapped[0]][mapped[1]] = v.float()
        else:
            unexpected.append(k)
    vis = parts["vision"]
    if "embeddings.class_embedding" not in vis or "embeddings.word_embeddings.weight" not in parts["text"]:
        raise ValueError(f"{ckpt} is not an ImageReward checkpoint: it lacks blip.visual_encoder.cls_token or "
                         f"blip.text_encoder.embeddings.word_embeddings.weight")
    width = vis["embeddings.class_embedding"].shape[-1]
    depth = 1 + max(int(k.split(".")[2]) for k in vis if k.startswith("encoder.layers."))
    heads = vision_heads or (width // 64 if width % 64 == 0 else med["num_attention_heads"])
    vision = BlipVisionModel(BlipVisionConfig(
        hidden_size=width, intermediate_size=vis["encoder.layers.0.mlp.fc1.weight"].shape[0], num_hidden_layers=depth,
        num_attention_heads=heads, image_size=SIDE, patch_size=vis["embeddings.patch_embedding.weight"].shape[-1],
        layer_norm_eps=1e-6, hidden_act="gelu"))
    text = BlipTextModel(BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], intermediate_size=med["intermediate_size"],
        max_position_embeddings=med["max_position_embeddings"], layer_norm_eps=med["layer_norm_eps"],
        hidden_act=med["hidden_act"], encoder_hidden_size=width, is_decoder=True,  # is_decoder: cross-attention
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id),
        add_pooling_layer=False)
    lin = [torch.nn.Linear(*parts["head"][f"{i}.weight"].shape[::-1]) for i in (0, 2, 4, 6, 7)]
    drop = torch.nn.Dropout(0.0)  # the published MLP's dropouts, inactive in eval
    head = torch.nn.Sequential(lin[0], drop, lin[1], drop, lin[2], drop, lin[3], lin[4])  # no activations
    # Strict: every weight of the three modules from the checkpoint, and no checkpoint weight left over.
    missing = []
    for name, module in (("vision", vision), ("text", text), ("head", head)):
        result = module.load_state_dict(parts[name], strict=False)
        missing += [f"{name}: {k}" for k in result.missing_keys]
        unexpected += [f"{name}: {k}" for k in result.unexpected_keys]
    if missing or unexpected:
        raise ValueError(f"{ckpt} does not map onto ImageReward: missing {missing or 'none'}, unexpected "
                         f"{unexpected or 'none'} (names after mapping; see map_key in rewards/imagereward.py)")
    vision, text = vision.to(device, dtype).eval(), text.to(device, dtype).eval()
    head = head.to(device).eval()  # float32, as the published score

    @torch.no_grad()
    def score(images, prompts):
        tokens = tok(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH,
                     return_tensors="pt").to(device)
        image_tokens = vision(pixel_values=preprocess(images).to(device, dtype)).last_hidden_state
        hidden = text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                      encoder_hidden_states=image_tokens).last_hidden_state
        return (head(hidden[:, 0].float())[:, 0] - MEAN) / STD

    score.networks = (vision, text)  # what --reward-quantize quantizes (drpo's memory.py); the head stays float32
    return score
