"""Memory levers of drpo.py beyond the method (docs/cost.md, "One 24 GB card"). Not needed to learn DrPO.

Exact (the same update, bit for bit):
    --cache-conditioning     each training and held-out prompt's conditioning computed once, kept in host memory;
                             the text encoders then leave the GPU (cache_conditioning)
    --offload                the reward model's weights wait in pinned host memory except while it scores (offload);
                             the reward's weights and the regression's activations then never share the GPU
    --grad-chunk, --gradient-checkpointing, --reward-device   (drpo.py)
Approximate (QLoRA's convention: a full-precision LoRA trains on quantized frozen weights):
    --quantize int8|float8|nf4          the generator's network (the UNet or the transformer)
    --reward-quantize int8|float8       the ported reward models' networks (HPSv3, ImageReward, CLIP rewards); not
                                        nf4: bitsandbytes quantizes while loading, and the ports build their own

int8 and float8 are torchao's weight-only configurations (requirements-quant.txt); they run on a CPU too. nf4 is
bitsandbytes' 4-bit NormalFloat and needs a CUDA GPU (pip install bitsandbytes). G_0, the base that the reference
drift pulls toward and the teacher features read, is then the quantized base with the LoRA off; the saved LoRA is
applied to the full-precision base, as QLoRA users do (docs/cost.md and docs/running.md measure what that changes).
"""
import contextlib
import functools
import importlib.util

import torch

import drpo

PACKAGE = {"int8": ("torchao", "pip install -r requirements-quant.txt"),
           "float8": ("torchao", "pip install -r requirements-quant.txt"),
           "nf4": ("bitsandbytes", "pip install bitsandbytes (a CUDA GPU only)")}


NETWORK_REWARDS = ("hpsv3", "imagereward", "pickscore", "clip", "aesthetic")  # their score functions' .networks


def check(args, device):
    """--quantize, --reward-quantize and --offload against the device, the installed packages and the reward, before
    anything loads: a choice that cannot work here is refused with the reason."""
    for flag, value in (("--quantize", args.quantize), ("--reward-quantize", args.reward_quantize)):
        if value is None:
            continue
        package, install = PACKAGE[value]
        if value == "nf4" and device.type != "cuda":
            raise ValueError(f"{flag} nf4 goes through bitsandbytes, which needs a CUDA GPU (this run's device is "
                             f"{device}); on a CPU use {flag} int8")
        if importlib.util.find_spec(package) is None:
            raise ImportError(f"{flag} {value} needs the {package} package: {install}")
    if args.offload and args.reward_quantize:
        raise ValueError("--offload moves plain weights, not --reward-quantize's quantized ones: choose one "
                         "(--offload keeps the update exact; --reward-quantize halves the reward's weights)")
    if args.offload or args.reward_quantize:
        flag, verb = ("--offload", "offload") if args.offload else ("--reward-quantize", "quantize")
        names = [name for name, _, _ in drpo.parse_reward_spec(args.reward)] if args.reward else []
        served = [n for n in names if n.startswith(("http://", "https://")) or n.startswith("vlm")]
        if served:
            raise ValueError(f"{flag}: {served[0]} is served by another process, which holds its own model; "
                             f"{verb} it there, or drop {flag}")
        if not any(n in NETWORK_REWARDS or ":" in n for n in names):  # your own: its function's .networks
            raise ValueError(f"{flag}: {args.reward or '--pairs'} has no reward network to {verb} (these have: "
                             f"{', '.join(NETWORK_REWARDS)}, or your own function with a .networks tuple of "
                             f"modules); drop {flag}")
    if args.offload and drpo.reward_device_of(args.reward_device, device, 0).type == "cpu":
        raise ValueError("--offload: nothing to offload, the reward runs on the CPU, where its weights stay anyway; "
                         "it is for a GPU run")


def pipeline_config(value, component, dtype):
    """diffusers' from_pretrained keywords that load the pipeline's `component` (unet or transformer) quantized."""
    from diffusers import PipelineQuantizationConfig
    if value == "nf4":
        from diffusers import BitsAndBytesConfig
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    else:
        from diffusers import TorchAoConfig
        config = TorchAoConfig(torchao_config(value))
    return {"quantization_config": PipelineQuantizationConfig(quant_mapping={component: config})}


