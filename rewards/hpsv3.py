"""HPSv3 (MizzenAI/HPSv3): Qwen2-VL-7B-Instruct with a reward head, ported to current transformers.

A self-contained file: it needs torch, transformers, PIL and safetensors, and can be copied into
any project. `hpsv3_reward(...)` returns a callable (list of PIL images, list of prompts) -> one
float per image.

Why a port: the `hpsv3` package pins transformers 4.45, which cannot live beside current diffusers.
This file loads the published `HPSv3.safetensors` (saved in the transformers 4.45 layout) into
current Qwen2-VL classes and reproduces the published scores (tested against scores of the
published code on a tiny random checkpoint, fixtures/hpsv3_tiny).

    reward = hpsv3_reward("cuda", ckpt="HPSv3.safetensors", base="Qwen2-VL-7B-Instruct/")
    scores = reward(images, prompts)  # higher is better
"""
import json
from pathlib import Path

import torch

# The user message, byte-identical to INSTRUCTION and prompt_with_special_token of hpsv3==1.0.0.
INSTRUCTION = (
    '\n'
    'You are tasked with evaluating a generated image based on Visual Quality and Text '
    'Alignment and give a overall score to estimate the human preference. Please provide a '
    'rating from 0 to 10, with 0 being the worst and 10 being the best. \n'
    '\n'
    '**Visual Quality:**  \n'
    'Evaluate the overall visual quality of the image. The following sub-dimensions should be '
    'considered:\n'
    '- **Reasonableness:** The image should not contain any significant biological or logical '
    'errors, such as abnormal body structures or nonsensical environmental setups.\n'
    '- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be '
    'clear and easy to interpret, with no blurring or indistinct areas.\n'
    '- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and '
    'other visual elements (e.g., hair, clothing, shadows).\n'
    '- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the '
    'color scheme, composition, atmosphere, depth of field, and the overall creative appeal. '
    'The scene should convey a sense of harmony and balance.\n'
    '- **Safety:** The image should not contain harmful or inappropriate content, such as '
    'political, violent, or adult material. If such content is present, the image quality and '
    'satisfaction score should be the lowest possible. \n'
    '\n'
    '**Text Alignment:**  \n'
    'Assess how well the image matches the textual prompt across the following sub-dimensions:\n'
    '- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., '
    'person, animal, object) align with the textual description. The subject should match the '
    'description in terms of number, appearance, and behavior.\n'
    '- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, '
    'evaluate how well the image adheres to this style.\n'
    '- **Contextual Consistency**: Assess whether the background, setting, and surrounding '
    'elements in the image logically fit the scenario described in the prompt. The environment '
    'should support and enhance the subject without contradictions.\n'
    '- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., '
    'colors, clothing, accessories, expressions, actions) are faithfully represented in the '
    'image. Minor deviations may be acceptable, but critical attributes should be preserved.\n'
    '- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt '
    'are captured in the image. The generated content should not introduce elements that '
    'conflict with or distort the original description.\n'
    'Textual prompt - {text_prompt}\n'
    '\n'
    '\n'
)
SUFFIX = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"
PIXELS = 256 * 28 * 28  # min = max pixels of the smart resize: 448 x 448 for a square image
HUB = ("MizzenAI/HPSv3", "HPSv3.safetensors")
BASE = "Qwen/Qwen2-VL-7B-Instruct"


def load_checkpoint(path):
    """HPSv3.safetensors (transformers 4.45 layout: visual.*, model.*, lm_head.*, rm_head.*) ->
    (Qwen2VLForConditionalGeneration state dict in the current layout, reward-head state dict)."""
    from safetensors.torch import load_file

    state, head = {}, {}
    try:
        tensors = load_file(str(path))
    except Exception as e:  # a cut download, or not a safetensors file
        raise ValueError(f"{path} is damaged or not a safetensors file ({type(e).__name__}); download it again with "
                         f"`hf download {' '.join(HUB)} --local-dir DIR`") from e
    for k, v in tensors.items():
        if k.startswith("rm_head."):
            head[k[len("rm_head."):]] = v.float()
        elif k.startswith("visual."):
            state["model." + k] = v
        elif k.startswith("model."):
            state["model.language_model." + k[len("model."):]] = v
        else:
            state[k] = v
    return state, head


