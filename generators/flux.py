"""FLUX.1-schnell as a DrPO generator: the stock diffusers FluxPipeline, sampled in its few steps.

A self-contained file: it needs torch and diffusers, never drpo.py, and gives drpo.py's training loop the
fields that drpo.unet_generator gives for SD and SDXL (see generators/sana.py for the list):

    gen = generator(pipe, steps)               # pipe: a FluxPipeline; steps: --inference-steps (None: stock)
    gen.net(x, timestep=t, **gen.conditioning(prompts, side)).sample   # x: (B, 16, h, w), like a UNet's

FLUX's transformer reads 2x2 patches of the 16-channel latent as 64-channel tokens with their (row, column) ids,
a timestep in [0, 1], T5 embeddings and a pooled CLIP embedding. `Unpacked` hides the packing, so the loop's
sampler, features and LoRA see a network of (B, C, h, w) latents as for the UNets; the flow-matching Euler
steps x <- x + (sigma_next - sigma) * v are elementwise, so they are the same on packed or unpacked latents.
Every setting is the stock pipeline's: its sigmas linspace(1, 1/N, N), the VAE's scaling and shift factors, the
T5 prompt length; schnell's model card settings (4 steps, 256-token prompts) come with its hub id (and with
tiny-flux, which drpo.py loads under that id's name: it stands in for schnell).
"""
import inspect
import types

import numpy as np
import torch

# What the model cards recommend where the stock __call__ defaults (28 steps, 512 tokens) are another model's.
MODEL_CARDS = {"black-forest-labs/FLUX.1-schnell": {"num_inference_steps": 4, "max_sequence_length": 256}}


def stock_defaults(pipe):
    """The stock __call__'s defaults (num_inference_steps, guidance_scale, max_sequence_length), then the model
    card's for a hub id it names."""
    d = {k: p.default for k, p in inspect.signature(type(pipe).__call__).parameters.items()}
    return {**d, **MODEL_CARDS.get(pipe.name_or_path, {})}


