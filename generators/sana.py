"""SANA-Sprint (arXiv 2503.09641) as a DrPO generator: the stock diffusers SanaSprintPipeline sampled in one step.

A self-contained file: it needs torch and diffusers, never drpo.py, and gives drpo.py's training loop the
fields that drpo.unet_generator gives for SD and SDXL:

    gen = generator(pipe)                      # pipe: a SanaSprintPipeline
    cond = gen.conditioning(prompts, side)     # the transformer's keyword inputs, a row per prompt
    [(t, c_in, c_z, c_out, 0.0)] = gen.recipe  # x0 = c_z * z + c_out * transformer(c_in * z, timestep=t, **cond)

The one step is the stock pipeline's `num_inference_steps=1` (TrigFlow from max_timesteps = 1.5708, the
pure-noise end, with the pipeline's SCM input scaling and output conversion), at the stock pipeline's
defaults: embedded guidance 4.5, the Gemma prompt with its complex-human instruction. Every stock step is
affine in the noise and the transformer's output, so it folds into four numbers, as for the UNets.
"""
import inspect
import math
import types

import torch


def stock_defaults(pipe):
    """The stock __call__'s defaults: guidance_scale, max_timesteps, max_sequence_length, the instruction."""
    return {k: p.default for k, p in inspect.signature(type(pipe).__call__).parameters.items()}


def scm_scaling(t):
    """TrigFlow time t -> (s, k): the transformer's timestep s = sin t / (sin t + cos t) and the input scale
    k = sqrt(s^2 + (1 - s)^2) that the stock pipeline applies to x_t / sigma_data."""
    s = float(torch.sin(torch.tensor(t)) / (torch.cos(torch.tensor(t)) + torch.sin(torch.tensor(t))))  # as stock: fp32
    return s, math.sqrt(s * s + (1 - s) ** 2)


def one_step_recipe(max_timesteps):
    """(s, c_in, c_z, c_out) of the stock one step from unit noise z (x_T = sigma_data * z): the transformer sees
    k * z at timestep s; its output F becomes the TrigFlow velocity v = ((1 - 2s) k z + (1 - 2s + 2s^2) F) / k
    (in sigma_data units), and x0 = cos T * z - sin T * v; sigma_data cancels."""
    T = float(torch.tensor(max_timesteps))  # the pipeline's float32 timestep
    s, k = scm_scaling(T)
    return s, k, math.cos(T) - math.sin(T) * (1 - 2 * s), -math.sin(T) * (1 - 2 * s + 2 * s * s) / k


@torch.no_grad()
def conditioning(pipe, prompts, d):
    """The transformer's keyword inputs as the stock pipeline computes them at its defaults d (stock_defaults):
    Gemma embeddings of the instruction + prompt (the last max_sequence_length tokens, and the first), their
    mask, and the embedded guidance (guidance_scale x the transformer's guidance_embeds_scale)."""
    emb, mask = pipe.encode_prompt(list(prompts), device=pipe.text_encoder.device,
                                   max_sequence_length=d["max_sequence_length"],
                                   complex_human_instruction=d["complex_human_instruction"])
    guidance = torch.full((len(prompts),), d["guidance_scale"], device=emb.device).to(emb.dtype)
    return {"encoder_hidden_states": emb, "encoder_attention_mask": mask,
            "guidance": guidance * pipe.transformer.config.guidance_embeds_scale}


def default_blocks(n):
    """Teacher blocks of an n-block transformer: depth n/4, n/2 and 3n/4 (docs/features.md)."""
    return tuple(f"transformer_blocks.{i}" for i in sorted({n // 4, n // 2, 3 * n // 4}))


def generator(pipe, steps=None, timesteps=None):
    """The fields drpo.py's loop uses (see drpo.unet_generator). The teacher features run the frozen transformer
    at TrigFlow time atan(0.1), where latent + 0.1 * noise is x_t / cos t: the UNets' latent + 0.1 * noise."""
    check_steps(steps, timesteps)
    t, d = math.atan(0.1), stock_defaults(pipe)
    s, k = scm_scaling(t)
    return types.SimpleNamespace(
        pipe=pipe, net=pipe.transformer, name="transformer", recipe=[(*one_step_recipe(d["max_timesteps"]), 0.0)],
        conditioning=lambda prompts, side=None: conditioning(pipe, prompts, d),  # side: SANA takes no size input
        teacher=(s, math.cos(t) * k, default_blocks(pipe.transformer.config.num_layers), 0),
        encode=lambda images: pipe.vae.encode(images).latent,
        stock_call=dict(num_inference_steps=1, intermediate_timesteps=None, use_resolution_binning=False))


def check_steps(steps, timesteps):
    """SANA-Sprint trains at its one step here: its 2-4 step sampling (intermediate_timesteps) is not ported."""
    if timesteps:
        raise ValueError("--timesteps: SANA-Sprint's one step starts at the pure-noise end of TrigFlow (max_timesteps "
                         "= 1.5708, the stock pipeline's); --timesteps picks a UNet scheduler's steps, drop it")
    if (steps or 1) > 1:
        raise ValueError(f"--inference-steps {steps}: SANA-Sprint trains at its one step here (its several-step "
                         f"sampling through intermediate_timesteps is not ported); drop --inference-steps")


def check_model(path, resolution=None, steps=None, timesteps=None, features=None, layers=None, card=None):
    """The settings that depend on the architecture, on the folder's configs only (no weights). Returns the
    sampler's steps: one (card, the hub id whose model card applies, changes nothing here)."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    try:
        net = SanaTransformer2DModel.load_config(path, subfolder="transformer")
        vae = AutoencoderDC.load_config(path, subfolder="vae")
    except (OSError, ValueError) as e:
        raise OSError(f"could not read the SANA-Sprint configs of {path}: {str(e).splitlines()[0]}") from e
    check_steps(steps, timesteps)
    if features == "mae":
        raise ValueError(f"--features mae: the latent-MAE reads 4-channel SD-VAE latents, and SANA-Sprint's DC-AE "
                         f"latents have {vae['latent_channels']} channels; use --features teacher, latent or dinov2")
    factor = 2 ** (len(vae["encoder_block_out_channels"]) - 1) * net["patch_size"]
    if resolution is not None and (resolution < factor or resolution % factor):
        raise ValueError(f"--resolution {resolution}: this model needs a multiple of {factor} (DC-AE downsampling "
                         f"and patch size), e.g. {max(factor, round(resolution / factor) * factor)}")
    n = net["num_layers"]
    for layer in layers.split(",") if features == "teacher" and layers else ():
        top, _, index = layer.partition(".")
        if not (top == "transformer_blocks" and index.lstrip("-").isdigit() and -n <= int(index) < n):
            raise ValueError(f"--teacher-layers: {layer!r} is not a block of this transformer; use "
                             f"transformer_blocks.I with I in {-n}..{n - 1}")
    return 1