def torchao_config(value):
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig
    return {"int8": Int8WeightOnlyConfig, "float8": Float8WeightOnlyConfig}[value]()


def reward_levers(fn, name, quantize=None, offload_to=None):
    """A ported reward's networks (fn.networks: its big modules; small heads stay as they are) quantized in place by
    torchao's quantize_ (--reward-quantize), or kept off the device between calls (--offload, offload)."""
    networks = getattr(fn.args[0] if isinstance(fn, functools.partial) else fn, "networks", None)  # yours: wrapped
    flag = "--reward-quantize" if quantize else "--offload"
    if not networks:
        raise ValueError(f"{flag}: the {name} reward has no network (your own reward: give its function a .networks "
                         f"tuple of its modules); drop it from the spec or drop {flag}")
    if quantize:
        from torchao.quantization import quantize_
        for network in networks:
            quantize_(network, torchao_config(quantize))
    return offload(fn, networks, offload_to) if offload_to else fn


def offload(fn, networks, device):
    """fn with its networks' weights on device only while it runs, in (pinned) host memory otherwise; run.on_device()
    keeps them there across several calls (load_reward's batches of one reward call). Exact: the same weights, moved.
    They are frozen, so the host copy stays valid: leaving the device costs nothing, coming back one copy of them."""
    slots = [(table, name) for net in networks for m in net.modules() for table in (m._parameters, m._buffers)
             for name, t in table.items() if t is not None]
    host = [table[name] for table, name in slots]  # the networks' own tensors, moved to the host once
    pin = torch.device(device).type == "cuda"  # pinned: the copies to the GPU run at full speed
    for t in {id(t): t for t in host}.values():
        t.data = t.data.cpu().pin_memory() if pin else t.data.cpu()
    held = []

    def place(tensors):
        for (table, name), t in zip(slots, tensors):
            table[name] = t

    def to_device(t):
        moved = t.to(device, non_blocking=True)
        return torch.nn.Parameter(moved, t.requires_grad) if isinstance(t, torch.nn.Parameter) else moved

    @contextlib.contextmanager
    def on_device():
        if not held:
            moved = {id(t): to_device(t) for t in host}  # a tensor shared by two modules: one copy
            place([moved[id(t)] for t in host])
        held.append(True)
        try:
            yield
        finally:
            held.pop()
            if not held:
                place(host)  # the device's copies are freed for the next phase

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with on_device():
            return fn(*args, **kwargs)
    run.on_device = on_device
    return run


@torch.no_grad()
def cache_conditioning(model, prompts, side):
    """--cache-conditioning: each prompt's conditioning computed once, where the text encoders are, and kept in host
    memory (model.conditioning.cache, read by drpo.by_prompt, which encodes prompt by prompt as every run does, so
    the rows are the same bits); then the text encoders move to the host, off the GPU, for the rest of the run.
    Host memory per prompt: SD-Turbo 77 x 1024 numbers, SDXL 77 x 2048, FLUX.1-schnell 256 x 4096."""
    cache = model.conditioning.cache
    for p in dict.fromkeys(prompts):
        cache[p, side] = drpo.rows(model.conditioning([p], side), lambda v: v.cpu())
    for name, module in model.pipe.components.items():
        if name.startswith("text_encoder") and isinstance(module, torch.nn.Module):
            module.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def explain_out_of_memory(lap, device, out):
    """An out-of-GPU-memory error in the block: a message naming its phase and the levers that fit it."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        phase = {None: "sample", "sample": "sample", "reference": "reward", "decode": "reward", "reward": "features",
                 "features": "features", "field": "regression", "backward": "sample"}[lap.last]
        used = f"{torch.cuda.memory_allocated(device) / 2 ** 30:.1f} GiB" if device.type == "cuda" else "unknown"
        raise MemoryError(f"out of GPU memory in the {phase} phase ({used} in use on {device}). The last checkpoint "
                          f"in {out} is intact. These leave the update unchanged: --grad-chunk 8 (regress 8 "
                          f"candidates at a time), --gradient-checkpointing, --cache-conditioning (text encoders off "
                          f"the GPU), --offload (the reward's weights on the GPU only while it scores), "
                          f"--reward-device cuda:+1 (the reward on its own GPU), a smaller --reward-batch; "
                          f"these change it a little: --quantize int8, --reward-quantize int8 (docs/cost.md). Then "
                          f"continue with --resume") from e
