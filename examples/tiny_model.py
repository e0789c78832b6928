"""Tiny SD-, SDXL-, SANA-Sprint-, FLUX- and SD3-architecture pipelines with random weights, for offline demos and tests.

    python examples/tiny_model.py DIR [--arch sdxl|sana-sprint|flux|sd3]   # write one to DIR
    python drpo.py --model tiny ...     # or let drpo.py build it once in the cache (tiny-sdxl, tiny-sana, tiny-flux, ...)
    python examples/tiny_model.py DIR --arch judge      # a tiny random Qwen3-VL judge for eval.py --judge DIR

Each is saved with `save_pretrained` and loaded back by drpo.py through the same code as SD-Turbo,
SDXL-Turbo, SANA-Sprint, FLUX.1-schnell and SD3.5-Large-Turbo; on 2 CPU cores it trains a DrPO step in about a
second (the tiny FLUX at --resolution 128: its stock default is 1024 px). Not part of the
method: nothing here is needed to train a real model.
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch


def cached(arch="sd"):
    """The tiny model in the user's cache (`$XDG_CACHE_HOME/drpo`), built there on first use: aside,
    then renamed, so a folder that exists is always whole."""
    import shutil

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = cache / "drpo" / f"tiny-{arch}-v2"  # bump the version when make_tiny changes
    if not (path / "model_index.json").is_file():
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        print(f"building the tiny demo model in {path} (once)", file=sys.stderr)
        make_tiny(tmp, arch=arch)
        try:
            os.replace(tmp, path)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def mark_random(out_dir):
    """A note in the folder that its weights are random: grids of its images (drpo.py, eval.py) say so."""
    (Path(out_dir) / "RANDOM_WEIGHTS.txt").write_text("Random weights, built by examples/tiny_model.py for offline demos "
                                                      "and tests: its images are coloured noise, not pictures.\n")
    return out_dir


def brightest_spread(vaes, latents, max_clipped=0.05):
    """Of several random decoders, the one whose images vary most in brightness over the latents. A random
    decoder's brightness hardly depends on its latent, so toy rewards would have almost nothing to rank (a
    trained VAE's images differ a lot across seeds). Only decoders that clip at most max_clipped of the pixels
    to black or white count: past the clip, mean brightness rises with any spread of the images, learned or not,
    and a random-reward control would seem to learn."""
    with torch.no_grad():
        images = [v.decode(latents / v.config.scaling_factor + (getattr(v.config, "shift_factor", None) or 0)).sample
                  / 2 + 0.5 for v in vaes]  # as drpo.decode
    spread = [im.clamp(0, 1).mean((1, 2, 3)).std().item() for im in images]
    ok = [i for i, im in enumerate(images) if ((im < 0) | (im > 1)).float().mean() <= max_clipped] or range(len(vaes))
    return vaes[max(ok, key=lambda i: spread[i])]


def byte_clip(seed=0):
    """A CLIP tokenizer over a byte-level vocabulary and a toy CLIP text config for it (torch seeded with seed)."""
    from transformers import CLIPTextConfig, CLIPTokenizer

    # A byte-level CLIP vocabulary: every byte, with and without the end-of-word mark, no merges.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)
    torch.manual_seed(seed)
    eos = vocab["<|endoftext|>"]
    text_config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos,
        projection_dim=32)
    return tokenizer, text_config


def make_tiny(out_dir, seed=0, arch="sd"):
    """A small SD- or SDXL-architecture pipeline with random weights, saved with save_pretrained so
    that drpo.py loads it through the same code as SD-Turbo / SDXL-Turbo."""
    if arch == "sana-sprint":
        return make_tiny_sana(out_dir, seed)
    if arch in ("flux", "sd3"):
        return make_tiny_flow(out_dir, seed, arch)
    from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                           StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, text_config = byte_clip(seed)
    text_encoder = CLIPTextModel(text_config)
    if arch == "sdxl":  # a second text encoder with a projection; the UNet also takes pooled text + time ids
        text_encoder_2 = CLIPTextModelWithProjection(text_config)
        unet = UNet2DConditionModel(
            sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64, attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32)
    elif arch == "sd":
        unet = UNet2DConditionModel(
            sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=(2, 4),
            use_linear_projection=True)
    else:
        raise ValueError(f"--arch {arch}: choose sd, sdxl or sana-sprint")
    # Of 8 random decoders, the one that varies most over noises of the one-step sampler's scale.
    z = torch.randn(16, 4, unet.config.sample_size, unet.config.sample_size)
    vae = brightest_spread([AutoencoderKL(  # four levels, so latents are 1/8 of the image side as in SD
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=128)
        for _ in range(8)], 15 * z)
    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing",
                 steps_offset=1)  # as sd-turbo's and sdxl-turbo's, whose folders name these two schedulers
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                         scheduler=EulerAncestralDiscreteScheduler(**betas))
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=EulerDiscreteScheduler(**betas), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    return mark_random(out_dir)


def make_tiny_sana(out_dir, seed=0):
    """A small SanaSprintPipeline with random weights: SANA-Sprint's layout (Gemma-2 text encoder, a DC-AE with
    32 latent channels and 32x downsampling, a guidance-embedding SANA transformer with patch size 1, the SCM
    scheduler) at toy width, 128 px images. Its tokenizer is byte-level: every byte a token, no merges."""
    from diffusers import AutoencoderDC, SanaSprintPipeline, SanaTransformer2DModel, SCMScheduler
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, **{f"<0x{b:02X}>": 5 + b for b in range(256)}}
    torch.manual_seed(seed)
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=2048, pad_token_id=0, eos_token_id=1,
        bos_token_id=2))
    transformer = SanaTransformer2DModel(
        in_channels=32, out_channels=32, num_attention_heads=2, attention_head_dim=16, num_layers=4,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32,
        sample_size=4, patch_size=1, guidance_embeds=True, guidance_embeds_scale=0.1, qk_norm="rms_norm_across_heads")
    levels = 6  # 2^5 = 32x downsampling, as DC-AE f32c32
    dc = dict(block_out_channels=(8, 8, 16, 16, 32, 32), layers_per_block=(1,) * levels,
              qkv_multiscales=((),) * 3 + ((5,),) * 3, block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3)
    z = torch.randn(16, 32, 4, 4)
    vae = brightest_spread([AutoencoderDC(
        latent_channels=32, attention_head_dim=4, upsample_block_type="interpolate", downsample_block_type="conv",
        scaling_factor=0.41407, **{f"{side}_{k}": v for side in ("encoder", "decoder") for k, v in dc.items()})
        for _ in range(8)], z)
    pipe = SanaSprintPipeline(tokenizer=GemmaTokenizer(vocab=vocab, merges=[]), text_encoder=text_encoder, vae=vae,
                              transformer=transformer, scheduler=SCMScheduler(prediction_type="trigflow", sigma_data=0.5))
    pipe.save_pretrained(out_dir)
    return mark_random(out_dir)


def make_tiny_flow(out_dir, seed=0, arch="flux"):
    """A small FluxPipeline (FLUX.1-schnell's layout) or StableDiffusion3Pipeline (SD3.5's) with random weights, 128 px
    images: a 16-channel VAE with a scaling and a shift factor (below), a flow-matching Euler scheduler at the
    model's fixed shift (schnell 1, SD3.5-Large-Turbo 3), CLIP + T5 text encoders (SD3: two CLIPs), all at toy width;
    both tokenizers are the byte-level CLIP one. FLUX's stock pipeline samples 1024 px by default (its
    default_sample_size): pass --resolution 128 to train or evaluate the tiny one at its own size."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer, text_config = byte_clip(seed)
    t5 = T5EncoderModel(T5Config(vocab_size=text_config.vocab_size, d_model=32 if arch == "flux" else 64, d_kv=8,
                                 d_ff=64, num_layers=2, num_heads=4, pad_token_id=text_config.pad_token_id))
    # FLUX.1's VAE factors; SD3.5's shift but a smaller scale than its 1.5305: the random decoder then sees larger
    # inputs and its brightness follows the latent (40 reward-gradient steps of a LoRA raised it by 0.058 at 0.25,
    # by 0.0067 at 1.5305)
    factors = dict(scaling_factor=0.3611, shift_factor=0.1159) if arch == "flux" else \
        dict(scaling_factor=0.25, shift_factor=0.0609)
    vae = brightest_spread([AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=128,
        use_quant_conv=False, use_post_quant_conv=False, **factors) for _ in range(8)], torch.randn(16, 16, 16, 16))
    if arch == "flux":
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
            axes_dims_rope=(4, 6, 6))
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae,
                            text_encoder=CLIPTextModel(text_config), tokenizer=tokenizer, text_encoder_2=t5,
                            tokenizer_2=tokenizer, transformer=transformer)
    else:
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
            pos_embed_max_size=16)
        pipe = StableDiffusion3Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, transformer=transformer,
            text_encoder=CLIPTextModelWithProjection(text_config), tokenizer=tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(text_config), tokenizer_2=tokenizer,
            text_encoder_3=t5, tokenizer_3=tokenizer)
    pipe.save_pretrained(out_dir)
    return mark_random(out_dir)


