"""CLIP-family rewards on transformers' CLIP classes: PickScore, CLIP score, LAION aesthetic.

A self-contained file: it needs torch, transformers and PIL, and can be copied into any project.
Each constructor returns a callable (list of PIL images, list of prompts) -> one float per image.

    pickscore_reward("cuda")   # PickScore_v1: its learned logit scale * cos(image, prompt)
    clip_reward("cuda")        # CLIP score: 100 * cos(image, prompt), CLIP ViT-L/14
    aesthetic_reward("cuda")   # LAION improved aesthetic predictor on CLIP ViT-L/14 (ignores the prompt)
"""
import torch

PICKSCORE = ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")  # model, processor
CLIP_L = "openai/clip-vit-large-patch14"
AESTHETIC_HEAD = ("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth")


def hub_error(what, downloads, e):
    cmds = " and ".join(f"`hf download {d}`" for d in downloads)
    return OSError(f"{what} could not be loaded ({str(e).splitlines()[0]}). Download it on a machine with "
                   f"internet with {cmds} (into the Hugging Face cache, then copy the cache over), or check the path")


def load_clip(model_id, processor_id=None, device="cpu", dtype=torch.float32):
    """(CLIPModel, embed) where embed(images, prompts=None) gives unit-norm image embeddings, and
    text embeddings when prompts are given. Uses the PIL image processor (no torchvision)."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    processor_id = processor_id or model_id
    try:
        model = CLIPModel.from_pretrained(model_id, dtype=dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(processor_id)
        processor = CLIPImageProcessorPil.from_pretrained(processor_id)
    except OSError as e:
        raise hub_error(f"CLIP model {model_id} (processor {processor_id})", sorted({str(model_id), str(processor_id)}),
                        e) from e

    @torch.no_grad()
    def embed(images, prompts=None):
        pixels = processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        img = model.visual_projection(model.vision_model(pixel_values=pixels.to(device, dtype)).pooler_output)
        img = torch.nn.functional.normalize(img.float(), dim=-1)
        if prompts is None:
            return img
        tok = tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt",
                        max_length=model.config.text_config.max_position_embeddings).to(device)
        txt = model.text_projection(model.text_model(input_ids=tok.input_ids,
                                                     attention_mask=tok.attention_mask).pooler_output)
        return img, torch.nn.functional.normalize(txt.float(), dim=-1)

    return model, embed


def clip_reward(model_id=CLIP_L, processor_id=None, scale=100.0, device="cpu", dtype=torch.float32):
    """scale * cos(image, prompt); scale=None uses the model's learned logit scale."""
    model, embed = load_clip(model_id, processor_id, device, dtype)
    s = model.logit_scale.exp().item() if scale is None else scale

    def score(images, prompts):
        img, txt = embed(images, prompts)
        return s * (img * txt).sum(-1)

    score.networks = (model,)  # what --reward-quantize quantizes (drpo's memory.py)
    return score


def pickscore_reward(device="cpu", dtype=torch.float32):
    """PickScore_v1 (a CLIP ViT-H/14 finetuned on Pick-a-Pic): logit_scale * cos(image, prompt)."""
    return clip_reward(*PICKSCORE, scale=None, device=device, dtype=dtype)


def aesthetic_reward(clip_id=CLIP_L, head=None, device="cpu", dtype=torch.float32):
    """LAION improved aesthetic predictor: a linear MLP (no activations between its layers) on the
    unit-norm CLIP ViT-L/14 image embedding. head: aesthetic-model.pth (from the hub when None)."""
    from transformers.utils import cached_file

    model, embed = load_clip(clip_id, clip_id, device, dtype)
    try:
        state = torch.load(head or cached_file(*AESTHETIC_HEAD), map_location="cpu", weights_only=True)
    except OSError as e:
        raise hub_error("the aesthetic head", [" ".join(AESTHETIC_HEAD)], e) from e
    state = {k.removeprefix("layers."): v.float() for k, v in state.items()}
    dims = [state[f"{i}.weight"].shape for i in (0, 2, 4, 6, 7)]
    mlp = torch.nn.Sequential(torch.nn.Linear(dims[0][1], dims[0][0]), torch.nn.Dropout(0.2),
                              torch.nn.Linear(*dims[1][::-1]), torch.nn.Dropout(0.2),
                              torch.nn.Linear(*dims[2][::-1]), torch.nn.Dropout(0.1),
                              torch.nn.Linear(*dims[3][::-1]), torch.nn.Linear(*dims[4][::-1]))
    mlp.load_state_dict(state, strict=True)
    mlp = mlp.to(device).eval()

    @torch.no_grad()
    def score(images, prompts):
        return mlp(embed(images))[:, 0]

    score.networks = (model,)  # what --reward-quantize quantizes (drpo's memory.py); the head stays float32
    return score