class Unpacked:
    """The FLUX transformer called as the loop calls a UNet, net(x, timestep=t, **cond).sample on (B, C, h, w)
    latents and t in [0, 1000]; every other attribute (LoRA, checkpointing, blocks, dtype) is the transformer's.
    config: the transformer's, but in_channels per latent pixel and the stock pipeline's default sample_size."""

    def __init__(self, transformer, sample_size):
        self.__dict__["transformer"] = transformer
        self.__dict__["config"] = types.SimpleNamespace(**{
            **transformer.config, "in_channels": transformer.config.in_channels // 4, "sample_size": sample_size})

    def __getattr__(self, name):
        return getattr(self.transformer, name)

    def __call__(self, x, timestep, encoder_hidden_states, **cond):
        B, C, h, w = x.shape
        tokens = x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w // 4, C * 4)
        ids = torch.zeros(h // 2, w // 2, 3)  # the stock pipeline's image ids: (0, row, column)
        ids[..., 1], ids[..., 2] = torch.arange(h // 2)[:, None], torch.arange(w // 2)[None, :]
        text_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=x.device, dtype=x.dtype)
        out = self.transformer(tokens, encoder_hidden_states=encoder_hidden_states, timestep=timestep / 1000,
                               img_ids=ids.reshape(-1, 3).to(x.device, x.dtype), txt_ids=text_ids, **cond).sample
        return types.SimpleNamespace(sample=out.view(B, h // 2, w // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5)
                                     .reshape(B, C, h, w))


def flow_recipe(scheduler, sigmas):
    """The Euler steps of a flow-matching scheduler set as the stock pipeline sets it, as drpo.step_recipe's rows
    (t, c_in, c_x, c_out, c_eps): the network sees x at t = 1000 sigma_i, and x <- x + (sigma_i+1 - sigma_i) v."""
    import copy
    s = copy.deepcopy(scheduler)
    s.set_timesteps(len(sigmas), sigmas=sigmas)
    return [(float(t), 1.0, 1.0, float(s.sigmas[i + 1] - s.sigmas[i]), 0.0) for i, t in enumerate(s.timesteps)]


@torch.no_grad()
def conditioning(pipe, prompts, d):
    """The transformer's keyword inputs as the stock pipeline computes them at its defaults d (stock_defaults): T5
    embeddings (max_sequence_length tokens), the pooled CLIP embedding, and the embedded guidance where the
    transformer has one (FLUX.1-dev; schnell is guidance-free)."""
    emb, pooled, _ = pipe.encode_prompt(list(prompts), prompt_2=None, device=pipe.text_encoder.device,
                                        max_sequence_length=d["max_sequence_length"])
    guidance = pipe.transformer.config.guidance_embeds and {"guidance": torch.full(
        (len(prompts),), d["guidance_scale"], device=emb.device, dtype=torch.float32)}
    return {"encoder_hidden_states": emb, "pooled_projections": pooled, **(guidance or {})}


def blocks(config):
    """The transformer's blocks in order: the double-stream ones, then the single-stream ones."""
    return [f"transformer_blocks.{i}" for i in range(config["num_layers"])] + \
        [f"single_transformer_blocks.{i}" for i in range(config["num_single_layers"])]


def generator(pipe, steps=None, timesteps=None):
    """The fields drpo.py's loop uses (see drpo.unet_generator). The teacher features run the frozen transformer
    at sigma = 1/11, where x_t = (1 - sigma) latent + sigma noise is 10/11 (latent + 0.1 noise): the UNets'
    latent + 0.1 * noise. A block's output is (text tokens, image tokens): the teacher reads the image's, item -1."""
    d = stock_defaults(pipe)
    check_steps(pipe.scheduler.config, timesteps)
    # cuDNN's attention failed in backward on FLUX's shapes (torch 2.11 + CUDA 13, H200, 2026-12-04: "mha_graph
    # .execute(...).is_good()"); the flash and memory-efficient kernels train it (docs/cost.md)
    torch.backends.cuda.enable_cudnn_sdp(False)
    n = steps or d["num_inference_steps"]
    every = blocks(pipe.transformer.config)
    call = dict(num_inference_steps=n, max_sequence_length=d["max_sequence_length"],
                **{"guidance_scale": d["guidance_scale"]} if pipe.transformer.config.guidance_embeds else {})
    return types.SimpleNamespace(
        pipe=pipe, net=Unpacked(pipe.transformer, pipe.default_sample_size), name="transformer",
        recipe=flow_recipe(pipe.scheduler, np.linspace(1.0, 1 / n, n)),  # the stock pipeline's sigmas
        conditioning=lambda prompts, side=None: conditioning(pipe, prompts, d),  # side: FLUX takes no size input
        teacher=(1000 / 11, 10 / 11, tuple(every[i] for i in sorted({len(every) * k // 4 for k in (1, 2, 3)})), -1),
        encode=lambda images: pipe.vae.encode(images).latent_dist.mean - pipe.vae.config.shift_factor,
        stock_call=call)


def check_steps(scheduler, timesteps):
    """The schedules ported here: the stock sigmas at a fixed shift (schnell's), N steps, no custom timesteps."""
    if timesteps:
        raise ValueError("--timesteps: FLUX's steps are the stock pipeline's sigmas linspace(1, 1/N, N); "
                         "set their number with --inference-steps N instead")
    if scheduler.get("use_dynamic_shifting") or scheduler.get("stochastic_sampling"):
        raise ValueError("this FLUX folder's scheduler shifts its steps with the image size (use_dynamic_shifting, "
                         "FLUX.1-dev's) or adds noise (stochastic_sampling): DrPO's FLUX file ports schnell's fixed "
                         "schedule; use FLUX.1-schnell or a folder whose scheduler has neither")


def check_model(path, resolution=None, steps=None, timesteps=None, features=None, layers=None, card=None):
    """The settings that depend on the architecture, on the folder's configs only (no weights). Returns the
    sampler's steps: --inference-steps, else the model card's (card: the hub id whose card applies, path's by
    default), else the stock __call__'s."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    try:
        net = FluxTransformer2DModel.load_config(path, subfolder="transformer")
        vae = AutoencoderKL.load_config(path, subfolder="vae")
        scheduler = FlowMatchEulerDiscreteScheduler.load_config(path, subfolder="scheduler")
    except (OSError, ValueError) as e:
        raise OSError(f"could not read the FLUX configs of {path}: {str(e).splitlines()[0]}") from e
    check_steps(scheduler, timesteps)
    if features == "mae":
        raise ValueError(f"--features mae: the latent-MAE reads 4-channel SD-VAE latents, and FLUX's latents have "
                         f"{vae['latent_channels']} channels; use --features teacher, latent or dinov2")
    factor = 2 ** len(vae["block_out_channels"])  # the VAE's downsampling, then 2x2 latent patches per token
    if resolution is not None and (resolution < factor or resolution % factor):
        raise ValueError(f"--resolution {resolution}: FLUX needs a multiple of {factor} (VAE downsampling and 2x2 "
                         f"packing), e.g. {max(factor, round(resolution / factor) * factor)}")
    every = blocks(net)
    for layer in layers.split(",") if features == "teacher" and layers else ():
        if layer not in every:
            raise ValueError(f"--teacher-layers: {layer!r} is not a block of this transformer; use "
                             f"transformer_blocks.I (I < {net['num_layers']}) or single_transformer_blocks.I "
                             f"(I < {net['num_single_layers']})")
    from diffusers import FluxPipeline
    stock = inspect.signature(FluxPipeline.__call__).parameters["num_inference_steps"].default
    return steps or MODEL_CARDS.get(card or path, {}).get("num_inference_steps", stock)
