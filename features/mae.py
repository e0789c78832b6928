"""The latent-MAE encoder: the ResNet encoder of a masked autoencoder trained on SD-VAE latents, the
feature space the DrPO paper (arXiv 2606.02521) reports best for SD-Turbo.

A self-contained file: it needs only torch, and can be copied into any project.

    encode = mae_encoder("mae_latent_256_torch.pth", "cuda")
    fmap = encode(latents)   # (B, 4, h, w) SD-VAE latents -> (B, C, h/8, w/8)

drpo.py turns that map into the published feature keys layer4_{mean,std}{,_2,_4} (its map_stats).

The checkpoint is read directly: a dict with `state_dict` (or `model_state_dict`, or bare tensors) and
`metadata.model_config.layers`; convolutions are JAX-layout `.kernel` (H, W, in, out) or torch
`.weight`, GroupNorms `.scale` or `.weight`, keys may carry a `module.` or `_orig_mod.` prefix.
"""
from pathlib import Path

import torch
import torch.nn.functional as F

DOWNLOAD = ("`pip install modelscope` then `modelscope download --model jiangzhou130v1/drpo-mae-latent-256 "
            "mae_latent_256_torch.pth --local_dir DIR`")


def check_ckpt(ckpt_path):
    if not ckpt_path or not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"latent-MAE checkpoint {ckpt_path!r} not found. Get it with {DOWNLOAD}, and pass "
                                f"--mae-ckpt DIR/mae_latent_256_torch.pth (or use --features teacher)")


def mae_encoder(ckpt_path, device="cpu"):
    """encode(latents (B, 4, h, w)) -> the encoder's last feature map `layer4`, (B, C, h/8, w/8)."""
    check_ckpt(ckpt_path)
    try:
        raw = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, an HTML error page, a pickle that would run code, ...
        raise ValueError(f"latent-MAE checkpoint {ckpt_path} is damaged or not a torch checkpoint "
                         f"({type(e).__name__}); download it again with {DOWNLOAD}") from e
    sd = raw.get("state_dict") or raw.get("model_state_dict") or {k: v for k, v in raw.items() if torch.is_tensor(v)}
    layers = raw.get("metadata", {}).get("model_config", {}).get("layers", [3, 4, 6, 3])
    W = {}
    for k, v in sd.items():
        name, _, kind = k.removeprefix("module.").removeprefix("_orig_mod.").rpartition(".")
        if kind == "kernel":  # JAX layout (H, W, in, out) -> torch (out, in, H, W)
            v = v.permute(3, 2, 0, 1)
        W[name + {"kernel": ".weight", "scale": ".weight"}.get(kind, "." + kind)] = v.float().to(device)

    def conv(x, name, stride=1):
        k = W[name + ".weight"].to(x.dtype)
        return F.conv2d(x, k, stride=stride, padding=k.shape[-1] // 2)

    def gn(x, name):  # groups: the largest divisor of the channel count up to 32
        groups = max(g for g in range(1, 33) if x.shape[1] % g == 0)
        return F.group_norm(x, groups, W[name + ".weight"].to(x.dtype), W[name + ".bias"].to(x.dtype), eps=1e-5)

    def encode(latents):
        x = latents.to(torch.promote_types(latents.dtype, torch.float32))
        h = F.relu(gn(conv(x, "encoder.conv1"), "encoder.gn1"))
        for s, n_blocks in enumerate(layers):
            for b in range(n_blocks):
                p, stride = f"encoder.stages_{s}.layers_{b}", 2 if (s > 0 and b == 0) else 1
                y = F.relu(gn(conv(h, p + ".conv1", stride), p + ".gn1"))
                y = gn(conv(y, p + ".conv2"), p + ".gn2")
                short = gn(conv(h, p + ".proj_conv", stride), p + ".proj_gn") if p + ".proj_conv.weight" in W else h
                h = F.relu(short + y)
            h = gn(h, f"encoder.layer{s + 1}_norm")
        return h

    return encode