def make_tiny_judge(out_dir, seed=0):
    """A tiny random Qwen3-VL folder (model, tokenizer, image processor, chat template) that
    rewards/judge.py loads as it loads Qwen3-VL-8B-Instruct. Its vocabulary and chat template are the
    tiny Qwen2 tokenizer of fixtures/hpsv3_tiny (the same special tokens as Qwen3-VL's). Its answers
    are random tokens: invalid verdicts, which is what an offline demo of the plumbing needs."""
    import shutil

    from transformers import AutoTokenizer, Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    base = Path(__file__).resolve().parents[1] / "fixtures" / "hpsv3_tiny" / "base"
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = {t: tokenizer.convert_tokens_to_ids(f"<|{t}|>") for t in ("image_pad", "video_pad", "vision_start",
                                                                    "vision_end", "im_end", "endoftext")}
    config = Qwen3VLConfig(  # Qwen3-VL-8B's layout at toy width: 16-pixel patches, 2 x 2 merge, deepstack
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, eos_token_id=ids["im_end"],
                         pad_token_id=ids["endoftext"], rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                        "mrope_section": [2, 1, 1],
                                                                        "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32, num_position_embeddings=64,
                           deepstack_visual_indexes=[0]),
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"], tie_word_embeddings=True)
    torch.manual_seed(seed)
    Qwen3VLForConditionalGeneration(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                             image_std=[0.5] * 3, size={"shortest_edge": 32 * 32, "longest_edge": 256 * 32 * 32}
                             ).save_pretrained(out_dir)
    shutil.copy(base / "chat_template.json", Path(out_dir) / "chat_template.json")
    return out_dir


