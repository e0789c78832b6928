"""DINOv2 on generated images, as a DrPO feature map: the paper's (arXiv 2606.02521) "VAE decode +
DINOv2" ablation.

A self-contained file: it needs torch and transformers, and can be copied into any project.

    encode = dinov2_encoder("facebook/dinov2-base", "cuda")
    cls, grid = encode(images)   # images (B, 3, H, W) in [0, 1] -> (B, 1, D), (B, D, 16, 16)

The images are resized to 224 x 224 (bilinear, antialiased) and ImageNet-normalized; gradients flow
back to the images, so a decoder in front of it can be trained through.
"""
import torch
import torch.nn.functional as F

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's


def dinov2_encoder(model_id="facebook/dinov2-base", device="cpu", dtype=torch.float32):
    """encode(images) -> (CLS token (B, 1, D), patch tokens as a (B, D, side, side) map), both float32."""
    from transformers import AutoModel
    try:
        net = AutoModel.from_pretrained(model_id, dtype=dtype).to(device).eval().requires_grad_(False)
    except OSError as e:
        raise OSError(f"could not load DINOv2 {model_id!r} ({str(e).splitlines()[0]}); download it with "
                      f"`hf download {model_id} --local-dir DIR` and pass --dinov2 DIR") from e
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (MEAN, STD))

    def encode(images):
        img = F.interpolate(images.float(), size=(224, 224), mode="bilinear", antialias=True)
        hidden = net(pixel_values=((img - mean) / std).to(dtype)).last_hidden_state.float()
        side = 224 // net.config.patch_size
        return hidden[:, :1], hidden[:, 1:].transpose(1, 2).reshape(len(img), -1, side, side)

    return encode
