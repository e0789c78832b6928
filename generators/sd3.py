"""SD3.5-Large-Turbo as a DrPO generator: the stock diffusers StableDiffusion3Pipeline, sampled in its few steps.

A self-contained file: it needs torch and diffusers, never drpo.py, and gives drpo.py's training loop the
fields that drpo.unet_generator gives for SD and SDXL (see generators/sana.py for the list):

    gen = generator(pipe, steps)               # pipe: a StableDiffusion3Pipeline; steps: --inference-steps
    gen.net(x, timestep=t, **gen.conditioning(prompts, side)).sample   # the MMDiT, called as the stock pipeline does

The SD3 transformer takes the 16-channel latent (B, C, h, w) and a timestep in [0, 1000] as a UNet does, with the
three text encoders' embeddings (two CLIPs and T5, concatenated) and the two CLIPs' pooled embeddings. The steps
are the stock pipeline's: its flow-matching Euler scheduler set for N steps, x <- x + (sigma_next - sigma) v.
DrPO samples without classifier-free guidance (guidance_scale 0, as SD3.5-Large-Turbo's model card samples): the
stock __call__'s default 7.0 is the 28-step base model's. Turbo's card settings (4 steps) come with its hub id.
"""
import copy
import inspect
import types

import torch

# What the model cards recommend where the stock __call__ defaults (28 steps) are the base model's.
MODEL_CARDS = {"stabilityai/stable-diffusion-3.5-large-turbo": {"num_inference_steps": 4}}


def stock_defaults(pipe):
    """The stock __call__'s defaults (num_inference_steps, max_sequence_length), then the model card's."""
    d = {k: p.default for k, p in inspect.signature(type(pipe).__call__).parameters.items()}
    return {**d, **MODEL_CARDS.get(pipe.name_or_path, {})}


def flow_recipe(scheduler, steps):
    """The stock steps as drpo.step_recipe's rows (t, c_in, c_x, c_out, c_eps): the transformer sees x at the
    scheduler's timestep t = 1000 sigma_i, and the Euler step gives x + (sigma_i+1 - sigma_i) v."""
    s = copy.deepcopy(scheduler)
    s.set_timesteps(steps)
    return [(float(t), 1.0, 1.0, float(s.sigmas[i + 1] - s.sigmas[i]), 0.0) for i, t in enumerate(s.timesteps)]


@torch.no_grad()
def conditioning(pipe, prompts, d):
    """The transformer's keyword inputs as the stock pipeline computes them without guidance: the joint CLIP + T5
    prompt embeddings (T5: max_sequence_length tokens) and the pooled CLIP embeddings."""
    emb, _, pooled, _ = pipe.encode_prompt(list(prompts), prompt_2=None, prompt_3=None,
                                           device=pipe.text_encoder.device,
                                           do_classifier_free_guidance=False,
                                           max_sequence_length=d["max_sequence_length"])
    return {"encoder_hidden_states": emb, "pooled_projections": pooled}


def generator(pipe, steps=None, timesteps=None):
    """The fields drpo.py's loop uses (see drpo.unet_generator). The teacher features run the frozen transformer
    at sigma = 1/11, where x_t = (1 - sigma) latent + sigma noise is 10/11 (latent + 0.1 noise): the UNets'
    latent + 0.1 * noise. A block's output is (text tokens, image tokens): the teacher reads the image's, item -1."""
    d = stock_defaults(pipe)
    check_steps(pipe.scheduler.config, timesteps)
    n, layers = steps or d["num_inference_steps"], pipe.transformer.config.num_layers
    blocks = tuple(f"transformer_blocks.{i}" for i in sorted({layers * k // 4 for k in (1, 2, 3)}))  # 1/4, 1/2, 3/4
    return types.SimpleNamespace(
        pipe=pipe, net=pipe.transformer, name="transformer", recipe=flow_recipe(pipe.scheduler, n),
        conditioning=lambda prompts, side=None: conditioning(pipe, prompts, d),  # side: SD3 takes no size input
        teacher=(1000 / 11, 10 / 11, blocks, -1),
        encode=lambda images: pipe.vae.encode(images).latent_dist.mean - pipe.vae.config.shift_factor,
        stock_call=dict(num_inference_steps=n, guidance_scale=0.0, max_sequence_length=d["max_sequence_length"]))


def check_steps(scheduler, timesteps):
    """The schedules ported here: the stock scheduler's N steps at its fixed shift."""
    if timesteps:
        raise ValueError("--timesteps: SD3's steps are the stock scheduler's for N steps; set their number with "
                         "--inference-steps N instead")
    if scheduler.get("use_dynamic_shifting") or scheduler.get("stochastic_sampling"):
        raise ValueError("this SD3 folder's scheduler shifts its steps with the image size (use_dynamic_shifting) "
                         "or adds noise (stochastic_sampling): DrPO's SD3 file ports the fixed shift of SD3.5's "
                         "schedulers; use a folder whose scheduler has neither")


def check_model(path, resolution=None, steps=None, timesteps=None, features=None, layers=None, card=None):
    """The settings that depend on the architecture, on the folder's configs only (no weights). Returns the
    sampler's steps: --inference-steps, else the model card's (card: the hub id whose card applies, path's by
    default), else the stock __call__'s."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    try:
        net = SD3Transformer2DModel.load_config(path, subfolder="transformer")
        vae = AutoencoderKL.load_config(path, subfolder="vae")
        scheduler = FlowMatchEulerDiscreteScheduler.load_config(path, subfolder="scheduler")
    except (OSError, ValueError) as e:
        raise OSError(f"could not read the SD3 configs of {path}: {str(e).splitlines()[0]}") from e
    check_steps(scheduler, timesteps)
    if features == "mae":
        raise ValueError(f"--features mae: the latent-MAE reads 4-channel SD-VAE latents, and SD3's latents have "
                         f"{vae['latent_channels']} channels; use --features teacher, latent or dinov2")
    factor = 2 ** (len(vae["block_out_channels"]) - 1) * net["patch_size"]
    if resolution is not None and (resolution < factor or resolution % factor):
        raise ValueError(f"--resolution {resolution}: SD3 needs a multiple of {factor} (VAE downsampling and patch "
                         f"size), e.g. {max(factor, round(resolution / factor) * factor)}")
    n = net["num_layers"]
    for layer in layers.split(",") if features == "teacher" and layers else ():
        top, _, index = layer.partition(".")
        if not (top == "transformer_blocks" and index.isdigit() and int(index) < n):
            raise ValueError(f"--teacher-layers: {layer!r} is not a block of this transformer; use "
                             f"transformer_blocks.I with I in 0..{n - 1}")
    from diffusers import StableDiffusion3Pipeline
    stock = inspect.signature(StableDiffusion3Pipeline.__call__).parameters["num_inference_steps"].default
    return steps or MODEL_CARDS.get(card or path, {}).get("num_inference_steps", stock)