def make_tiny_llava(out_dir, seed=0):
    """A tiny random LLaVA-architecture VLM folder that `transformers serve DIR` serves over the OpenAI protocol
    (Qwen3-VL's processor needs torchvision, which these CPU machines lack): a toy CLIP vision tower, a toy Qwen2
    text model, the Qwen2 tokenizer of fixtures/hpsv3_tiny with an <image> token, and a chat template that puts
    one <image> per image item. For tests and demos of --reward vlm: its answers are random tokens."""
    from transformers import (AutoTokenizer, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor, Qwen2Config)
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    base = Path(__file__).resolve().parents[1] / "fixtures" / "hpsv3_tiny" / "base"
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id, eos = tokenizer.convert_tokens_to_ids("<image>"), tokenizer.convert_tokens_to_ids("<|im_end|>")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=16, projection_dim=32)
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, eos_token_id=eos, pad_token_id=eos)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                         vision_feature_select_strategy="default", vision_feature_layer=-1, image_seq_length=4)
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(out_dir)
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
                "{% else %}{% for c in m['content'] %}{% if c['type'] in ('image', 'image_url') %}<image>{% else %}"
                "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    processor = LlavaProcessor(LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                               tokenizer, patch_size=16, vision_feature_select_strategy="default",
                               chat_template=template, image_token="<image>", num_additional_image_tokens=1)
    processor.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Write a tiny random SD, SDXL, SANA-Sprint, FLUX or SD3 pipeline "
                                 "(diffusers folder), or a tiny random Qwen3-VL judge, to DIR.")
    ap.add_argument("dir", help="output folder")
    ap.add_argument("--arch", choices=("sd", "sdxl", "sana-sprint", "flux", "sd3", "judge"), default="sd",
                    help="architecture")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    a = ap.parse_args()
    if a.arch == "judge":
        make_tiny_judge(a.dir, a.seed)
        print(f"wrote a tiny random Qwen3-VL judge to {a.dir}; use it with python eval.py --judge {a.dir}")
    else:
        make_tiny(a.dir, a.seed, a.arch)
        print(f"wrote a tiny {a.arch.upper()} pipeline to {a.dir}; train on it with python drpo.py --model {a.dir}")