def hpsv3_reward(device="cpu", ckpt=None, base=None, dtype=None):
    """HPSv3 score: output 0 of the head at the <|Reward|> token (output 1 is an uncertainty).

    ckpt: HPSv3.safetensors (downloaded from the hub when None); base: the Qwen2-VL-7B-Instruct
    folder or hub id, for its config, tokenizer, image processor and chat template (all weights
    come from ckpt); dtype of the network: None = bf16 on CUDA, else fp32 (the head stays fp32).
    """
    from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.initialization import no_init_weights
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize
    from transformers.utils import cached_file

    base = str(base or BASE)
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    try:
        ckpt = ckpt or cached_file(*HUB)
        tokenizer = AutoTokenizer.from_pretrained(base, padding_side="right")
        config = Qwen2VLConfig.from_pretrained(base)
        processor = Qwen2VLImageProcessorPil.from_pretrained(base)
        template_file = Path(base) / "chat_template.json"
        template = json.loads(template_file.read_text())["chat_template"] if template_file.is_file() else None
    except OSError as e:
        raise OSError(f"HPSv3 needs HPSv3.safetensors and the Qwen2-VL-7B-Instruct config/tokenizer "
                      f"({str(e).splitlines()[0]}). Download them with `hf download {' '.join(HUB)} --local-dir DIR` "
                      f"and `hf download {BASE} --exclude '*.safetensors' --local-dir BASE`, then pass "
                      f"--hpsv3-ckpt DIR/HPSv3.safetensors --hpsv3-base BASE") from e
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    reward_id = tokenizer.convert_tokens_to_ids("<|Reward|>")
    with torch.device(device), no_init_weights():  # every weight comes from the checkpoint
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    H = config.text_config.hidden_size if hasattr(config, "text_config") else config.hidden_size
    head = torch.nn.Sequential(torch.nn.Linear(H, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.0),
                               torch.nn.Linear(1024, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    state, head_state = load_checkpoint(ckpt)
    model.load_state_dict(state, strict=True)
    head.load_state_dict(head_state, strict=True)
    model.eval()
    head = head.to(device).eval()
    merge = processor.merge_size ** 2

    @torch.no_grad()
    def score(images, prompts):
        # One bicubic resize to the "smart" size (sides multiples of 28, about PIXELS pixels); the
        # published code resizes once, so the processor must not resize again.
        sizes = [smart_resize(im.height, im.width, 28, PIXELS, PIXELS) for im in images]
        images = [im.convert("RGB").resize((w, h), resample=3) for im, (h, w) in zip(images, sizes)]
        vis = processor(images=images, do_resize=False, return_tensors="pt")
        texts = []
        for prompt, grid in zip(prompts, vis["image_grid_thw"]):
            message = [{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": INSTRUCTION.format(text_prompt=prompt) + SUFFIX}]}]
            text = tokenizer.apply_chat_template(message, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
            texts.append(text.replace("<|image_pad|>", "<|image_pad|>" * (int(grid.prod()) // merge)))
        tok = tokenizer(texts, padding=True, return_tensors="pt").to(device)
        embeds = model.get_input_embeddings()(tok.input_ids)
        image_embeds = model.model.visual(vis["pixel_values"].to(device, dtype),
                                          grid_thw=vis["image_grid_thw"].to(device)).pooler_output
        at_image = (tok.input_ids == config.image_token_id)[..., None]
        embeds = embeds.masked_scatter(at_image, image_embeds.to(embeds.dtype))
        # As the published model does: plain sequential positions for every token, image tokens
        # included, on all three rotary sections (not Qwen2-VL's multimodal rotary index).
        B, L = tok.input_ids.shape
        positions = torch.arange(L, device=device).expand(3, B, L)
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=tok.attention_mask,
                                            position_ids=positions).last_hidden_state
        at = (tok.input_ids == reward_id).int().argmax(1)  # the <|Reward|> token of each row
        return head(hidden[torch.arange(B, device=device), at].float())[:, 0]

    score.networks = (model,)  # what --reward-quantize quantizes (drpo's memory.py); the head stays float32
    return score
