"""Checks of DrPO: the drift field on toy tensors, then the models, rewards and loop on tiny models."""

import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub

import pytest
import torch
from safetensors.torch import load_file

import drpo
from examples import tiny_model
from rewards import clip, geneval, hpsv3, imagereward

# outputs of the published HPSv3 and latent-MAE code on random weights (fixtures/README.md)
FIXTURES = Path(__file__).resolve().parent / "fixtures"

RADII = (0.02, 0.05, 0.2)


# ---------------------------------------------------------------- the drift field ---------

def naive_field(X, Yp, Yn, wp, wn, radii, kernel="laplacian", mask_pairs=()):
    """The drift field (arXiv 2606.02521) evaluated entry by entry in float64, independently of drpo.py.

    wp, wn: (B, P) / (B, M) weights. mask_pairs: extra (i, column) pairs whose logits are masked.
    Returns V (B, N, D) and sigma.
    """
    X, Yp, Yn = X.double(), Yp.double(), Yn.double()
    B, N, D = X.shape
    T = torch.cat([X, Yn, Yp], 1)
    w = torch.cat([torch.ones(B, N, dtype=torch.float64), wn.double(), wp.double()], 1)
    J, M = T.shape[1], Yn.shape[1]
    d = torch.zeros(B, N, J, dtype=torch.float64)
    for b in range(B):
        for i in range(N):
            for j in range(J):
                sq = X[b, i] @ X[b, i] + T[b, j] @ T[b, j] - 2 * X[b, i] @ T[b, j]
                d[b, i, j] = math.sqrt(max(sq.item(), 1e-8))
    s = max((d * w[:, None, :]).mean().item() / w.mean().item(), 1e-3)
    sig = max(s / math.sqrt(D), 1e-3)
    V = torch.zeros(B, N, D, dtype=torch.float64)
    for tau in radii:
        Fr = torch.zeros(B, N, D, dtype=torch.float64)
        for b in range(B):
            lg = torch.zeros(N, J, dtype=torch.float64)
            for i in range(N):
                for j in range(J):
                    if kernel == "laplacian":
                        lg[i, j] = -d[b, i, j] / (s * tau)
                    elif kernel == "rbf":
                        lg[i, j] = -0.5 * (d[b, i, j] / (s * tau)) ** 2
                    else:
                        lg[i, j] = (X[b, i] @ T[b, j]) / (X[b, i].norm() * T[b, j].norm()) / tau
            for i in range(N):
                lg[i, i] -= 100 / tau
            for i, j in mask_pairs:
                lg[i, j] -= 100 / tau
            row = torch.exp(lg - lg.max(1, keepdim=True).values)
            row = row / row.sum(1, keepdim=True)
            col = torch.exp(lg - lg.max(0, keepdim=True).values)
            col = col / col.sum(0, keepdim=True)
            A = torch.sqrt(torch.clamp(row * col, min=1e-6)) * w[b][None, :]
            for i in range(N):
                mp = A[i, N + M:].sum()
                mn = A[i, : N + M].sum()
                for j in range(J):
                    c = -A[i, j] * mp if j < N + M else A[i, j] * mn
                    Fr[b, i] += c * (T[b, j] / sig - X[b, i] / sig)
        Fr = Fr / math.sqrt(max((Fr ** 2).mean().item(), 1e-8))
        V += Fr
    return V, sig


def toy(B=2, N=6, P=3, M=3, D=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, N, D, generator=g), torch.randn(B, P, D, generator=g) + 1.0,
            torch.randn(B, M, D, generator=g) - 1.0)


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


@pytest.mark.parametrize("kernel", ["laplacian", "rbf", "cosine"])
def test_field_matches_entrywise_evaluation(kernel):
    X, Yp, Yn = toy()
    wp = torch.tensor([[1000.0, 3000.0, 500.0], [2000.0, 10.0, 3000.0]])
    wn = torch.tensor([700.0, 3000.0, 50.0])
    V, sigma = drpo.drift_field(X, Yp, Yn, pos_weight=wp, neg_weight=wn, radii=RADII, kernel=kernel)
    Vn, sn = naive_field(X, Yp, Yn, wp, wn.expand(2, 3), RADII, kernel)
    assert sigma.item() == pytest.approx(sn, rel=1e-5)
    torch.testing.assert_close(V.double(), Vn, rtol=1e-4, atol=1e-4)


def test_gradient_is_minus_two_v_over_sigma_n_d():
    X, Yp, Yn = toy(N=7, D=4)
    X.requires_grad_(True)
    loss = drpo.drift_loss(X, Yp, Yn, pos_weight=3000.0, neg_weight=3000.0)
    V, sigma = drpo.drift_field(X, Yp, Yn, pos_weight=3000.0, neg_weight=3000.0)
    loss.sum().backward()
    N, D = X.shape[1:]
    torch.testing.assert_close(X.grad, -2 * V / (sigma * N * D), rtol=1e-5, atol=1e-7)
    # and the loss value is mean(V^2) per set, since gen/sigma - goal = -V at this point
    torch.testing.assert_close(loss, V.pow(2).mean(dim=(1, 2)))


def test_field_points_from_negatives_to_positives():
    g = torch.Generator().manual_seed(1)
    e = torch.zeros(8)
    e[0] = 1.0
    X = 0.1 * torch.randn(1, 16, 8, generator=g)
    Yp = 3 * e + 0.1 * torch.randn(1, 4, 8, generator=g)
    Yn = -3 * e + 0.1 * torch.randn(1, 4, 8, generator=g)
    V, _ = drpo.preference_field(X, Yp, Yn)
    assert (V[0] @ e > 0).all()                     # every sample is pushed towards +e
    assert cosine(V.mean(1), e[None]) > 0.9          # and the mean field is aligned with it


def test_swapping_positives_and_negatives_flips_the_field():
    X, Yp, Yn = toy(B=1, N=10, P=4, M=4, D=6, seed=3)
    V1, _ = drpo.preference_field(X, Yp, Yn)
    V2, _ = drpo.preference_field(X, Yn, Yp)
    assert cosine(V1, V2) < -0.99


def test_reference_drift_pulls_back_to_shifted_base():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(1, 12, 6, generator=g)
    delta = torch.zeros(6)
    delta[2] = 0.8
    V, _ = drpo.reference_drift(X, X + delta)
    proj = (V[0] @ delta) / delta.norm()
    assert proj.mean() > 0.3 * V[0].norm(dim=-1).mean()  # clearly positive, not marginally


def test_reference_drift_with_identical_base_spreads_samples():
    X = torch.randn(1, 12, 6, generator=torch.Generator().manual_seed(5))
    V, sigma = drpo.reference_drift(X, X.clone())
    assert V.abs().max() > 0.1                      # not zero
    before = torch.pdist(X[0]).mean()
    after = torch.pdist(X[0] + 0.01 * sigma * V[0]).mean()
    assert after > before


def test_laplacian_field_is_scale_invariant():
    X, Yp, Yn = toy(seed=6)
    V1, s1 = drpo.preference_field(X, Yp, Yn)
    V2, s2 = drpo.preference_field(7.5 * X, 7.5 * Yp, 7.5 * Yn)
    torch.testing.assert_close(V1, V2, rtol=1e-4, atol=1e-4)
    assert s2.item() == pytest.approx(7.5 * s1.item(), rel=1e-5)


def test_uniform_anchor_weights_equal_scalar_weight():
    X, Yp, Yn = toy(seed=7)
    V, _ = drpo.drift_field(X, Yp, Yn, pos_weight=1234.0, neg_weight=99.0)
    V1, _ = drpo.drift_field(X, Yp, Yn, pos_weight=torch.full((3,), 1234.0), neg_weight=torch.full((2, 3), 99.0))
    torch.testing.assert_close(V, V1)
    # and a non-uniform weight does change it (the weights are really used)
    V2, _ = drpo.drift_field(X, Yp, Yn, pos_weight=torch.tensor([1234.0, 1.0, 1234.0]), neg_weight=99.0)
    assert (V - V2).abs().max() > 1e-3


def test_mask_neg_self_masks_exactly_the_pairs_i_n_plus_i():
    g = torch.Generator().manual_seed(8)
    X = torch.randn(1, 5, 3, generator=g)
    ref = torch.randn(1, 5, 3, generator=g)
    w = torch.full((1, 5), 3000.0)
    V, _ = drpo.reference_drift(X, ref)
    N = 5
    Vn, _ = naive_field(X, ref, X, w, w, RADII, mask_pairs=[(i, N + i) for i in range(N)])
    torch.testing.assert_close(V.double(), Vn, rtol=1e-4, atol=1e-4)
    # masking other pairs (or none) gives a different field, so the mask is where it should be
    Vshift, _ = naive_field(X, ref, X, w, w, RADII, mask_pairs=[(i, N + (i + 1) % N) for i in range(N)])
    Vnone, _ = drpo.drift_field(X, ref, X, pos_weight=3000.0, neg_weight=3000.0)
    assert (Vshift - Vn).abs().max() > 1e-2
    assert (Vnone.double() - Vn).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_finite_float32_losses(dtype):
    X, Yp, Yn = (t.to(dtype) for t in toy(seed=9))
    X.requires_grad_(True)
    loss = drpo.drift_loss(X, Yp, Yn, pos_weight=3000.0, neg_weight=3000.0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.sum().backward()
    assert X.grad.dtype == dtype and torch.isfinite(X.grad.float()).all()
    ref = drpo.drift_loss(X.detach().float(), Yp.float(), Yn.float(), pos_weight=3000.0, neg_weight=3000.0)
    torch.testing.assert_close(loss.detach(), ref, rtol=0.05, atol=0.05)


def test_objective_is_preference_plus_lambda_reference_and_chunks_add_up():
    g = torch.Generator().manual_seed(10)
    K, T = 6, 2  # 6 candidates with 2 tokens each, pooled into a set of 12
    gen = {"a": torch.randn(2, K * T, 4, generator=g), "b": torch.randn(2, K, 3, generator=g)}
    pos = {k: v[:, :4] + 1 for k, v in gen.items()}
    neg = {k: v[:, -4:] - 1 for k, v in gen.items()}
    ref = {k: v + 0.3 for k, v in gen.items()}
    gen = {k: v.requires_grad_(True) for k, v in gen.items()}
    loss, stats = drpo.drpo_objective(gen, pos, neg, ref, lambda_ref=0.2)
    expect = sum(drpo.drift_loss(gen[k], pos[k], neg[k], pos_weight=3000.0, neg_weight=3000.0).mean()
                 + 0.2 * drpo.drift_loss(gen[k], ref[k], gen[k].detach(), pos_weight=3000.0, neg_weight=3000.0,
                                         mask_neg_self=True).mean() for k in gen)
    torch.testing.assert_close(loss, expect)
    assert stats["loss_pref"] + 0.2 * stats["loss_ref"] == pytest.approx(loss.item(), rel=1e-5)
    assert stats["dist_pos"] > 0 and stats["dist_ref"] > 0
    full = torch.autograd.grad(loss, list(gen.values()))
    # the same targets, regressed two candidates at a time, give the same value and gradient
    targets, _ = drpo.drpo_targets(gen, pos, neg, ref, lambda_ref=0.2)
    total = 0.0
    grads = [torch.zeros_like(v) for v in gen.values()]
    for c in range(0, K, 2):
        chunk = {"a": gen["a"][:, c * T:(c + 2) * T], "b": gen["b"][:, c:c + 2]}
        part = drpo.regression_loss(chunk, targets, start=c, n_total=K)
        for acc, gr in zip(grads, torch.autograd.grad(part, list(gen.values()))):
            acc += gr
        total += part.item()
    assert total == pytest.approx(loss.item(), rel=1e-5)
    for a, b in zip(grads, full):
        torch.testing.assert_close(a, b)


def test_select_pos_neg_is_disjoint_ordered_and_deterministic():
    scores = torch.tensor([[0.5, 3.0, -1.0, 3.0, 0.0, 2.0, -1.0, 1.0]])
    pos, neg = drpo.select_pos_neg(scores, 3, 3)
    assert pos.tolist() == [[1, 3, 5]]               # best first; the tie 1/3 broken by index
    assert neg.tolist() == [[6, 2, 4]]               # worst first
    assert not set(pos[0].tolist()) & set(neg[0].tolist())
    p1, n1 = drpo.select_pos_neg(scores[0], 4, 4)    # K = n_pos + n_neg still disjoint
    assert sorted(p1.tolist() + n1.tolist()) == list(range(8))


@pytest.mark.parametrize("scores,n_pos,n_neg,match", [
    (torch.randn(8), 5, 4, "exceeds"),
    (torch.tensor([1.0, float("nan"), 0.0, 2.0]), 1, 1, "NaN"),
    (torch.tensor([1.0, float("inf"), 0.0, 2.0]), 1, 1, "NaN or infinite"),
    (torch.randn(8), 0, 2, "at least 1"),
    (torch.randn(2, 3, 4), 1, 1, "shape"),
])
def test_select_pos_neg_rejects_bad_input(scores, n_pos, n_neg, match):
    with pytest.raises(ValueError, match=match):
        drpo.select_pos_neg(scores, n_pos, n_neg)


@pytest.mark.parametrize("change,match", [
    (dict(gen=torch.randn(6, 5)), "gen must be"),
    (dict(pos=torch.randn(3, 3, 5)), "batch"),
    (dict(neg=torch.randn(2, 3, 4)), "feature size"),
    (dict(pos=torch.randn(2, 0, 5)), "pos is empty"),
    (dict(neg=torch.randn(2, 0, 5)), "neg is empty"),
    (dict(radii=(0.1, 0.0)), "radii"),
    (dict(radii=()), "radii"),
    (dict(kernel="gaussian"), "unknown kernel"),
    (dict(pos_weight=torch.ones(4)), "pos_weight"),
    (dict(neg_weight=torch.ones(3, 3)), "neg_weight"),
])
def test_drift_loss_rejects_bad_input(change, match):
    X, Yp, Yn = toy()
    args = dict(gen=X, pos=Yp, neg=Yn, pos_weight=1.0, neg_weight=1.0, radii=RADII, kernel="laplacian")
    args.update(change)
    with pytest.raises(ValueError, match=match):
        drpo.drift_loss(**args)


# ---------------------------------------------------------------- feature maps ------------

def test_mae_features_match_the_published_extractor():
    phi = drpo.load_features("mae", mae_ckpt=FIXTURES / "mae_tiny" / "mae_latent_tiny.pth")
    latents = load_file(FIXTURES / "mae_tiny" / "latents.safetensors")["latents"]
    expected = load_file(FIXTURES / "mae_tiny" / "expected.safetensors")
    # In float64: the fixture's own float32 round-off is up to 9e-6 (measured against a float64
    # evaluation), so two float32 runs on different CPUs can differ by more than the tolerance.
    out = phi(latents.double(), None, None)
    assert out.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(out[k], v.double(), rtol=1e-5, atol=1e-5)


def test_mae_reads_torch_layout_and_prefixed_keys(tmp_path):
    raw = torch.load(FIXTURES / "mae_tiny" / "mae_latent_tiny.pth", weights_only=True)
    sd = {}
    for k, v in raw["state_dict"].items():  # torch layout (out, in, H, W), `.weight`, DDP prefix
        if k.endswith(".kernel"):
            k, v = k[:-len("kernel")] + "weight", v.permute(3, 2, 0, 1)
        elif k.endswith(".scale"):
            k = k[:-len("scale")] + "weight"
        sd["module." + k] = v
    torch.save({"model_state_dict": sd, "metadata": raw["metadata"]}, tmp_path / "m.pth")
    latents = load_file(FIXTURES / "mae_tiny" / "latents.safetensors")["latents"]
    out = drpo.load_features("mae", mae_ckpt=tmp_path / "m.pth")(latents.double(), None, None)
    for k, v in load_file(FIXTURES / "mae_tiny" / "expected.safetensors").items():
        torch.testing.assert_close(out[k], v.double(), rtol=1e-5, atol=1e-5)


def test_missing_or_damaged_mae_checkpoint_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="modelscope download"):
        drpo.load_features("mae", mae_ckpt="/nonexistent/mae.pth")
    (tmp_path / "mae.pth").write_bytes((FIXTURES / "mae_tiny" / "mae_latent_tiny.pth").read_bytes()[:300])  # cut off
    with pytest.raises(ValueError, match="mae.pth is damaged or not a torch checkpoint .*modelscope download"):
        drpo.load_features("mae", mae_ckpt=tmp_path / "mae.pth")


# ---------------------------------------------------------------- tiny model --------------

@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return str(tiny_model.make_tiny(tmp_path_factory.mktemp("tiny") / "model"))


def tiny_from_the_command_line(folder, arch, flag):
    """examples/tiny_model.py DIR --arch ARCH, run as a user runs it; it names the flag that takes DIR."""
    script = Path(__file__).resolve().parent / "examples" / "tiny_model.py"
    done = subprocess.run([sys.executable, str(script), str(folder), "--arch", arch], capture_output=True, text=True)
    assert done.returncode == 0 and f"{flag} {folder}" in done.stdout, done.stderr
    return str(folder)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    return tiny_from_the_command_line(tmp_path_factory.mktemp("tinyxl") / "model", "sdxl", "--model")


@pytest.fixture(scope="session")
def tiny_sana(tmp_path_factory):
    return tiny_from_the_command_line(tmp_path_factory.mktemp("tinysana") / "model", "sana-sprint", "--model")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    return tiny_from_the_command_line(tmp_path_factory.mktemp("tinyflux") / "model", "flux", "--model")


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    return tiny_from_the_command_line(tmp_path_factory.mktemp("tinysd3") / "model", "sd3", "--model")


FAMILIES = {"sd": "tiny", "sdxl": "tiny_sdxl", "sana": "tiny_sana"}
FLOW_FAMILIES = {"flux": "tiny_flux", "sd3": "tiny_sd3"}  # few-step flow-matching transformers, 4 steps each


def family(request, arch):
    """(tiny model folder, drpo.py flags) of arch: a FAMILIES key; sdxl-4, SDXL-Turbo's scheduler at 4 steps
    (Euler-ancestral: fresh noise between steps, drawn from the loop's seeded generator); or a FLOW_FAMILIES key,
    at 4 steps and its tiny model's 128 px (the tiny FLUX's stock default side is FLUX's 1024 px)."""
    if arch == "sdxl-4":
        return request.getfixturevalue("tiny_sdxl"), ["--inference-steps", "4"]
    if arch in FLOW_FAMILIES:
        return request.getfixturevalue(FLOW_FAMILIES[arch]), ["--inference-steps", "4", "--resolution", "128"]
    return request.getfixturevalue(FAMILIES[arch]), []


@pytest.fixture(params=FAMILIES)
def tiny_any(request):
    """The tiny SD, SDXL and SANA-Sprint pipelines in turn: the same loop must serve every family."""
    return request.getfixturevalue(FAMILIES[request.param])


def is_sana(folder):
    return json.loads((Path(folder) / "model_index.json").read_text())["_class_name"] == "SanaSprintPipeline"


def stock_one_step(pipe, prompts, z, **kw):
    """The stock pipeline's one step on the noises z (the keywords of a plain one-step call of its class)."""
    side = z.shape[-1] * pipe.vae_scale_factor
    one = (dict(num_inference_steps=1, intermediate_timesteps=None, use_resolution_binning=False, height=side,
                width=side) if type(pipe).__name__ == "SanaSprintPipeline" else
           dict(guidance_scale=0.0, **({} if "timesteps" in kw else dict(num_inference_steps=1))))
    return pipe(prompts, latents=z, **one, **kw).images


def lora_generator(folder, run_dir, timestep=None):
    """drpo's generator for folder, with the LoRA of run_dir's checkpoint."""
    from peft.utils import set_peft_model_state_dict
    model = drpo.load_generator(folder, timesteps=timestep and [timestep])
    drpo.add_lora(model.net, 16, 16, ["to_q", "to_k", "to_v", "to_out.0"])
    set_peft_model_state_dict(model.net, torch.load(Path(run_dir) / "checkpoint.pt", weights_only=True)["lora"])
    return model


def test_tiny_sdxl_is_a_stock_sdxl_pipeline_with_the_turbo_scheduler(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.unet.config.addition_embed_type == "text_time" and pipe.text_encoder_2 is not None


def test_pipeline_class_comes_from_the_folder_not_the_name(tiny, tiny_sdxl, tmp_path, capsys):
    shutil.copytree(tiny_sdxl, tmp_path / "sd-turbo")  # an SDXL folder with an SD-sounding name
    assert type(drpo.load_generator(str(tmp_path / "sd-turbo")).pipe).__name__ == "StableDiffusionXLPipeline"
    assert type(drpo.load_generator(tiny).pipe).__name__ == "StableDiffusionPipeline"
    index = json.loads((tmp_path / "sd-turbo" / "model_index.json").read_text())
    (tmp_path / "sd-turbo" / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="is a KandinskyPipeline"):
        drpo.model_class(str(tmp_path / "sd-turbo"))


@pytest.mark.parametrize("arch,native", [("sd", 1024), ("sdxl", 512)])
def test_default_resolution_is_the_native_side_and_512_for_sdxl(tiny, tiny_sdxl, tmp_path, arch, native):
    folder = tmp_path / "big"
    shutil.copytree(tiny if arch == "sd" else tiny_sdxl, folder)
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**cfg, "sample_size": 128}))  # SD(XL)'s 1024 px config
    assert drpo.latent_shape(drpo.load_generator(str(folder))) == (4, native // 8, native // 8)
    assert drpo.latent_shape(drpo.load_generator(str(folder)), 256) == (4, 32, 32)


def run(tiny, out, *extra, reward="brightness"):
    """A tiny run; the held-out evaluation is off unless extra turns it on (its tests do)."""
    return drpo.main(["--model", tiny, "--reward", reward, "--output-dir", str(out), "--candidates", "8",
                      "--n-pos", "3", "--n-neg", "3", "--grad-accum", "2", "--lr", "1e-3", "--seed", "0",
                      "--eval-every", "0", *extra])


def pipeline(tiny, lora=None):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny)  # the stock class the folder names
    pipe.set_progress_bar_config(disable=True)
    if lora:
        pipe.load_lora_weights(lora)
    return pipe


def with_scheduler(folder, out, scheduler, **config):
    """A copy of a pipeline folder whose scheduler is another class or config (how DMD2's and
    SDXL-Lightning's folders are made from SDXL's: docs/models.md)."""
    import diffusers

    shutil.copytree(folder, out)
    old = diffusers.DDPMScheduler.load_config(folder, subfolder="scheduler")
    getattr(diffusers, scheduler).from_config(old, **config).save_pretrained(Path(out) / "scheduler")
    index = json.loads((Path(out) / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", scheduler]
    (Path(out) / "model_index.json").write_text(json.dumps(index))
    return str(out)


# (scheduler class, its config changes, --timestep): the stock schedulers (SD-Turbo's Euler, SDXL-Turbo's
# Euler-ancestral), DMD2's LCM at 399, SDXL-Lightning's x0-predicting Euler, and Euler with v-prediction
ONE_STEP_MODELS = {"stock": None, "lcm-399": ("LCMScheduler", {}, 399),
                   "lightning": ("EulerDiscreteScheduler", {"prediction_type": "sample"}, None),
                   "v-prediction": ("EulerDiscreteScheduler", {"prediction_type": "v_prediction"}, None)}


@pytest.mark.parametrize("arch,kind", [(a, k) for a in ("sd", "sdxl") for k in ONE_STEP_MODELS] + [("sana", "stock")])
def test_one_step_sampler_matches_the_diffusers_pipeline(request, tmp_path, arch, kind):
    tiny = request.getfixturevalue(FAMILIES[arch])
    timestep = None
    if ONE_STEP_MODELS[kind]:
        scheduler, config, timestep = ONE_STEP_MODELS[kind]
        tiny = with_scheduler(tiny, tmp_path / kind, scheduler, **config)
    pipe = pipeline(tiny)  # the stock pipeline, with the scheduler the folder names
    assert type(pipe.scheduler).__name__ == (ONE_STEP_MODELS[kind] or [type(pipe.scheduler).__name__])[0]
    z = torch.randn((2, 32, 4, 4) if arch == "sana" else (2, 4, 16, 16), generator=torch.Generator().manual_seed(3))
    prompts = ["a red fox", "a blue boat on a lake"]
    ref = stock_one_step(pipe, prompts, z, output_type="latent", **dict(timesteps=[timestep]) if timestep else {})
    mine = drpo.load_generator(tiny, timesteps=timestep and [timestep])
    if arch != "sana":  # SANA-Sprint's transformer sees the SCM time of TrigFlow's 1.5708 (generators/sana.py)
        assert mine.recipe[0][0] == (timestep or 999)
    with torch.no_grad():
        x = drpo.generate(mine.net, z, mine.conditioning(prompts, 128), mine.recipe)
        img = drpo.decode(mine.pipe.vae, x)
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(img, pipe.image_processor.postprocess(pipe.vae.decode(
        ref / pipe.vae.config.scaling_factor).sample.detach(), output_type="pt"), rtol=0, atol=1e-5)


def test_a_dmd2_style_model_trains_and_its_lora_loads_into_the_stock_pipeline(tiny_sdxl, tmp_path):
    """An SDXL folder with LCM at --timestep 399 (DMD2's recipe) goes through the same loop; what it
    trains is what the stock pipeline with timesteps=[399] and the LoRA loaded samples."""
    model = with_scheduler(tiny_sdxl, tmp_path / "dmd2", "LCMScheduler")
    assert run(model, tmp_path / "run", "--max-steps", "2", "--lr", "3e-2", "--sample-every", "0",
               "--timestep", "399") == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["timesteps"] == [399]
    z = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(5))
    stock = pipeline(model, tmp_path / "run")
    ref = stock("a snowy owl", latents=z, timesteps=[399], guidance_scale=0.0, output_type="latent").images
    base = pipeline(model)("a snowy owl", latents=z, timesteps=[399], guidance_scale=0.0, output_type="latent").images
    mine = lora_generator(model, tmp_path / "run", timestep=399)
    with torch.no_grad():
        x = drpo.generate(mine.net, z, mine.conditioning(["a snowy owl"], 128), mine.recipe)
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert (ref - base).abs().max() > 1e-3  # the LoRA changed the samples


# (scheduler class or None for the folder's own, its config changes, --inference-steps, --timesteps): SD-Turbo's Euler
# at 2 steps, SDXL-Turbo's Euler-ancestral at 4 (fresh noise between steps), SDXL-Lightning's trailing Euler at 4,
# DMD2's 4-step UNet (LCM at 999, 749, 499, 249: fresh noise between steps)
FEW_STEP_MODELS = {"sd-turbo-2": ("sd", None, {}, 2, None), "sdxl-turbo-4": ("sdxl", None, {}, 4, None),
                   "lightning-4": ("sdxl", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, 4, None),
                   "dmd2-4": ("sdxl", "LCMScheduler", {}, None, (999, 749, 499, 249))}


def few_step_model(request, tmp_path, kind):
    """(folder, drpo.py flags) of a FEW_STEP_MODELS entry."""
    arch, scheduler, config, steps, timesteps = FEW_STEP_MODELS[kind]
    tiny = request.getfixturevalue(FAMILIES[arch])
    folder = with_scheduler(tiny, tmp_path / kind, scheduler, **config) if scheduler else tiny
    return folder, (["--inference-steps", str(steps)] if steps else []) + \
        (["--timesteps", ",".join(map(str, timesteps))] if timesteps else [])


def stock_call(kind):
    _, _, _, steps, timesteps = FEW_STEP_MODELS[kind]
    return dict(guidance_scale=0.0, **(dict(timesteps=list(timesteps)) if timesteps else dict(num_inference_steps=steps)))


@pytest.mark.parametrize("kind", FEW_STEP_MODELS)
def test_few_step_sampler_equals_the_stock_pipeline_on_each_seed(request, tmp_path, kind):
    """eval.py's image for (prompt, seed s) is the stock pipe(prompt, generator=manual_seed(s)) at N steps: the
    latents, then each step's fresh noise (LCM, Euler-ancestral) drawn from that generator, in its order."""
    import eval as ev

    folder, _ = few_step_model(request, tmp_path, kind)
    _, _, _, steps, timesteps = FEW_STEP_MODELS[kind]
    model = drpo.load_generator(folder, steps=steps, timesteps=timesteps)
    assert len(model.recipe) == 4 if kind != "sd-turbo-2" else len(model.recipe) == 2
    assert model.stock_call == stock_call(kind)
    fresh = drpo.noise_draws(model.recipe) > 1
    assert fresh == (kind in ("sdxl-turbo-4", "dmd2-4"))
    pipe = pipeline(folder)
    for seed in (0, 7):
        noises = ev.seed_noises(model, 128, [seed])
        x = ev.sample(model, ["a red fox"], noises)[0]
        ref = pipe("a red fox", generator=torch.Generator().manual_seed(seed), height=128, width=128,
                   output_type="latent", **stock_call(kind)).images
        torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # the fresh noises matter: other step noises (the same start) give another image
    if fresh:
        other = noises.clone()
        other[:, 1:] = torch.randn_like(other[:, 1:])
        assert (ev.sample(model, ["a red fox"], other)[0] - x).abs().max() > 1e-2 * x.abs().max()


def test_a_four_step_dmd2_lora_trains_loads_into_the_stock_pipeline_and_evaluates(request, tmp_path):
    """DMD2's 4-step UNet (LCM at 999,749,499,249) trains through all 4 steps; the LoRA in the stock pipeline at the
    model card's keywords samples what drpo.py trained, and eval.py takes the run's timesteps."""
    import eval as ev

    folder, flags = few_step_model(request, tmp_path, "dmd2-4")
    assert run(folder, tmp_path / "run", "--max-steps", "2", "--lr", "3e-2", "--sample-every", "0", *flags) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["timesteps"] == [999, 749, 499, 249]
    assert "timesteps=[999, 749, 499, 249]" in (tmp_path / "run" / "README.md").read_text()
    mine = lora_generator(folder, tmp_path / "run", timestep=None)
    mine.recipe = drpo.step_recipe(mine.pipe.scheduler, timesteps=(999, 749, 499, 249))
    noises = ev.seed_noises(mine, 128, [3])
    x = ev.sample(mine, ["a snowy owl"], noises)[0]
    kw = dict(generator=torch.Generator().manual_seed(3), height=128, width=128, output_type="latent",
              **stock_call("dmd2-4"))
    ref = pipeline(folder, tmp_path / "run")("a snowy owl", **kw).images
    kw["generator"] = torch.Generator().manual_seed(3)
    base = pipeline(folder)("a snowy owl", **kw).images
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert (ref - base).abs().max() > 1e-3  # the LoRA changed the 4-step samples
    assert ev.main(["--lora", str(tmp_path / "run"), "--model", folder, "--reward", "brightness", "--seeds", "2",
                    "--max-prompts", "2", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["settings"]["timesteps"] == [999, 749, 499, 249]


def stock_latents(pipe, prompt, seed, side, **call):
    """The stock pipeline's final latents for (prompt, generator=manual_seed(seed)), (1, C, h, w): FLUX's tokens
    unpacked by the pipeline's own _unpack_latents."""
    out = pipe(prompt, generator=torch.Generator().manual_seed(seed), height=side, width=side, output_type="latent",
               **call).images
    return pipe._unpack_latents(out, side, side, pipe.vae_scale_factor) if out.dim() == 3 else out


@pytest.mark.parametrize("arch,steps", [("flux", None), ("flux", 4), ("sd3", None), ("sd3", 4)])
def test_flow_transformers_equal_the_stock_pipeline_on_each_seed(request, arch, steps):
    """FLUX's and SD3's sampler (eval.py's noises of seed s through drpo.sample) is the stock pipe(prompt,
    generator=manual_seed(s)): at the stock __call__'s own steps (28; SD3 without guidance, as Turbo samples) and
    at --inference-steps 4; the latents to 1e-5 of their scale, the image through the VAE's scaling and shift."""
    import eval as ev

    folder = request.getfixturevalue(FLOW_FAMILIES[arch])
    model = drpo.load_generator(folder, steps=steps)
    assert len(model.recipe) == model.stock_call["num_inference_steps"] == (steps or 28)
    assert drpo.noise_draws(model.recipe) == 1  # flow-matching Euler: no fresh noise
    assert drpo.latent_shape(model) == ((16, 128, 128) if arch == "flux" else (16, 16, 16))  # the stock default side
    call = {k: v for k, v in model.stock_call.items() if steps or k == "guidance_scale"}  # else the stock defaults
    pipe = pipeline(folder)
    for seed in (0, 7):
        x = ev.sample(model, ["a red fox"], ev.seed_noises(model, 128, [seed]))[0]
        ref = stock_latents(pipe, "a red fox", seed, 128, **call)
        torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    image = pipe("a red fox", generator=torch.Generator().manual_seed(7), height=128, width=128, output_type="pt",
                 **call).images
    torch.testing.assert_close(drpo.decode(model.pipe.vae, x), image, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch,alias,card", [
    ("flux", "flux-schnell", dict(num_inference_steps=4, max_sequence_length=256)),
    ("sd3", "sd3.5-large-turbo", dict(num_inference_steps=4, guidance_scale=0.0, max_sequence_length=256))])
def test_the_aliases_bring_their_model_cards_settings_and_a_plain_folder_the_stock_defaults(request, arch, alias,
                                                                                            card):
    folder = request.getfixturevalue(FLOW_FAMILIES[arch])
    plain = drpo.load_generator(folder)
    assert plain.stock_call == {**card, "num_inference_steps": 28, "max_sequence_length": 512 if arch == "flux" else 256}
    pipe = drpo.load_generator(folder).pipe
    pipe.register_to_config(_name_or_path=drpo.MODEL_ALIASES[alias])  # as from_pretrained of the hub id sets it
    model = drpo.beside(f"generators.{arch}").generator(pipe)
    assert model.stock_call == card and len(model.recipe) == 4
    tokens = model.conditioning(["a cat"])["encoder_hidden_states"].shape[1]
    assert tokens == (256 if arch == "flux" else 77 + 256)  # T5's max_sequence_length (SD3: after CLIP's 77)


@pytest.mark.parametrize("arch", FLOW_FAMILIES)
def test_a_flow_transformer_lora_trains_loads_into_the_stock_pipeline_and_evaluates(request, tmp_path, arch):
    """FLUX and SD3 at 4 steps train through all 4; the LoRA in the stock pipeline at the model card's keywords
    samples what drpo.py trained, and eval.py reads the run's model, steps and size from its config.json."""
    from peft.utils import set_peft_model_state_dict

    import eval as ev

    folder, flags = family(request, arch)
    assert run(folder, tmp_path / "run", "--max-steps", "2", "--lr", "3e-2", "--sample-every", "0", *flags) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["inference_steps"], config["resolution"]) == (4, 128)
    assert "num_inference_steps=4" in (tmp_path / "run" / "README.md").read_text()
    mine = drpo.load_generator(folder, steps=4)
    drpo.add_lora(mine.net, 16, 16, ["to_q", "to_k", "to_v", "to_out.0"])
    set_peft_model_state_dict(mine.net, torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["lora"])
    x = ev.sample(mine, ["a snowy owl"], ev.seed_noises(mine, 128, [3]))[0]
    ref = stock_latents(pipeline(folder, tmp_path / "run"), "a snowy owl", 3, 128, **mine.stock_call)
    base = stock_latents(pipeline(folder), "a snowy owl", 3, 128, **mine.stock_call)
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert (ref - base).abs().max() > 1e-3  # the LoRA changed the 4-step samples
    assert ev.main(["--lora", str(tmp_path / "run"), "--reward", "brightness", "--seeds", "2", "--max-prompts", "2",
                    "--out", str(tmp_path / "ev")]) == 0
    settings = json.loads((tmp_path / "ev" / "results.json").read_text())["settings"]
    assert (settings["model"], settings["inference_steps"], settings["resolution"]) == (folder, 4, 128)


@pytest.mark.parametrize("arch", FLOW_FAMILIES)
def test_flow_teacher_features_are_the_stock_blocks_image_tokens_at_sigma_one_eleventh(request, arch):
    """Independent of teacher_features: x_t = (1 - sigma) x0 + sigma noise at sigma = 1/11 (10/11 of x0 + 0.1 noise),
    fed to the stock transformer as its pipeline feeds it (FLUX: packed tokens with their ids, timestep sigma; SD3:
    timestep 1000 sigma); the image tokens of blocks at 1/4, 1/2, 3/4 depth, hooked, as 4 x 4 grids."""
    folder = request.getfixturevalue(FLOW_FAMILIES[arch])
    model = drpo.load_generator(folder, steps=4)
    for p in drpo.add_lora(model.net, 4, 4, ["to_q", "to_k", "to_v", "to_out.0"]):
        torch.nn.init.normal_(p, std=0.5)  # a LoRA that would show, were it not switched off
    x, noise = torch.randn(2, 16, 16, 16), torch.randn(2, 16, 16, 16)
    cond = model.conditioning(["a cat", "a dog"])
    got = drpo.load_features("teacher", model)(x, noise, cond)
    pipe = pipeline(folder)
    blocks = (["transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1"] if arch == "flux"
              else ["transformer_blocks.0", "transformer_blocks.1"])  # of 1 + 2 FLUX blocks, of 2 SD3 blocks
    assert list(got) == [f"teacher.{b}" for b in blocks]
    outs = []
    for b in blocks:
        top, i = b.split(".")
        getattr(pipe.transformer, top)[int(i)].register_forward_hook(lambda m, inputs, o: outs.append(o[1]))
    xt = (10 * x + noise) / 11
    with torch.no_grad():
        if arch == "flux":
            pipe.transformer(pipe._pack_latents(xt, 2, 16, 16, 16), timestep=torch.full((2,), 1 / 11),
                             img_ids=pipe._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32),
                             txt_ids=torch.zeros(cond["encoder_hidden_states"].shape[1], 3), **cond)
        else:
            pipe.transformer(xt, timestep=torch.full((2,), 1000 / 11), **cond)
    for v, o in zip(got.values(), outs):
        want = torch.nn.functional.adaptive_avg_pool2d(o.permute(0, 2, 1).reshape(2, -1, 8, 8), 4).flatten(1)
        torch.testing.assert_close(v[:, 0], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_flow_settings_that_do_not_fit_are_refused_before_loading(tiny_flux, tiny_sd3, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setattr(drpo, "load_generator", lambda *a, **k: pytest.fail("loaded a model"))
    dev = with_scheduler(tiny_flux, tmp_path / "dev", "FlowMatchEulerDiscreteScheduler", use_dynamic_shifting=True)
    MAE = str(FIXTURES / "mae_tiny" / "mae_latent_tiny.pth")
    for folder, flags, said in [
            (tiny_flux, ["--timesteps", "999"], "FLUX's steps are the stock pipeline's sigmas"),
            (tiny_sd3, ["--timesteps", "999"], "SD3's steps are the stock scheduler's for N steps"),
            (tiny_flux, ["--features", "mae", "--mae-ckpt", MAE], "FLUX's latents have 16 channels"),
            (tiny_sd3, ["--features", "mae", "--mae-ckpt", MAE], "SD3's latents have 16 channels"),
            (tiny_flux, ["--resolution", "120"], "FLUX needs a multiple of 16 .*e.g. 128"),
            (tiny_sd3, ["--resolution", "120"], "SD3 needs a multiple of 16"),
            (tiny_flux, ["--teacher-layers", "transformer_blocks.1"], "single_transformer_blocks.I .I < 2"),
            (tiny_sd3, ["--teacher-layers", "transformer_blocks.2"], "transformer_blocks.I with I in 0..1"),
            (dev, [], "use_dynamic_shifting, FLUX.1-dev's")]:
        assert drpo.main(["--model", folder, "--reward", "brightness", "--output-dir", str(tmp_path / "o"),
                          *flags]) == 2, flags
        assert re.search(said, capsys.readouterr().err), (flags, said)


def test_grad_steps_backpropagate_through_the_last_steps_only(tiny_sdxl):
    """--grad-steps K: the gradient of the sampler with its state detached before the last K steps; K = N is all
    steps'; gradient checkpointing (each step recomputed in backward) gives the same gradient."""
    model = drpo.load_generator(tiny_sdxl, steps=4)
    params = drpo.add_lora(model.net, 4, 4, ["to_q", "to_k", "to_v", "to_out.0"])
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(p)))  # a LoRA that acts
    n, N = 2, len(model.recipe)
    z = torch.randn((n, drpo.noise_draws(model.recipe), 4, 16, 16), generator=torch.Generator().manual_seed(0))
    cond = drpo.rows(model.conditioning(["a red fox"], 128), lambda v: v.repeat_interleave(n, 0))

    def grads(x):
        return torch.autograd.grad(x.square().mean(), params)

    full = grads(drpo.generate(model.net, z, cond, model.recipe))
    assert all(torch.equal(a, b) for a, b in zip(full, grads(drpo.generate(model.net, z, cond, model.recipe, N))))
    last = grads(drpo.generate(model.net, z, cond, model.recipe, grad_steps=1))
    with torch.no_grad():  # by hand: the first N - 1 steps without a graph, then the last one with it
        mid = drpo.generate(model.net, z[:, :N], cond, model.recipe[:N - 1])
    by_hand = grads(drpo.generate(model.net, torch.cat([mid[:, None], z[:, N:]], 1), cond, model.recipe[N - 1:]))
    for a, b in zip(last, by_hand):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    size = lambda g: torch.sqrt(sum(v.square().sum() for v in g))
    assert size([a - b for a, b in zip(full, last)]) > 1e-2 * size(full)  # truncation changes the gradient
    model.net.enable_gradient_checkpointing()
    for a, b in zip(full, grads(drpo.generate(model.net, z, cond, model.recipe))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_families_without_a_generator_are_refused_with_the_supported_ones(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(drpo, "load_generator", lambda *a, **k: pytest.fail("loaded a model"))
    sana = tmp_path / "sana"
    sana.mkdir()
    (sana / "model_index.json").write_text(json.dumps({"_class_name": "SanaPipeline"}))  # SANA, not Sprint
    argv = ["--reward", "brightness", "--max-steps", "1", "--output-dir", str(tmp_path / "o")]
    assert drpo.main(["--model", str(sana), *argv]) == 2
    err = capsys.readouterr().err
    assert "is a SanaPipeline, which DrPO has no generator for" in err
    assert ("StableDiffusionPipeline, StableDiffusionXLPipeline, SanaSprintPipeline, FluxPipeline, "
            "StableDiffusion3Pipeline: SD-Turbo") in err
    # a scheduler whose step is not affine (DDIM clips x0 to [-1, 1]) has no recipe: said, not trained
    from diffusers import DDIMScheduler
    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=True)
    with pytest.raises(ValueError, match="DDIMScheduler's step is not affine"):
        drpo.step_recipe(ddim)
    assert drpo.step_recipe(DDIMScheduler(clip_sample=False, timestep_spacing="trailing"))[0][0] == 999
    # a multistep solver's step also reads earlier steps' outputs: no affine step of its own, refused beyond one step
    from diffusers import DPMSolverMultistepScheduler
    with pytest.raises(ValueError, match="DPMSolverMultistepScheduler remembers earlier steps"):
        drpo.step_recipe(DPMSolverMultistepScheduler(), 4)


def test_teacher_features_reuse_noise_see_the_prompt_and_pass_gradient_to_the_latent_only(tiny_any):
    model = drpo.load_generator(tiny_any)
    params = drpo.add_lora(model.net, 4, 4, ["to_q", "to_k", "to_v", "to_out.0"])
    for p in params:  # a non-zero LoRA, so "LoRA off" is observable
        torch.nn.init.normal_(p, std=0.5)
    phi = drpo.load_features("teacher", model)
    x = torch.randn(3, *drpo.latent_shape(model), requires_grad=True)
    noise = torch.randn_like(x)
    cond = model.conditioning(["a cat", "a dog", "a cat"], 128)
    a, b = phi(x, noise, cond), phi(x, noise, cond)
    # SD / SDXL: the published blocks, 64 channels; SANA: 3 of the 4 blocks' 32-wide tokens as a 4 x 4 grid
    blocks = (["transformer_blocks.1", "transformer_blocks.2", "transformer_blocks.3"] if is_sana(tiny_any) else
              ["down_blocks.-1", "mid_block", "up_blocks.0"])
    assert list(a) == [f"teacher.{n}" for n in blocks]
    assert all(v.shape == (3, 1, (32 if is_sana(tiny_any) else 64) * 16) for v in a.values())
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    mid, last = f"teacher.{blocks[1]}", f"teacher.{blocks[2]}"
    assert (phi(x, torch.randn_like(x), cond)[mid] - a[mid]).abs().max() > 0
    # the teacher is conditioned on each latent's own prompt (the published SDXL-Turbo trainer's rule)
    other = model.conditioning(["a cat", "a cat", "a cat"], 128)
    c = phi(x, noise, other)[last]
    torch.testing.assert_close(c[[0, 2]], a[last][[0, 2]])
    assert (c[1] - a[last][1]).abs().max() > 1e-4
    with drpo.lora_off(model.net):  # features come from the base network: the LoRA must not change them
        base = phi(x, noise, cond)
    for k in a:
        torch.testing.assert_close(a[k], base[k])
    sum(v.sum() for v in a.values()).backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in params)


@pytest.mark.parametrize("arch", ["sd", "sana", *FLOW_FAMILIES])
def test_checkpointed_teacher_recomputes_each_block_with_the_lora_off(request, arch):
    # with --gradient-checkpointing the teacher's blocks are recomputed one at a time in backward (not the whole
    # teacher at once: 34 GB on FLUX), and each with the LoRA off as in its forward: the latent's gradient is the same
    tiny, _ = family(request, arch)
    model = drpo.load_generator(tiny, steps=1)
    params = drpo.add_lora(model.net, 4, 4, ["to_q", "to_k", "to_v", "to_out.0"])
    for p in params:  # a LoRA that acts: a recompute with it on would be another function
        torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(p.numel()))
    phi = drpo.load_features("teacher", model)
    x = torch.randn(2, *drpo.latent_shape(model, 128 if arch in FLOW_FAMILIES else None))
    noise, cond = torch.randn_like(x), model.conditioning(["a cat", "a dog"], 128)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.net.enable_gradient_checkpointing()
        xg = x.clone().requires_grad_(True)
        sum(v.square().sum() for v in phi(xg, noise, cond).values()).backward()
        grads.append(xg.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    assert model.net.is_gradient_checkpointing and not model.net.lora_is_off  # as the loop left them
    assert all(p.grad is None for p in params)


def test_sana_teacher_features_are_the_stock_transformer_blocks_at_trigflow_time_atan_one_tenth(tiny_sana):
    """Independent of teacher_features: the TrigFlow sample x_t = cos t x0 + sin t noise at tan t = 0.1, scaled
    and timed as the stock pipeline feeds its transformer (SCM: s = sin t / (sin t + cos t)), the outputs of
    blocks 1..3 hooked on the stock transformer, each token grid average-pooled to 4 x 4."""
    from diffusers import SanaSprintPipeline

    model = drpo.load_generator(tiny_sana)
    for p in drpo.add_lora(model.net, 4, 4, ["to_q", "to_k", "to_v", "to_out.0"]):
        torch.nn.init.normal_(p, std=0.5)  # a LoRA that would show, were it not switched off
    x, noise = torch.randn(2, 32, 4, 4), torch.randn(2, 32, 4, 4)
    cond = model.conditioning(["a cat", "a dog"])  # equal to the stock pipeline's (the one-step test)
    got = drpo.load_features("teacher", model)(x, noise, cond)
    transformer = SanaSprintPipeline.from_pretrained(tiny_sana).transformer
    t = math.atan(0.1)
    s = math.sin(t) / (math.sin(t) + math.cos(t))
    outs = []
    for i in (1, 2, 3):
        transformer.transformer_blocks[i].register_forward_hook(lambda m, inputs, o: outs.append(o))
    with torch.no_grad():
        transformer((math.cos(t) * x + math.sin(t) * noise) * math.sqrt(s * s + (1 - s) ** 2),
                    timestep=torch.full((2,), s), **cond)
    assert list(got) == [f"teacher.transformer_blocks.{i}" for i in (1, 2, 3)]
    for v, o in zip(got.values(), outs):
        want = torch.nn.functional.adaptive_avg_pool2d(o.permute(0, 2, 1).reshape(2, -1, 4, 4), 4).flatten(1)
        torch.testing.assert_close(v[:, 0], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_dinov2_features_decode_with_gradient_and_match_the_dinov2_model(tiny, tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             patch_size=14, image_size=224)).save_pretrained(tmp_path / "dino")
    model = drpo.load_generator(tiny)
    pipe = model.pipe
    phi = drpo.load_features("dinov2", model, dinov2=str(tmp_path / "dino"))
    x = torch.randn(3, 4, 16, 16, requires_grad=True)
    f = phi(x, None, None)
    assert {k: tuple(v.shape) for k, v in f.items()} == {
        "dinov2_cls": (3, 1, 32), "dinov2_mean": (3, 1, 32), "dinov2_std": (3, 1, 32), "dinov2_mean_2": (3, 64, 32),
        "dinov2_std_2": (3, 64, 32), "dinov2_mean_4": (3, 16, 32), "dinov2_std_4": (3, 16, 32)}
    f["dinov2_std_4"].sum().backward()
    assert x.grad.abs().sum() > 0 and all(not p.requires_grad for p in pipe.vae.parameters())
    # independent: the decoded image, resized and ImageNet-normalized, through Dinov2Model itself
    with torch.no_grad():
        img = (pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        img = torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
        img = (img - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        h = Dinov2Model.from_pretrained(tmp_path / "dino")(pixel_values=img).last_hidden_state
    torch.testing.assert_close(f["dinov2_cls"].detach(), h[:, :1], rtol=0, atol=1e-5)
    torch.testing.assert_close(f["dinov2_mean"].detach()[:, 0], h[:, 1:].mean(1), rtol=0, atol=1e-5)
    with pytest.raises(OSError, match="--dinov2 DIR"):
        drpo.load_features("dinov2", model, dinov2=str(tmp_path / "nodino"))


def test_short_run_writes_every_output_and_the_lora_loads_into_diffusers(tiny_any, tmp_path):
    tiny, out = tiny_any, tmp_path / "run"
    assert run(tiny, out, "--max-steps", "3", "--sample-every", "2", "--save-every", "2") == 0
    for name in ("pytorch_lora_weights.safetensors", "config.json", "metrics.jsonl", "checkpoint.pt",
                 "samples/step_000002.png", "samples/step_000003.png"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["candidates"] == 8 and cfg["lambda_ref"] == 0.2 and cfg["reward"] == "brightness"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward_mean", "reward_std", "pos_mean", "neg_mean", "loss_pref", "loss_ref", "field_rms",
                "lr", "seconds"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert all(r["pos_mean"] > r["neg_mean"] for r in rows)
    phases = {"sample", "reference", "decode", "reward", "features", "field", "backward", "optimizer"}
    assert all(set(r["phases_s"]) == phases and r["seconds"] == pytest.approx(sum(r["phases_s"].values()))
               for r in rows)
    # the LoRA loads with the stock diffusers call, changes the output, and reproduces our sampler
    mine = lora_generator(tiny, out)
    z = torch.randn((1, *drpo.latent_shape(mine)), generator=torch.Generator().manual_seed(5))
    base = stock_one_step(pipeline(tiny), ["a snowy owl"], z, output_type="pt")
    tuned_pipe = pipeline(tiny, str(out))  # e.g. SanaSprintPipeline.load_lora_weights for the SANA folder
    assert type(tuned_pipe).__name__ == json.loads((Path(tiny) / "model_index.json").read_text())["_class_name"]
    tuned = stock_one_step(tuned_pipe, ["a snowy owl"], z, output_type="pt")
    assert (tuned - base).abs().max() > 1e-3
    with torch.no_grad():
        x = drpo.generate(mine.net, z, mine.conditioning(["a snowy owl"], 128), mine.recipe)
        img = drpo.decode(mine.pipe.vae, x)
    torch.testing.assert_close(img, tuned, rtol=0, atol=1e-5)


def test_feature_sets_take_each_prompts_own_ranked_candidates():
    B, K, T, D = 2, 5, 3, 4
    fx = {"a": torch.randn(B * K, T, D, requires_grad=True), "b": torch.randn(B * K, 1, 2)}
    fr = {k: torch.randn_like(v) for k, v in fx.items()}
    pos_idx, neg_idx = torch.tensor([[4, 0], [1, 3]]), torch.tensor([[2], [0]])
    gen, pos, neg, ref = drpo.feature_sets(fx, fr, pos_idx, neg_idx)
    assert not any(t.requires_grad for sets in (gen, pos, neg, ref) for t in sets.values())  # the field's constants
    for k, f in fx.items():
        per_prompt = f.detach().view(B, K, *f.shape[1:])
        for b in range(B):
            torch.testing.assert_close(gen[k][b], per_prompt[b].flatten(0, 1), rtol=0, atol=0)
            torch.testing.assert_close(ref[k][b], fr[k].view(B, K, *f.shape[1:])[b].flatten(0, 1), rtol=0, atol=0)
            torch.testing.assert_close(pos[k][b], torch.cat([per_prompt[b, i] for i in pos_idx[b]]), rtol=0, atol=0)
            torch.testing.assert_close(neg[k][b], torch.cat([per_prompt[b, i] for i in neg_idx[b]]), rtol=0, atol=0)
    # offline pairs: each prompt's anchors follow its K samples; indices K.. pick them, gen stays the samples
    fa = {k: torch.randn(B * 3, *v.shape[1:]) for k, v in fx.items()}
    gen, pos, neg, _ = drpo.feature_sets(fx, fr, torch.tensor([[K, K + 1]] * B), torch.tensor([[K + 2]] * B), fa)
    for k, f in fa.items():
        per_prompt = f.view(B, 3, *f.shape[1:])
        torch.testing.assert_close(gen[k], fx[k].detach().reshape(B, -1, f.shape[-1]), rtol=0, atol=0)
        torch.testing.assert_close(pos[k], per_prompt[:, :2].flatten(1, 2), rtol=0, atol=0)
        torch.testing.assert_close(neg[k], per_prompt[:, 2], rtol=0, atol=0)


def test_an_update_equals_an_independent_construction_from_the_stock_pipeline(tiny, tmp_path):
    """Pins what the loop feeds the field. A LoRA made non-zero by two updates is updated once more
    by the loop, and once here from scratch: candidates and base samples from the stock diffusers
    pipeline (LoRA loaded / not loaded) on the noises of the documented draw order, brightness
    ranked per prompt by numpy, features of exactly those candidates with one noise draw, the
    objective with the weights given on the command line; then the same clipped AdamW step."""
    import numpy as np
    from diffusers import AutoPipelineForText2Image

    prompts = ["a red fox", "a blue boat on a lake", "snow at night", "a bowl of fruit", "a castle"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    B, K, n_pos, n_neg, lr = 2, 6, 2, 3, 1e-2
    w = dict(pos_weight=2000.0, neg_weight=1500.0, ref_weight=2500.0, ref_neg_weight=1000.0, lambda_ref=0.7,
             radii=(0.03, 0.1), ref_radii=(0.05, 0.3))
    flags = ["--prompts", str(tmp_path / "p.txt"), "--prompts-per-step", str(B), "--candidates", str(K),
             "--n-pos", str(n_pos), "--n-neg", str(n_neg), "--grad-accum", "1", "--lr", str(lr), "--seed", "3",
             "--sample-every", "0", "--save-every", "2", "--pos-weight", "2000", "--neg-weight", "1500",
             "--ref-weight", "2500", "--ref-neg-weight", "1000", "--lambda-ref", "0.7", "--radii", "0.03,0.1",
             "--ref-radii", "0.05,0.3"]
    common = ["--model", tiny, "--reward", "brightness", "--eval-every", "0", *flags]
    assert drpo.main(common + ["--output-dir", str(tmp_path / "warm"), "--max-steps", "2"]) == 0
    shutil.copytree(tmp_path / "warm", tmp_path / "next")
    assert drpo.main(common + ["--output-dir", str(tmp_path / "next"), "--max-steps", "3", "--resume"]) == 0
    loop_grad_norm = json.loads((tmp_path / "next" / "metrics.jsonl").read_text().splitlines()[-1])["grad_norm"]

    # the micro-step's prompts and noises: prompt order, then noises, then feature noises, from the checkpoint
    ckpt = torch.load(tmp_path / "warm" / "checkpoint.pt", weights_only=False)
    rng = torch.Generator()
    rng.set_state(ckpt["rng"])
    order = list(ckpt["order"])
    while len(order) < B:
        order += torch.randperm(len(prompts), generator=rng).tolist()
    batch = [prompts[i] for i in order[:B]]
    z = torch.randn((B * K, 4, 16, 16), generator=rng)
    feat_noise = torch.randn((B * K, 4, 16, 16), generator=rng)

    pipe = AutoPipelineForText2Image.from_pretrained(tiny)
    pipe.set_progress_bar_config(disable=True)
    one = dict(num_inference_steps=1, guidance_scale=0.0)
    per_prompt = [slice(b * K, (b + 1) * K) for b in range(B)]
    with torch.no_grad():
        r = torch.cat([pipe([p] * K, latents=z[s], output_type="latent", **one).images for p, s in zip(batch, per_prompt)])
    pipe.load_lora_weights(tmp_path / "warm")  # the non-zero LoRA of step 2
    assert any(v.abs().max() > 0 for k, v in pipe.unet.state_dict().items() if "lora_B" in k)
    with torch.no_grad():
        x = torch.cat([pipe([p] * K, latents=z[s], output_type="latent", **one).images for p, s in zip(batch, per_prompt)])
        images = [im for p, s in zip(batch, per_prompt) for im in pipe([p] * K, latents=z[s], **one).images]
    assert (x - r).abs().max() > 1e-2  # the reference really is another generator now
    bright = np.array([np.asarray(im, dtype=np.float64).mean() / 255 for im in images]).reshape(B, K)
    ranked = np.argsort(-bright, axis=1, kind="stable")
    pos_idx, neg_idx = ranked[:, :n_pos], ranked[:, K - n_neg:]

    phi = drpo.load_features("teacher", drpo.unet_generator(pipe))  # the teacher UNet with the LoRA off
    # each candidate's own prompt, as the stock pipeline encodes it
    cond = {"encoder_hidden_states": torch.cat([pipe.encode_prompt([p] * K, "cpu", 1, False)[0] for p in batch])}
    with torch.no_grad():
        fx, fr = phi(x, feat_noise, cond), phi(r, feat_noise, cond)
    sets = lambda f, idx: torch.stack([f.view(B, K, *f.shape[1:])[b, idx[b]].flatten(0, 1) for b in range(B)])
    pos = {k: sets(f, pos_idx) for k, f in fx.items()}
    neg = {k: sets(f, neg_idx) for k, f in fx.items()}
    ref = {k: f.reshape(B, -1, f.shape[-1]) for k, f in fr.items()}
    lora = [(n, p) for n, p in pipe.unet.named_parameters() if "lora_" in n]
    for _, p in lora:
        p.requires_grad_(True)
    x_grad = drpo.generate(pipe.unet, z, cond, drpo.step_recipe(pipe.scheduler))
    torch.testing.assert_close(x_grad.detach(), x, rtol=0, atol=1e-4)
    gen = {k: v.reshape(B, -1, v.shape[-1]) for k, v in phi(x_grad, feat_noise, cond).items()}
    loss, _ = drpo.drpo_objective(gen, pos, neg, ref, kernel="laplacian", **w)
    loss.backward()
    grad_norm = torch.sqrt(sum(p.grad.pow(2).sum() for _, p in lora)).item()
    assert grad_norm == pytest.approx(loop_grad_norm, rel=1e-4)

    # the same AdamW step from the checkpoint's optimizer state, compared with the loop's LoRA
    opt = torch.optim.AdamW([p for _, p in lora], lr=lr, betas=(0.9, 0.999), weight_decay=1e-2)
    opt.load_state_dict(ckpt["optimizer"])
    torch.nn.utils.clip_grad_norm_([p for _, p in lora], 1.0)
    before = {n: p.detach().clone() for n, p in lora}
    opt.step()
    stepped = pipeline(tiny, tmp_path / "next").unet.state_dict()
    # float32 round-off of the two constructions: up to 2.3e-6 measured on an AMD EPYC (2e-6 elsewhere)
    for n, p in lora:
        torch.testing.assert_close(p.detach(), stepped[n], rtol=0, atol=5e-6)
    assert max((stepped[n] - before[n]).abs().max().item() for n, _ in lora) > 1e-3  # the step is far above 5e-6


STOP_AT = {"calls": 0, "limit": None}


def interrupting_reward(images, prompts):
    """Brightness, but raises KeyboardInterrupt on a given call: a run killed mid-training."""
    STOP_AT["calls"] += 1
    if STOP_AT["limit"] is not None and STOP_AT["calls"] > STOP_AT["limit"]:
        raise KeyboardInterrupt
    return drpo.brightness_reward(images, prompts)


@pytest.mark.parametrize("arch", ["sd", "sana", "sdxl-4", *FLOW_FAMILIES])
def test_resume_continues_exactly_like_an_uninterrupted_run(request, tmp_path, monkeypatch, arch):
    tiny, steps = family(request, arch)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    common = ("--max-steps", "5", "--save-every", "2", "--sample-every", "0", *steps)
    assert run(tiny, tmp_path / "full", *common) == 0
    # killed during step 4 (2 reward calls per step): checkpoint at step 2, metrics up to step 3
    STOP_AT.update(calls=0, limit=7)
    assert run(tiny, tmp_path / "cut", *common, reward="test_drpo:interrupting_reward") == 130
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    STOP_AT.update(limit=None)  # the same reward, no longer interrupting (a changed reward would be refused)
    assert run(tiny, tmp_path / "cut", *common, "--resume", reward="test_drpo:interrupting_reward") == 0
    full = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    cut = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    drop = ("seconds", "phases_s")
    assert [{k: v for k, v in json.loads(a).items() if k not in drop} for a in cut] == \
           [{k: v for k, v in json.loads(a).items() if k not in drop} for a in full]
    a = load_file(tmp_path / "full" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "cut" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_chunked_regression_gives_the_unchunked_gradient(tiny_any, tmp_path):
    # the chunked run also recomputes UNet activations (gradient checkpointing): neither may change the gradient
    for name, extra in (("whole", ["--grad-chunk", "0"]), ("chunks", ["--grad-chunk", "3", "--gradient-checkpointing"])):
        assert run(tiny_any, tmp_path / name, "--max-steps", "2", "--sample-every", "0", *extra) == 0
    rows = {n: [json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("whole", "chunks")}
    # step 1: the same gradient up to float summation order; later steps also carry Adam's
    # amplification of those ~1e-7 differences on near-zero gradient entries
    for i, (r1, r2) in enumerate(zip(rows["whole"], rows["chunks"])):
        assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-5 if i == 0 else 2e-4)
        assert r1["loss_pref"] == pytest.approx(r2["loss_pref"], rel=1e-5 if i == 0 else 2e-4)
    a = load_file(tmp_path / "whole" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "chunks" / "pytorch_lora_weights.safetensors")
    # Adam turns ~1e-7 gradient differences on near-zero entries into steps of up to lr = 1e-3, so single
    # entries are no measure (2 of 1024 moved 1.2e-4 apart once the sampler's rounding changed); the LoRA
    # as a whole is: 0.8e-5 (SD) and 2.2e-5 (SDXL) of its norm apart, measured. The published lr: the next test
    norm = lambda state: torch.sqrt(sum(v.double().pow(2).sum() for v in state.values())).item()
    assert a.keys() == b.keys() and norm({k: a[k] - b[k] for k in a}) <= 1e-4 * norm(a)


@pytest.mark.parametrize("arch", [*FAMILIES, "sdxl-4", *FLOW_FAMILIES])
def test_one_pass_and_chunked_recompute_make_the_same_updates(request, tmp_path, arch):
    """Unchunked, the loop backpropagates through its sampling pass; --grad-chunk 3 recomputes the
    generator and features in chunks. Both, with and without gradient checkpointing, must make the
    same 3 updates (at the published lr 1e-4). The first update's gradient agrees to ~1e-7; the
    float round-off of other batch sizes then passes through Adam: measured 1e-6 of the LoRA's norm
    and 1.4e-4 of its up halves, which start at zero and so hold what the updates moved. At 4 steps, checkpointing
    recomputes each step of the sampler in backward."""
    tiny_any, steps = family(request, arch)
    runs = {}
    for chunk in ("0", "3"):
        for ckpt in ((), ("--gradient-checkpointing",)):
            out = tmp_path / f"c{chunk}{''.join(ckpt)}"
            assert run(tiny_any, out, "--max-steps", "3", "--sample-every", "0", "--lr", "1e-4",
                       "--grad-chunk", chunk, *ckpt, *steps) == 0
            runs[chunk, bool(ckpt)] = (load_file(out / "pytorch_lora_weights.safetensors"),
                                       [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])
    lora, rows = runs["0", False]
    up = [k for k in lora if ".lora.up." in k]
    norm = lambda state, keys: torch.sqrt(sum(state[k].double().pow(2).sum() for k in keys)).item()
    for (chunk, ckpt), (other, other_rows) in runs.items():
        assert other.keys() == lora.keys()
        diff = {k: other[k] - lora[k] for k in lora}
        assert norm(diff, lora) <= 1e-5 * norm(lora, lora), (chunk, ckpt)
        assert norm(diff, up) <= 1e-3 * norm(lora, up), (chunk, ckpt)
        for i, (a, b) in enumerate(zip(rows, other_rows)):
            for key in a.keys() - {"seconds", "phases_s"}:
                # later updates: 2.3e-4 apart measured on SD3 (the first agrees to 1e-6, so the update is the same)
                assert b[key] == pytest.approx(a[key], rel=1e-6 if i == 0 else 5e-4, abs=1e-9), (chunk, ckpt, i, key)


def torchrun(*argv, nproc=2):
    """`python -m torch.distributed.run --standalone` with gloo processes on this CPU."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), str(Path(__file__).resolve().parent / "drpo.py"), *argv],
                          capture_output=True, text=True, env=env, timeout=300,
                          start_new_session=True)  # its own process group: no signal of its reaches the tests


@pytest.mark.parametrize("arch", ["sd", "sana", "sdxl-4", *FLOW_FAMILIES])
def test_torchrun_update_equals_one_process_with_the_accumulation_of_all_and_resumes_exactly(request, tmp_path, arch):
    tiny, steps = family(request, arch)
    common = ["--model", tiny, *steps, "--reward", "brightness", "--candidates", "8",
              "--n-pos", "3", "--n-neg", "3",
              "--lr", "1e-2", "--seed", "0", "--sample-every", "0", "--save-every", "2", "--eval-every", "0"]
    # one process, accumulation 2 = 2 processes x 1; torchrun gives each worker one thread, so this
    # run gets one too (another thread count changes float round-off, which Adam amplifies)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert drpo.main(common + ["--grad-accum", "2", "--max-steps", "3", "--output-dir", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    # two processes: two updates, then a resumed third one (checkpoint at step 2)
    r = torchrun(*common, "--grad-accum", "1", "--max-steps", "2", "--output-dir", str(tmp_path / "two"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("done: LoRA") == 1  # one writer
    r = torchrun(*common, "--grad-accum", "1", "--max-steps", "3", "--output-dir", str(tmp_path / "two"), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in two] == [1, 2, 3]  # written once per update, across processes and the resume
    for a, b in zip(one, two):  # metrics pool the candidates of both processes
        for key in ("reward_mean", "reward_std", "pos_mean", "neg_mean", "loss_pref", "loss_ref", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
    a = load_file(tmp_path / "one" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "two" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    diff = math.sqrt(sum((a[k] - b[k]).pow(2).sum().item() for k in a))
    assert diff <= 1e-5 * math.sqrt(sum(v.pow(2).sum().item() for v in a.values()))
    assert max(v.abs().max().item() for k, v in a.items() if "lora.up" in k) > 1e-3  # the LoRA did train


def test_reward_device_is_rank_relative_with_a_plus(monkeypatch):
    cpu = torch.device("cpu")
    assert drpo.reward_device_of(None, cpu, 3) == cpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the mapping, as on a machine with GPUs
    assert drpo.reward_device_of("cuda:+4", cpu, 3) == torch.device("cuda", 7)  # 4 GPUs after the process's own
    assert drpo.reward_device_of("cuda:1", cpu, 3) == torch.device("cuda", 1)  # absolute: shared by all


def nan_on_rank_one(images, prompts):
    """Brightness, but NaN in the second torchrun process only."""
    if os.environ.get("RANK") == "1":
        return [float("nan")] * len(images)
    return drpo.brightness_reward(images, prompts)


def test_torchrun_failures_stop_every_process_and_are_reported_once(tiny, tmp_path):
    common = ["--model", tiny, "--candidates", "8", "--n-pos", "3", "--n-neg", "3", "--grad-accum", "1",
              "--max-steps", "2", "--sample-every", "0", "--eval-every", "0"]
    # one process fails inside an update: both exit, nobody waits in the gradient all-reduce
    r = torchrun(*common, "--reward", "test_drpo:nan_on_rank_one", "--output-dir", str(tmp_path / "nan"))
    assert r.returncode != 0
    assert r.stderr.count("returned NaN or infinite scores") == 1, r.stderr[-3000:]
    assert not (tmp_path / "nan" / "metrics.jsonl").exists()  # the failed update is not logged
    # every process fails the same way: still said once
    r = torchrun(*common, "--reward", "test_drpo:scores_with_nan", "--output-dir", str(tmp_path / "nan2"))
    assert r.returncode != 0 and r.stderr.count("returned NaN or infinite scores") == 1, r.stderr[-3000:]
    # a foreign output folder is refused by every process, said once, and left as it was
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    r = torchrun(*common, "--reward", "brightness", "--output-dir", str(tmp_path / "busy"))
    assert r.returncode != 0 and r.stderr.count("(another run?): a new run would replace them") == 1, r.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/model"], "no such folder"),
    (["--model", "."], "not a diffusers pipeline"),
    (["--model", "no-such-org/no-such-model"], "could not load --model"),
    (["--reward", "nosuchreward"], "unknown reward"),
    (["--reward", "nosuchmodule_xyz:score"], "no module 'nosuchmodule_xyz' on the Python path"),
    (["--reward", "test_drpo:scores_with_nan"], "NaN"),
    (["--reward", "pickscore"], "hf download yuvalkirstain/PickScore_v1"),
    (["--n-pos", "5", "--n-neg", "4"], "exceeds --candidates"),
    (["--features", "mae"], "modelscope download"),
    (["--candidates", "0"], "at least 1"),
])
def test_bad_settings_fail_with_a_clear_message(tiny, tmp_path, capsys, args, message):
    argv = ["--model", tiny, "--reward", "brightness", "--output-dir", str(tmp_path / "o"), "--candidates", "8",
            "--n-pos", "3", "--n-neg", "3", "--max-steps", "1"]
    assert drpo.main(argv + args) == 2
    assert message in capsys.readouterr().err


def test_tiny_alias_builds_the_demo_model_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    built = []
    make_tiny = tiny_model.make_tiny
    monkeypatch.setattr(tiny_model, "make_tiny", lambda d, **kw: built.append(d) or make_tiny(d, **kw))
    path = drpo.resolve_model("tiny")
    assert Path(path) == tmp_path / "cache" / "drpo" / "tiny-sd-v2" and len(built) == 1
    assert drpo.resolve_model("tiny") == path and len(built) == 1  # reused, not rebuilt
    assert sorted(p.name for p in (tmp_path / "cache" / "drpo").iterdir()) == ["tiny-sd-v2"]  # no leftovers
    pipe = drpo.load_generator("tiny").pipe
    assert tuple(pipe.unet.config.block_out_channels) == (32, 64)  # the tiny UNet, through the SD loading code


def test_help_shows_no_empty_defaults(capsys):
    import eval as ev

    for parser in (drpo.build_parser(), ev.build_parser()):
        text = parser.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text
        assert "(default: 24)" in text or "(default: 4)" in text  # real defaults are still shown


def test_empty_prompts_file_and_occupied_output_dir_are_refused(tiny, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("\n  \n")
    argv = ["--model", tiny, "--reward", "brightness", "--candidates", "8", "--n-pos", "3", "--n-neg", "3",
            "--max-steps", "1"]
    assert drpo.main(argv + ["--prompts", str(tmp_path / "p.txt"), "--output-dir", str(tmp_path / "a")]) == 2
    assert "has no prompts" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.jsonl").write_text('{"step": 1}\n')
    assert drpo.main(argv + ["--output-dir", str(tmp_path / "b")]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (tmp_path / "b" / "metrics.jsonl").read_text() == '{"step": 1}\n'  # nothing lost


# ---------------------------------------------------------------- runs that stop ----------

SIGNAL_AT = {"calls": 0, "at": None}


def sigterm_reward(images, prompts):
    """Brightness, but the process sends itself SIGTERM on a given call (preemption mid-update);
    under torchrun only rank 1 does, at the call DRPO_TEST_SIGTERM_AT."""
    SIGNAL_AT["calls"] += 1
    at = int(os.environ.get("DRPO_TEST_SIGTERM_AT", 0)) if os.environ.get("RANK") == "1" else SIGNAL_AT["at"]
    if at and SIGNAL_AT["calls"] == at:
        os.kill(os.getpid(), signal.SIGTERM)
    return drpo.brightness_reward(images, prompts)


def metrics_of(out):
    """metrics.jsonl without the timings."""
    return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "phases_s")}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def same_lora(a, b):
    a, b = load_file(a / "pytorch_lora_weights.safetensors"), load_file(b / "pytorch_lora_weights.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ["sd", "sana", *FLOW_FAMILIES])
def test_sigterm_drops_the_update_in_flight_saves_and_resume_equals_an_uninterrupted_run(request, tmp_path, monkeypatch,
                                                                                      capsys, arch):
    tiny, steps = family(request, arch)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    common = ("--max-steps", "5", "--save-every", "4", "--sample-every", "0", *steps)
    reward = "test_drpo:sigterm_reward"
    SIGNAL_AT.update(calls=0, at=None)
    assert run(tiny, tmp_path / "full", *common, reward=reward) == 0
    SIGNAL_AT.update(calls=0, at=5)  # 2 reward calls per update: the signal comes during update 3's first micro-step
    assert run(tiny, tmp_path / "cut", *common, reward=reward) == 143
    assert "stopped by SIGTERM after update 2" in capsys.readouterr().err  # update 3 dropped at its next micro-step
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 2  # saved, not lost
    assert [m["step"] for m in metrics_of(tmp_path / "cut")] == [1, 2]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    SIGNAL_AT.update(calls=0, at=None)
    assert run(tiny, tmp_path / "cut", *common, "--resume", reward=reward) == 0
    assert metrics_of(tmp_path / "cut") == metrics_of(tmp_path / "full")
    assert same_lora(tmp_path / "cut", tmp_path / "full")


def test_a_signal_during_the_heldout_evaluation_cuts_it_and_resume_evaluates_that_update(tiny, tmp_path, monkeypatch,
                                                                                         capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    (tmp_path / "held.txt").write_text("a lighthouse\na red barn\na bowl of fruit\n")
    common = ("--max-steps", "4", "--save-every", "4", "--sample-every", "0", "--eval-every", "2", "--eval-seeds",
              "2", "--eval-prompts", str(tmp_path / "held.txt"))
    reward = "test_drpo:sigterm_reward"
    SIGNAL_AT.update(calls=0, at=None)
    assert run(tiny, tmp_path / "full", *common, reward=reward) == 0
    SIGNAL_AT.update(calls=0, at=8)  # 3 calls score the base, 2 each update, then update 2's evaluation from call 8
    assert run(tiny, tmp_path / "cut", *common, reward=reward) == 143
    assert "stopped by SIGTERM after update 2" in capsys.readouterr().err
    assert SIGNAL_AT["calls"] == 8  # the evaluation stopped after the prompt in flight, not after all three
    assert [m["step"] for m in metrics_of(tmp_path / "cut")] == [0, 1, 2]  # the base's row; update 2's cut short
    SIGNAL_AT.update(calls=0, at=None)
    assert run(tiny, tmp_path / "cut", *common, "--resume", reward=reward) == 0
    assert metrics_of(tmp_path / "cut") == metrics_of(tmp_path / "full")  # update 2 evaluated first, then on
    assert same_lora(tmp_path / "cut", tmp_path / "full")


def test_sigterm_to_one_torchrun_process_stops_all_after_the_same_update(tiny, tmp_path):
    common = ["--model", tiny, "--reward", "test_drpo:sigterm_reward", "--candidates", "8", "--n-pos", "3",
              "--n-neg", "3", "--lr", "1e-2", "--seed", "0", "--sample-every", "0", "--save-every", "5",
              "--max-steps", "3", "--eval-every", "0"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker (see the torchrun test above)
    try:
        assert drpo.main(common + ["--reward", "brightness", "--grad-accum", "2", "--output-dir", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    os.environ["DRPO_TEST_SIGTERM_AT"] = "2"  # rank 1 only, during update 2 (one reward call per update each)
    try:
        r = torchrun(*common, "--grad-accum", "1", "--output-dir", str(tmp_path / "two"))
    finally:
        del os.environ["DRPO_TEST_SIGTERM_AT"]
    assert r.returncode != 0
    assert r.stderr.count("stopped by SIGTERM after update 2") == 1, r.stderr[-3000:]  # rank 0 says it, once
    assert torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["step"] == 2
    r = torchrun(*common, "--grad-accum", "1", "--output-dir", str(tmp_path / "two"), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = metrics_of(tmp_path / "one"), metrics_of(tmp_path / "two")
    assert [m["step"] for m in two] == [1, 2, 3]
    for a, b in zip(one, two):
        for key in ("reward_mean", "pos_mean", "neg_mean", "loss_pref", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
    a = load_file(tmp_path / "one" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "two" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    diff = math.sqrt(sum((a[k] - b[k]).pow(2).sum().item() for k in a))
    assert diff <= 1e-5 * math.sqrt(sum(v.pow(2).sum().item() for v in a.values()))  # the uninterrupted LoRA


def test_signals_are_deferred_once_and_a_second_ctrl_c_stops_at_once():
    import run_folder
    with run_folder.deferred_signals() as asked:
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's early warning, then its SIGTERM: both only noted
        os.kill(os.getpid(), signal.SIGTERM)
        assert asked == [signal.SIGUSR1, signal.SIGTERM]
    with run_folder.deferred_signals() as asked:
        os.kill(os.getpid(), signal.SIGINT)  # noted, not raised: the update in flight finishes
        assert asked == [signal.SIGINT]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


class WritesMarker:
    """A pickle that, when unpickled, creates a file: what a malicious checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tiny, tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "marker"
    assert run(tiny, out, "--max-steps", "1", "--sample-every", "0") == 0
    torch.save({"lora": WritesMarker(marker), "optimizer": {}, "rng": None, "step": 1, "order": []},
               out / "checkpoint.pt")
    assert run(tiny, out, "--max-steps", "2", "--sample-every", "0", "--resume") == 2
    err = capsys.readouterr().err
    assert str(out / "checkpoint.pt") in err and "not a DrPO checkpoint" in err
    assert not marker.exists()


def test_resume_refuses_changed_settings_before_loading_and_force_records_them(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert run(tiny, out, "--max-steps", "1", "--sample-every", "0") == 0
    capsys.readouterr()
    real = drpo.load_generator
    monkeypatch.setattr(drpo, "load_generator", lambda *a, **k: pytest.fail("loaded a model"))
    assert drpo.main(["--model", tiny, "--reward", "brightness", "--output-dir", str(out), "--candidates", "12",
                      "--n-pos", "3", "--n-neg", "3", "--grad-accum", "2", "--lr", "1e-3", "--seed", "0",
                      "--max-steps", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "candidates: 8 -> 12" in err and "--force" in err
    assert "max_steps" not in err  # settings that do not shape the run may change
    import argparse

    import run_folder
    saved = json.loads((out / "config.json").read_text())  # so may where the metrics are shown
    assert run_folder.changed_settings(saved, argparse.Namespace(**{**saved, "report_to": "wandb"}), 1) == []
    monkeypatch.setattr(drpo, "load_generator", real)
    # 2 processes x accumulation 1 = 1 x 2: the same run; accumulation 4 is not
    assert run(tiny, out, "--max-steps", "2", "--sample-every", "0", "--grad-accum", "4", "--resume") == 2
    assert "grad_accum x world size: 2 -> 4" in capsys.readouterr().err
    assert run(tiny, out, "--max-steps", "2", "--sample-every", "0", "--lambda-ref", "0.5", "--resume",
               "--force") == 0
    assert json.loads((out / "config.json").read_text())["forced_changes"] == ["lambda_ref: 0.2 -> 0.5"]


def test_a_truncated_checkpoint_is_named_and_the_previous_one_resumes(tiny, tmp_path, capsys):
    common = ("--sample-every", "0", "--save-every", "1")
    assert run(tiny, tmp_path / "full", *common, "--max-steps", "4") == 0
    out = tmp_path / "cut"
    assert run(tiny, out, *common, "--max-steps", "3") == 0
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])  # the last save cut off
    assert run(tiny, out, *common, "--max-steps", "4", "--resume") == 2
    err = capsys.readouterr().err
    assert f"{out / 'checkpoint.pt'} is missing, damaged" in err and "checkpoint.prev.pt" in err and "Traceback" not in err
    (out / "checkpoint.pt").unlink()  # cut off before the rename: only the previous one is left
    assert run(tiny, out, *common, "--max-steps", "4", "--resume") == 2
    assert f"`cp {out / 'checkpoint.prev.pt'} {out / 'checkpoint.pt'}`" in capsys.readouterr().err
    assert (out / "checkpoint.prev.pt").exists()  # not cleared as the leftover of an earlier run
    shutil.copyfile(out / "checkpoint.prev.pt", out / "checkpoint.pt")  # the fix the message names
    assert run(tiny, out, *common, "--max-steps", "4", "--resume") == 0
    assert metrics_of(out) == metrics_of(tmp_path / "full") and same_lora(out, tmp_path / "full")


def test_a_full_disk_while_saving_loses_nothing(tiny, tmp_path, capsys, monkeypatch):
    import errno

    out = tmp_path / "run"
    assert run(tiny, tmp_path / "one", "--max-steps", "1", "--sample-every", "0") == 0
    real, calls = torch.save, []

    def save(*a, **k):  # the first checkpoint is written, the second finds the disk full
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(torch, "save", save)
    assert run(tiny, out, "--max-steps", "3", "--sample-every", "0", "--save-every", "1") == 2
    assert "the disk is full" in capsys.readouterr().err
    monkeypatch.setattr(torch, "save", real)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1  # the last good one, whole
    assert same_lora(out, tmp_path / "one")  # and its LoRA
    assert not list(out.glob(".saving*"))


def test_updates_are_clipped_to_max_grad_norm(tiny, tmp_path, monkeypatch):
    seen, step = [], torch.optim.AdamW.step

    def recording_step(self, *a, **k):
        seen.append(math.sqrt(sum(p.grad.pow(2).sum().item() for g in self.param_groups for p in g["params"])))
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    assert run(tiny, tmp_path / "run", "--max-steps", "2", "--sample-every", "0", "--max-grad-norm", "1e-3") == 0
    logged = [m["grad_norm"] for m in metrics_of(tmp_path / "run")]
    assert all(g > 1e-2 for g in logged)  # the gradient is far above the clip ...
    assert len(seen) == 2 and all(s <= 1e-3 * (1 + 1e-4) for s in seen)  # ... and the optimizer sees it clipped


def test_out_of_memory_names_the_phase_and_the_remedies_and_keeps_the_checkpoint(tiny, tmp_path, capsys, monkeypatch):
    out, real, calls = tmp_path / "run", drpo.regression_loss, []

    def regression_loss(*a, **k):  # the 5th regression is in update 3 (2 micro-steps per update)
        calls.append(1)
        if len(calls) == 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **k)

    monkeypatch.setattr(drpo, "regression_loss", regression_loss)
    assert run(tiny, out, "--max-steps", "4", "--sample-every", "0", "--save-every", "2") == 2
    err = capsys.readouterr().err
    assert "out of GPU memory in the regression phase" in err
    for remedy in ("--grad-chunk 8", "--gradient-checkpointing", "--cache-conditioning", "--offload",
                   "--reward-device cuda:+1", "--reward-batch", "--quantize int8", "--reward-quantize int8"):
        assert remedy in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2


# ---------------------------------------------------------------- the run folder: nothing lost ---

def consistent(out):
    """The run folder's LoRA is the checkpoint's, and every tensor of both is finite: what a save promises."""
    from diffusers.utils import convert_state_dict_to_diffusers

    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    expected = {f"unet.{k}": v for k, v in convert_state_dict_to_diffusers(ckpt["lora"]).items()}
    return (lora.keys() == expected.keys() and all(torch.equal(lora[k], expected[k]) for k in lora)
            and all(torch.isfinite(v).all() for v in [*lora.values(), *ckpt["lora"].values()])
            and f"after {ckpt['step']} updates" in (out / "README.md").read_text())


FOLDER_ARGS = ("--max-steps", "2", "--save-every", "1", "--sample-every", "1", "--grid-prompts", "1")


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A finished two-update run on its own prompts file, copied by each case below."""
    d = tmp_path_factory.mktemp("finished")
    (d / "prompts.txt").write_text("a red fox\na blue car\na green field\n")
    assert run(tiny, d / "run", *FOLDER_ARGS, "--prompts", str(d / "prompts.txt")) == 0
    return d


def hold_lock(out):
    import fcntl

    lock = open(out / ".drpo.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    lock.write("process 4242 on elsewhere since 2026-12-07 10:00:00\n")
    lock.flush()
    return lock


# (name, what is done to a copy of the finished run, extra flags, exit code, what the last line of stderr says, what
# is on disk afterwards). Each run uses the finished run's settings but for --max-steps, --resume and what is given.
RUN_FOLDER_CASES = [
    ("resume without a checkpoint keeps the user's files",
     lambda out: [p.unlink() for p in out.glob("checkpoint*.pt")] + [(out / "notes.txt").write_text("mine")],
     ["--resume"], 2, "but no checkpoint to resume from: a new run would replace them",
     lambda out: (out / "notes.txt").read_text() == "mine" and (out / "pytorch_lora_weights.safetensors").is_file()),
    ("resume without a checkpoint, told to overwrite, starts over and leaves files that are not the run's",
     lambda out: [p.unlink() for p in out.glob("checkpoint*.pt")] + [(out / "notes.txt").write_text("mine")],
     ["--resume", "--overwrite", "--max-steps", "1"], 0, "done: LoRA in",
     lambda out: (out / "notes.txt").read_text() == "mine" and consistent(out)
     and [m["step"] for m in metrics_of(out)] == [1]),
    ("a deleted config.json is a refusal, not a fresh start",
     lambda out: (out / "config.json").unlink(), ["--resume", "--lr", "0.5", "--max-steps", "3"], 2,
     "config.json is missing or damaged", lambda out: consistent(out) and len(metrics_of(out)) == 2),
    ("--force continues without config.json, recorded",
     lambda out: (out / "config.json").unlink(), ["--resume", "--force", "--max-steps", "3"], 0, "done: LoRA in",
     lambda out: consistent(out) and "settings not compared" in json.loads(
         (out / "config.json").read_text())["forced_changes"][0]),
    ("a config.json that is not an object", lambda out: (out / "config.json").write_text('"a string"'),
     ["--resume", "--max-steps", "3"], 2, "config.json holds a str, not the run's settings", consistent),
    ("edited prompts are a changed setting", lambda out: (out.parent / "prompts.txt").write_text("a red fox\n"),
     ["--resume", "--max-steps", "3"], 2, "Resume with the run's settings", consistent),
    ("a cut last metrics line is dropped",
     lambda out: (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text() + '{"step": 3, "rew'),
     ["--resume", "--max-steps", "3"], 0, "done: LoRA in",
     lambda out: consistent(out) and [m["step"] for m in metrics_of(out)] == [1, 2, 3]),
    ("a damaged metrics line elsewhere is named",
     lambda out: (out / "metrics.jsonl").write_text("nonsense\n" + (out / "metrics.jsonl").read_text()),
     ["--resume", "--max-steps", "3"], 2, "metrics.jsonl, line 1 is not a metrics row", consistent),
    ("a folder of the user's in loras/ is left alone", lambda out: (out / "loras" / "step_final").mkdir(parents=True),
     ["--resume", "--max-steps", "3"], 0, "done: LoRA in",
     lambda out: (out / "loras" / "step_final").is_dir() and consistent(out)),
    ("what a cut save left is removed",
     lambda out: [(out / ".saving-000003").mkdir(), (out / ".saving-000003" / "checkpoint.pt").write_bytes(b"x"),
                  (out / "loras" / ".step_000003.saving").mkdir(parents=True)],
     ["--resume", "--max-steps", "3"], 0, "done: LoRA in",
     lambda out: not [*out.glob(".saving*"), *out.glob("loras/.*saving")] and consistent(out)),
    ("a LoRA newer than the checkpoint (a save cut between its renames) is rewritten from it",
     lambda out: (out / "pytorch_lora_weights.safetensors").write_bytes(b"not the checkpoint's LoRA"),
     ["--resume"], 0, "done: LoRA in", consistent),
    ("a second process is refused, by name", hold_lock, ["--resume", "--max-steps", "3"], 2,
     "is in use by process 4242 on elsewhere since 2026-12-07 10:00:00; wait for that run to end", consistent),
    ("a new run into a finished one is refused", lambda out: None, [], 2, "(another run?): a new run would replace",
     consistent),
    ("a first run that saved nothing can be repeated",
     lambda out: [shutil.rmtree(p) if p.is_dir() else p.unlink() for p in out.iterdir()
                  if p.name not in ("config.json", "metrics.jsonl", "samples")], ["--max-steps", "1"], 0,
     "done: LoRA in", lambda out: consistent(out) and [m["step"] for m in metrics_of(out)] == [1]),
]


@pytest.mark.parametrize("name,change,extra,code,said,check", RUN_FOLDER_CASES, ids=[c[0] for c in RUN_FOLDER_CASES])
def test_the_run_folder_belongs_to_one_run_and_nothing_in_it_is_lost(finished, tiny, tmp_path, capsys, name, change,
                                                                     extra, code, said, check):
    shutil.copytree(finished, tmp_path / "d")
    out, keep = tmp_path / "d" / "run", change(tmp_path / "d" / "run")
    try:
        got = run(tiny, out, *FOLDER_ARGS, "--prompts", str(tmp_path / "d" / "prompts.txt"), *extra)
    finally:
        keep.close() if hasattr(keep, "close") else None
    captured = capsys.readouterr()
    assert got == code and "Traceback" not in captured.err, captured.err[-2000:]
    last = (captured.out if code == 0 else captured.err).strip().splitlines()[-1]
    assert said in last, last
    assert check(out)
    assert oct((out / "pytorch_lora_weights.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~current_umask())


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


NAN_AT = {"calls": 0, "at": 99, "how": "nan"}


def breaking_features(latents, noise, cond):
    """Latent statistics that turn bad on the call NAN_AT["at"]: NaN features, or (how="grad") finite features whose
    gradient is infinite (the square root of 0, differentiated)."""
    NAN_AT["calls"] += 1
    feats = drpo.load_features("latent")(latents, noise, cond)
    if NAN_AT["calls"] >= NAN_AT["at"]:
        k = next(iter(feats))
        feats[k] = feats[k] * math.nan if NAN_AT["how"] == "nan" else feats[k] + (feats[k] - feats[k].detach()).sqrt()
    return feats


@pytest.mark.parametrize("how,said", [("nan", "--features test_drpo:breaking_features returned 'latent_mean' with "
                                       "NaN or infinite values"),
                                      ("grad", "update 3: the gradient is NaN or infinite")])
def test_nothing_non_finite_is_ever_saved(tiny, tmp_path, capsys, monkeypatch, how, said):
    """NaN features (the user's map) or an infinite gradient at update 3, with a save after every update: the run
    stops there, naming the cause, and the checkpoint, its LoRA and the snapshots stay those of update 2."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    argv = ("--features", "test_drpo:breaking_features", "--max-steps", "4", "--save-every", "1",
            "--save-lora-every", "1", "--sample-every", "1")
    NAN_AT.update(calls=0, at=99)
    assert run(tiny, tmp_path / "good", *argv[:-6], "--max-steps", "2", "--sample-every", "0") == 0
    NAN_AT.update(calls=0, at=9, how=how)  # 4 feature calls an update (2 micro-steps x 2): update 3 from call 9
    assert run(tiny, tmp_path / "bad", *argv) == 2
    err = capsys.readouterr().err
    assert said in err.strip().splitlines()[-1] and "Traceback" not in err
    out = tmp_path / "bad"
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2 and consistent(out)
    assert same_lora(out, tmp_path / "good")
    assert sorted(p.name for p in (out / "loras").iterdir()) == ["step_000001", "step_000002"]
    assert all(torch.isfinite(v).all() for p in (out / "loras").iterdir()
               for v in load_file(p / "pytorch_lora_weights.safetensors").values())
    assert [m["step"] for m in metrics_of(out)] == [1, 2]


KILL_AT = """
import os, shutil, signal, sys
sys.path.insert(0, {repo!r})
import drpo
calls, real_replace, real_copy = [0], os.replace, shutil.copyfile

def killing(real):
    def call(*a, **k):
        calls[0] += 1
        if calls[0] == {at}:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    return call

os.replace, shutil.copyfile = killing(real_replace), killing(real_copy)
sys.exit(drpo.main({argv!r}))
"""


def test_kill_9_anywhere_in_a_save_then_resume_gives_the_uninterrupted_run(tiny, tmp_path):
    """kill -9 at points all through the saves (one at a time, a bounded loop), then --resume: the LoRA and metrics
    equal the uninterrupted run's, bitwise, the LoRA is the checkpoint's, and nothing a save left remains."""
    argv = ["--model", tiny, "--reward", "brightness", "--candidates", "4", "--n-pos", "1", "--n-neg", "1",
            "--grad-accum", "1", "--lr", "1e-3", "--seed", "0", "--eval-every", "0", "--max-steps", "3",
            "--save-every", "1", "--save-lora-every", "2", "--sample-every", "0"]
    assert drpo.main([*argv, "--output-dir", str(tmp_path / "full")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    # kill points, counted over every os.replace and copyfile of the run: 1 config.json; 4 the first save's LoRA
    # renamed, no checkpoint yet; 9 update 2's snapshot; 12 the second save copying the checkpoint aside; 14 its LoRA
    # and card renamed, not the checkpoint; 16 its checkpoint renamed; 24 the last save's LoRA renamed
    for at in (1, 4, 9, 12, 14, 16, 24):
        out = tmp_path / f"k{at}"
        code = subprocess.run([sys.executable, "-c", KILL_AT.format(repo=str(Path(__file__).parent), at=at,
                                                                    argv=[*argv, "--output-dir", str(out)])],
                              env=env, capture_output=True, timeout=300).returncode
        assert code == -signal.SIGKILL, at
        if (out / "checkpoint.pt").exists():  # whatever the point, the checkpoint there is whole and finite
            assert all(torch.isfinite(v).all() for v in torch.load(out / "checkpoint.pt", weights_only=True)[
                "lora"].values())
        done = drpo.main([*argv, "--output-dir", str(out), "--resume", "--overwrite"])
        assert done == 0, at
        assert same_lora(out, tmp_path / "full") and consistent(out)
        assert metrics_of(out) == metrics_of(tmp_path / "full"), at
        assert not [*out.glob(".saving*"), *out.glob("*.tmp"), *out.glob("loras/.*")], at
        assert sorted(p.name for p in (out / "loras").iterdir()) == ["step_000002", "step_000003"]


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs: a real full disk (skipped where mounting needs a root this machine does not give)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_real_full_disk_loses_nothing_and_resume_continues_exactly(tiny, tmp_path, small_disk, capsys):
    argv = ["--max-steps", "4", "--save-every", "1", "--sample-every", "0"]
    assert run(tiny, tmp_path / "full", *argv) == 0
    out = small_disk / "run"
    assert run(tiny, out, *argv[:-6], "--max-steps", "1", "--save-every", "1", "--sample-every", "0") == 0
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * (free - 400_000))  # room for the LoRA resume rewrites, not for a checkpoint
    capsys.readouterr()
    assert run(tiny, out, *argv, "--resume") == 2
    err = capsys.readouterr().err
    assert "the disk is full: update 2 could not be saved" in err and "Traceback" not in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1 and consistent(out)
    filler.unlink()
    assert run(tiny, out, *argv, "--resume") == 0
    assert same_lora(out, tmp_path / "full") and metrics_of(out) == metrics_of(tmp_path / "full")
    assert not list(out.glob(".saving*"))


def none_reward(images, prompts):
    return None


def dict_reward(images, prompts):
    return {"score": 1.0}


def text_reward(images, prompts):
    return ["good"] * len(images)


def huge_reward(images, prompts):
    return [1e300 * (i + 1) for i in range(len(images))]


def tensor_features(latents, noise, cond):
    return latents.flatten(1)[:, None]


def empty_features(latents, noise, cond):
    return {}


def detached_features(latents, noise, cond):
    return {"x": latents.detach().flatten(2).transpose(1, 2)}


def collapsed_features(latents, noise, cond):
    return {"x": latents.flatten(2).transpose(1, 2).mean(0, keepdim=True)}


@pytest.mark.parametrize("flags,said", [
    (["--reward", "test_drpo:none_reward"], "--reward test_drpo:none_reward returned NoneType; a reward returns one "
                                            "float per image"),
    (["--reward", "test_drpo:dict_reward"], "--reward test_drpo:dict_reward returned dict"),
    (["--reward", "test_drpo:text_reward"], "--reward test_drpo:text_reward returned list"),
    (["--reward", "test_drpo:huge_reward"], "--reward test_drpo:huge_reward returned scores up to 8e+300, beyond "
                                            "float32; rescale them"),
    (["--features", "test_drpo:tensor_features"], "--features test_drpo:tensor_features returned a Tensor; a feature "
                                                  "map returns {key: (n, T, D) tensor}"),
    (["--features", "test_drpo:empty_features"], "--features test_drpo:empty_features returned an empty dict"),
    (["--features", "test_drpo:detached_features"], "returned features without the latents' gradient (detached?)"),
    (["--features", "test_drpo:collapsed_features"], "returned 'x' of shape (1, 256, 4) for 8 latents"),
])
def test_the_users_reward_and_feature_map_are_held_to_their_contract(tiny, tmp_path, capsys, monkeypatch, flags,
                                                                      said):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    flags = flags if flags[0] == "--features" else ["--features", "latent", *flags]
    argv = ["--model", tiny, "--candidates", "8", "--n-pos", "3", "--n-neg", "3", "--grad-accum", "1", "--eval-every",
            "0", "--max-steps", "1", "--output-dir", str(tmp_path / "o"), *flags]
    code, err = refused(drpo.main, [*argv, *([] if "--reward" in flags else ["--reward", "brightness"])], capsys)
    assert code == 2 and said in err.strip().splitlines()[-1] and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_every_weight_of_a_reward_spec_counts_or_is_refused(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    parsed = lambda spec: [(n, w) for n, _, w in drpo.parse_reward_spec(spec)]
    assert parsed("brightness:-1") == [("brightness", -1.0)]
    assert parsed("http://host:8100,brightness:.5") == [("http://host:8100", 1.0), ("brightness", 0.5)]
    assert parsed("test_drpo:nan,test_drpo:inf") == [("test_drpo:nan", 1.0), ("test_drpo:inf", 1.0)]  # names
    from PIL import Image

    images = [Image.new("RGB", (8, 8), (v, v, v)) for v in (10, 200, 90)]
    plain = drpo.load_reward("brightness")(images, ["a"] * 3)
    assert torch.equal(drpo.load_reward("brightness:-1")(images, ["a"] * 3), -plain)  # ranks the other way
    assert torch.equal(drpo.load_reward("brightness:1")(images, ["a"] * 3), plain)  # 1: bitwise the plain scores


def nan_module_reward(images, prompts):
    return drpo.brightness_reward(images, prompts)


nan = inf = nan_module_reward  # functions named nan and inf are names, not weights


# ---------------------------------------------------------------- offline pairs -----------

def pairs_check():
    spec = importlib.util.spec_from_file_location("pairs_check", Path(__file__).parent / "benchmarks" / "pairs_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pairs_pull_the_samples_toward_chosen_and_away_from_rejected_images(tiny, tmp_path):
    """Trained on (bright chosen, dark rejected) pairs and on the same pairs swapped, the held-out
    one-step latents of the plain diffusers pipeline end further along u = mean chosen latent -
    mean rejected latent with the pairs than with the swapped pairs."""
    pc = pairs_check()
    pairs, swapped = pc.write_texture_pairs(tmp_path / "data")
    u = pc.direction(tiny, pairs)
    along = {}
    for name, file in (("pairs", pairs), ("swapped", swapped)):
        assert drpo.main(["--model", tiny, "--pairs", str(file), "--max-steps", "25", "--lr", "1e-3",
                          "--grad-accum", "1", "--candidates", "8", "--n-pos", "2", "--n-neg", "2", "--seed", "0",
                          "--sample-every", "0", "--output-dir", str(tmp_path / name)]) == 0
        along[name] = pc.heldout_along(tiny, u, tmp_path / name, seeds=range(2))[0]
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 25 and "reward_mean" not in rows[0]
        assert all(math.isfinite(r["dist_pos"]) and math.isfinite(r["dist_neg"]) for r in rows)
    base, spread = pc.heldout_along(tiny, u, seeds=range(2))
    assert along["pairs"] - along["swapped"] > 0.02 * spread, (along, base, spread)


def write_image(path, value=128, size=(40, 30)):
    from PIL import Image

    Image.new("RGB", size, (value,) * 3).save(path)


@pytest.mark.parametrize("arch", ["sd", "sana", *FLOW_FAMILIES])
def test_pairs_images_are_resized_center_cropped_and_encoded_once(request, tmp_path, monkeypatch, arch):
    """Each family encodes with its own VAE: SD's KL latent mean, SANA-Sprint's DC-AE latent, FLUX's and SD3's KL
    latent mean less the shift factor (what their stock img2img pipelines do before scaling)."""
    import numpy as np
    from diffusers import AutoencoderDC, AutoencoderKL

    tiny, flags = family(request, arch)
    # a wide image, black at both ends and white in the middle: the center crop keeps only white
    arr = np.zeros((64, 192, 3), dtype=np.uint8)
    arr[:, 44:148] = 255  # a little beyond the crop (columns 48..143), so no resampled edge enters it
    from PIL import Image
    Image.fromarray(arr).save(tmp_path / "wide.png")
    pairs = drpo.beside("rewards.pairs")
    got = pairs.encode_images(drpo.load_generator(tiny), [tmp_path / "wide.png"], 128)
    vae = (AutoencoderDC if arch == "sana" else AutoencoderKL).from_pretrained(Path(tiny) / "vae")
    white = torch.ones(1, 3, 128, 128).contiguous(memory_format=torch.channels_last)  # as the processor's, from PIL
    with torch.no_grad():
        out = vae.encode(white)
        want = (out.latent if arch == "sana" else out.latent_dist.mean - (vae.config.shift_factor or 0)) * \
            vae.config.scaling_factor
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    # each image is encoded once per run, not once per step
    calls = []
    encode = pairs.encode_images
    monkeypatch.setattr(pairs, "encode_images", lambda model, paths, side: calls.append(list(paths)) or
                        encode(model, paths, side))
    for i in range(2):
        write_image(tmp_path / f"c{i}.png", 220)
        write_image(tmp_path / f"r{i}.png", 30)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"p{i % 2}", "chosen": f"c{i}.png",
                                                          "rejected": f"r{i}.png"}) + "\n" for i in range(2)))
    assert drpo.main(["--model", tiny, "--pairs", str(tmp_path / "p.jsonl"), "--max-steps", "3", "--candidates", "4",
                      "--n-pos", "1", "--n-neg", "1", "--grad-accum", "2", "--sample-every", "0",
                      "--output-dir", str(tmp_path / "o"), *flags]) == 0
    assert len(calls) == 1 and len(calls[0]) == 4
    if arch == "sd":  # the pairs enter as final images: the same file trains a two-step sampler (FLUX, SD3: four)
        assert drpo.main(["--model", tiny, "--pairs", str(tmp_path / "p.jsonl"), "--max-steps", "2", "--candidates",
                          "4", "--n-pos", "1", "--n-neg", "1", "--sample-every", "0", "--inference-steps", "2",
                          "--output-dir", str(tmp_path / "two")]) == 0
        assert len(metrics_of(tmp_path / "two")) == 2


@pytest.mark.parametrize("lines,message", [
    (None, "no such file"),
    ([], "is empty"),
    (["{not json"], "line 1 is not JSON"),
    (['{"prompt": "a", "chosen": "c.png", "rejected": "r.png"}', '{"prompt": "a", "chosen": "c.png"}'],
     "line 2 lacks rejected"),
    (['{"prompt": "a", "chosen": "missing.png", "rejected": "r.png"}'], "line 1: chosen image"),
    (['{"prompt": "a", "chosen": "c.png", "rejected": "broken.png"}'], "cannot be read as an image"),
    (['{"prompt": "a", "chosen": "c.png", "rejected": "r.png"}', '{"prompt": "b", "chosen": "c.png", "rejected": "c.png"}'],
     "line 2: chosen and rejected are the same image"),
])
def test_bad_pairs_files_are_refused_before_training_naming_file_and_line(tiny, tmp_path, capsys, monkeypatch,
                                                                          lines, message):
    write_image(tmp_path / "c.png", 220)
    write_image(tmp_path / "r.png", 30)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    if lines is not None:
        (tmp_path / "p.jsonl").write_text("".join(line + "\n" for line in lines))
    monkeypatch.setattr(drpo, "load_generator", lambda *a, **k: pytest.fail("loaded a model before checking --pairs"))
    argv = ["--model", tiny, "--pairs", str(tmp_path / "p.jsonl"), "--output-dir", str(tmp_path / "o"),
            "--candidates", "4", "--n-pos", "1", "--n-neg", "1", "--max-steps", "1"]
    assert drpo.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "p.jsonl" in err
    assert not (tmp_path / "o").exists()


def test_pairs_exclude_reward_and_prompts(tiny, tmp_path, capsys):
    write_image(tmp_path / "c.png", 220)
    write_image(tmp_path / "r.png", 30)
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "chosen": "c.png", "rejected": "r.png"}\n')
    argv = ["--model", tiny, "--pairs", str(tmp_path / "p.jsonl"), "--output-dir", str(tmp_path / "o")]
    assert drpo.main(argv + ["--reward", "brightness"]) == 2
    assert "--pairs replaces --reward" in capsys.readouterr().err


# ---------------------------------------------------------------- rewards -----------------

HPS = FIXTURES / "hpsv3_tiny"


def test_hpsv3_port_reproduces_the_published_scores():
    from PIL import Image

    exp = json.loads((HPS / "expected.json").read_text())
    assert hpsv3.INSTRUCTION == exp["instruction"]
    assert hpsv3.SUFFIX == exp["prompt_with_special_token"]
    reward = drpo.load_reward("hpsv3", "cpu", batch_size=4, hpsv3_ckpt=HPS / "HPSv3.safetensors",
                              hpsv3_base=HPS / "base")
    images = [Image.open(HPS / p) for p in exp["images"]]
    batch = reward(images, exp["prompts"])  # right-padded batch of prompts of different lengths
    single = torch.cat([reward([im], [p]) for im, p in zip(images, exp["prompts"])])
    torch.testing.assert_close(batch, torch.tensor([s[0] for s in exp["scores_batch"]]), rtol=0, atol=2e-5)
    torch.testing.assert_close(single, torch.tensor([s[0] for s in exp["scores_single"]]), rtol=0, atol=2e-5)
    # the fixture can tell a port with Qwen2-VL's multimodal rotary positions apart
    wrong = torch.tensor([s[0] for s in exp["scores_if_multimodal_rope"]])
    assert (batch - wrong).abs().max() > 1e-2


def test_hpsv3_reads_the_score_at_the_reward_token(monkeypatch):
    from PIL import Image

    exp = json.loads((HPS / "expected.json").read_text())
    reward = drpo.load_reward("hpsv3", "cpu", hpsv3_ckpt=HPS / "HPSv3.safetensors", hpsv3_base=HPS / "base")
    images = [Image.open(HPS / p) for p in exp["images"]][:2]
    before = reward(images, exp["prompts"][:2])
    # text after <|Reward|> cannot reach it through causal attention: the score must not move ...
    monkeypatch.setattr(hpsv3, "SUFFIX", hpsv3.SUFFIX + "and some more words after the end\n")
    torch.testing.assert_close(reward(images, exp["prompts"][:2]), before, rtol=0, atol=1e-5)
    # ... while text before it does
    assert (reward(images, [p + " at night" for p in exp["prompts"][:2]]) - before).abs().max() > 1e-4


def test_download_command_in_messages_is_installed_with_huggingface_hub():
    from importlib.metadata import entry_points

    scripts = {e.name for e in entry_points(group="console_scripts") if e.dist.name in ("huggingface_hub",
                                                                                         "huggingface-hub")}
    assert "hf" in scripts  # `huggingface-cli` is gone from huggingface_hub >= 1.0


def test_hpsv3_without_weights_says_what_to_download(tiny, tmp_path, capsys):
    argv = ["--model", tiny, "--reward", "hpsv3", "--output-dir", str(tmp_path / "o"), "--max-steps", "1",
            "--candidates", "8", "--n-pos", "3", "--n-neg", "3"]
    assert drpo.main(argv) == 2
    err = capsys.readouterr().err
    assert "hf download MizzenAI/HPSv3" in err and "--hpsv3-ckpt" in err


def scores_of_length_two(images, prompts):
    return [1.0, 2.0]


def scores_with_nan(images, prompts):
    return [float("nan")] * len(images)


def test_reward_specs_custom_functions_and_ensembles(monkeypatch):
    from PIL import Image

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    images = [Image.new("RGB", (16, 16), (v, v, v)) for v in (0, 64, 128, 255)]
    prompts = ["p"] * 4
    bright = drpo.load_reward("brightness")(images, prompts)
    torch.testing.assert_close(bright, torch.tensor([0, 64, 128, 255]) / 255)
    custom = drpo.load_reward("drpo:brightness_reward")(images, prompts)
    torch.testing.assert_close(custom, bright)
    jpeg = drpo.load_reward("jpeg")(images, prompts)
    assert (jpeg < 0).all()
    # ensemble: members z-scored over the call, then weighted
    mix = drpo.load_reward("brightness:2,drpo:jpeg_reward", batch_size=3)(images, prompts)
    z = lambda s: (s - s.mean()) / s.std(unbiased=False)
    torch.testing.assert_close(mix, 2 * z(bright) + z(jpeg))
    r1, r2 = drpo.load_reward("random")(images, prompts), drpo.load_reward("random")(images, prompts)
    assert torch.equal(r1, r2) and len(set(r1.tolist())) == 4 and ((r1 >= 0) & (r1 < 1)).all()
    with pytest.raises(ValueError, match="returned 2 scores for 4 images"):
        drpo.load_reward("test_drpo:scores_of_length_two", batch_size=8)(images, prompts)
    with pytest.raises(ValueError, match="NaN"):
        drpo.load_reward("test_drpo:scores_with_nan")(images, prompts)
    with pytest.raises(ValueError, match="unknown reward"):
        drpo.load_reward("brightness,nosuch")


@pytest.fixture(scope="module")
def tiny_clip(tiny, tmp_path_factory):
    """A random CLIP model in a folder laid out like a hub CLIP repo (model, tokenizer, processor)."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    d = tmp_path_factory.mktemp("clip")
    tok = CLIPTokenizer.from_pretrained(Path(tiny) / "tokenizer")
    torch.manual_seed(0)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16,
                         logit_scale_init_value=math.log(50))).save_pretrained(d)
    tok.save_pretrained(d)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d


def clip_inputs():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
              ((40, 40), (64, 48), (32, 80), (50, 50))]
    prompts = ["a cat", "a red house on a hill at dawn, oil painting", "", "two dogs"]
    return images, prompts


def test_pickscore_and_clip_score_equal_clip_logits_and_do_not_depend_on_batching(tiny_clip):
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    images, prompts = clip_inputs()
    # independent: CLIPModel's own forward, one image-prompt pair at a time (no padding at all)
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tok, proc = CLIPTokenizer.from_pretrained(tiny_clip), CLIPImageProcessorPil.from_pretrained(tiny_clip)
    with torch.no_grad():
        logits = torch.stack([model(**tok([p], return_tensors="pt"), **proc(images=[im], return_tensors="pt"))
                              .logits_per_image[0, 0] for im, p in zip(images, prompts)])
    pick = clip.clip_reward(tiny_clip, scale=None)  # PickScore: the model's own logit scale (50 here)
    cos100 = clip.clip_reward(tiny_clip)  # CLIP score: 100 * cos
    with torch.no_grad():
        torch.testing.assert_close(pick(images, prompts), logits, rtol=0, atol=1e-4)
        torch.testing.assert_close(cos100(images, prompts), logits * 2, rtol=0, atol=2e-4)
        one_by_one = torch.cat([pick([im], [p]) for im, p in zip(images, prompts)])
        torch.testing.assert_close(pick(images, prompts), one_by_one, rtol=0, atol=1e-5)
    assert logits.std() > 0.1  # the images and prompts are told apart


def test_aesthetic_head_reads_unit_norm_clip_image_embeddings(tiny_clip, tmp_path):
    from transformers import CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(1)
    sizes = [16, 1024, 128, 64, 16, 1]  # the predictor's layer widths, on a 16-d embedding
    head = {f"layers.{i}.{p}": torch.randn(o, n) / n ** 0.5 if p == "weight" else torch.randn(o) * 0.1
            for i, n, o in zip((0, 2, 4, 6, 7), sizes, sizes[1:]) for p in ("weight", "bias")}
    torch.save(head, tmp_path / "aesthetic-model.pth")
    images, prompts = clip_inputs()
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(tiny_clip)(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        e = model.get_image_features(pixel_values=pixels).pooler_output
        x = e / e.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):  # linear layers only, no activations
            x = x @ head[f"layers.{i}.weight"].T + head[f"layers.{i}.bias"]
        reward = clip.aesthetic_reward(tiny_clip, tmp_path / "aesthetic-model.pth")
        torch.testing.assert_close(reward(images, prompts), x[:, 0], rtol=0, atol=1e-5)
        torch.testing.assert_close(reward(images, ["x"] * 4), x[:, 0], rtol=0, atol=1e-5)  # ignores the prompt
        torch.testing.assert_close(torch.cat([reward([im], [p]) for im, p in zip(images, prompts)]), x[:, 0],
                                   rtol=0, atol=1e-5)
        # an embedding 3x longer scores the same: the head sees the direction only
        model.visual_projection.weight.mul_(3)
        shutil.copytree(tiny_clip, tmp_path / "clip3")
        model.save_pretrained(tmp_path / "clip3")
        scaled = clip.aesthetic_reward(tmp_path / "clip3", tmp_path / "aesthetic-model.pth")(images, prompts)
        torch.testing.assert_close(scaled, x[:, 0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,repo", [("pickscore", "yuvalkirstain/PickScore_v1"),
                                       ("clip", "openai/clip-vit-large-patch14"),
                                       ("aesthetic", "openai/clip-vit-large-patch14")])
def test_clip_rewards_without_weights_say_what_to_download(name, repo):
    with pytest.raises(OSError, match=f"hf download {repo}"):
        drpo.load_reward(name)


IR = FIXTURES / "imagereward_tiny"


def imagereward_inputs():
    from PIL import Image

    exp = json.loads((IR / "expected.json").read_text())
    return exp, [Image.open(IR / p) for p in exp["images"]]


def test_imagereward_port_reproduces_the_published_scores():
    from transformers import BertTokenizer

    exp, images = imagereward_inputs()
    reward = drpo.load_reward("imagereward", "cpu", batch_size=4, imagereward_ckpt=IR / "ImageReward_tiny.pt",
                              imagereward_config=IR / "med_config.json", imagereward_tokenizer=IR / "tokenizer")
    expected = torch.tensor(exp["scores"])  # [prompt][image], published ImageReward.score one pair at a time
    prompts = [p for p in exp["prompts"] for _ in images]
    batched = reward(images * len(exp["prompts"]), prompts).view_as(expected)  # batches of 4 mix prompts
    single = torch.tensor([[reward([im], [p]).item() for im in images] for p in exp["prompts"]])
    torch.testing.assert_close(batched, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(single, expected, rtol=0, atol=1e-5)
    # the published preprocessing (torchvision's rounded centre crop) and tokenization (35 tokens, [CLS] first)
    ref = load_file(IR / "intermediates.safetensors")
    torch.testing.assert_close(imagereward.preprocess(images), ref["pixel_values"], rtol=0, atol=1e-6)
    tok = BertTokenizer.from_pretrained(str(IR / "tokenizer"))
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    ids = tok(exp["prompts"], padding="max_length", truncation=True, max_length=35).input_ids
    assert ids == exp["input_ids"]
    # the fixture tells apart the two mistakes a port is likely to make
    for wrong in ("scores_if_enc_token_first", "scores_if_square_resize_no_crop"):
        assert (batched - torch.tensor(exp[wrong])).abs().max() > 1e-2


def test_imagereward_loads_strictly_and_names_the_keys_it_cannot_map(tmp_path):
    state = torch.load(IR / "ImageReward_tiny.pt", weights_only=True)
    paths = dict(config=IR / "med_config.json", tokenizer=IR / "tokenizer")
    extra = {**state, "blip.itm_head.weight": torch.zeros(2, 32)}
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"unexpected \['blip.itm_head.weight'\]"):
        imagereward.imagereward_reward("cpu", tmp_path / "extra.pt", **paths)
    short = {k: v for k, v in state.items() if k != "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"}
    torch.save(short, tmp_path / "short.pt")
    with pytest.raises(ValueError, match=r"missing \['text: encoder.layer.1.crossattention.self.key.weight'\]"):
        imagereward.imagereward_reward("cpu", tmp_path / "short.pt", **paths)
    with pytest.raises(OSError, match="hf download THUDM/ImageReward"):
        imagereward.imagereward_reward("cpu", tmp_path / "nosuch.pt", **paths)


def test_damaged_reward_weights_are_named_with_the_download_command(tmp_path):
    (tmp_path / "HPSv3.safetensors").write_bytes((HPS / "HPSv3.safetensors").read_bytes()[:500])  # a cut download
    with pytest.raises(ValueError, match="HPSv3.safetensors is damaged or not a safetensors file .*hf download "
                                         "MizzenAI/HPSv3"):
        hpsv3.hpsv3_reward("cpu", tmp_path / "HPSv3.safetensors", HPS / "base")
    (tmp_path / "ImageReward.pt").write_bytes((IR / "ImageReward_tiny.pt").read_bytes()[:500])
    with pytest.raises(ValueError, match="ImageReward.pt is damaged or not ImageReward's checkpoint .*hf download "
                                         "THUDM/ImageReward"):
        imagereward.imagereward_reward("cpu", tmp_path / "ImageReward.pt", config=IR / "med_config.json",
                                       tokenizer=IR / "tokenizer")


def test_each_reward_port_runs_alone_without_drpo(tiny_clip, tmp_path):
    """rewards/*.py are copied into other projects: each imports and scores in a fresh interpreter
    with drpo never imported."""
    root = Path(__file__).resolve().parent
    script = f"""
import sys, json, torch
from pathlib import Path
from PIL import Image
sys.path.insert(0, {str(root)!r})
import rewards.{{name}} as port
F = Path({str(FIXTURES)!r})
im = [Image.new("RGB", (48, 40), (200, 30, 30)), Image.new("RGB", (40, 64), (20, 90, 200))]
scores = {{call}}(im, ["a red car", "a blue bus"])
assert len(scores) == 2 and all(float(s) == float(s) for s in scores), scores
assert "drpo" not in sys.modules, "imported drpo"
print("ok", [round(float(s), 4) for s in scores])
"""
    det = tmp_path / "det"
    tiny_detector().save_pretrained(det)
    meta = tmp_path / "meta.jsonl"
    meta.write_text("".join(json.dumps(m) + "\n" for m in (
        {"tag": "colors", "prompt": "a red car", "include": [{"class": "car", "count": 1, "color": "red"}]},
        {"tag": "single_object", "prompt": "a blue bus", "include": [{"class": "bus", "count": 1}]})))
    calls = {
        "hpsv3": "port.hpsv3_reward('cpu', F / 'hpsv3_tiny' / 'HPSv3.safetensors', F / 'hpsv3_tiny' / 'base')",
        "clip": f"port.clip_reward({str(tiny_clip)!r})",
        "imagereward": "port.imagereward_reward('cpu', F / 'imagereward_tiny' / 'ImageReward_tiny.pt', "
                       "F / 'imagereward_tiny' / 'med_config.json', F / 'imagereward_tiny' / 'tokenizer')",
        "geneval": f"port.geneval_reward({str(meta)!r}, 'cpu', {str(det)!r}, {str(tiny_clip)!r})",
    }
    # judge: its own test below; serve serves drpo's rewards, so it imports drpo; the clients of served rewards,
    # vlm and remote, need a server to score (tested against real ones below), and pairs reads --pairs files
    # (tested with the pairs runs): here they import without drpo
    clients = ["vlm", "remote", "pairs"]
    ports = {p.stem for p in (root / "rewards").glob("*.py")} - {"__init__", "judge", "serve", *clients}
    assert sorted(calls) == sorted(ports)
    done = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(root)!r}); import rewards.vlm, "
                           f"rewards.remote, rewards.pairs; assert 'drpo' not in sys.modules, 'imported drpo'"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    for name, call in calls.items():
        done = subprocess.run([sys.executable, "-c", script.replace("{name}", name).replace("{call}", call)],
                              capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0 and done.stdout.startswith("ok"), (name, done.stderr[-2000:])


def test_each_feature_port_runs_alone_without_drpo(tmp_path):
    """features/*.py are copied like the reward ports: each runs in a fresh interpreter without drpo.
    The MAE map's spatial mean is the published `layer4_mean`; DINOv2 gives its CLS token and a patch map."""
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             patch_size=14, image_size=224)).save_pretrained(tmp_path / "dino")
    root = Path(__file__).resolve().parent
    script = f"""
import sys, torch
from safetensors.torch import load_file
sys.path.insert(0, {str(root)!r})
from features.mae import mae_encoder
from features.dinov2 import dinov2_encoder
mae = {str(FIXTURES / "mae_tiny")!r}
fmap = mae_encoder(mae + "/mae_latent_tiny.pth")(load_file(mae + "/latents.safetensors")["latents"].double())
want = load_file(mae + "/expected.safetensors")["layer4_mean"].double()[:, 0]
torch.testing.assert_close(fmap.mean((2, 3)), want, rtol=1e-5, atol=1e-5)
cls, grid = dinov2_encoder({str(tmp_path / "dino")!r})(torch.rand(2, 3, 40, 48))
assert cls.shape == (2, 1, 32) and grid.shape == (2, 32, 16, 16), (cls.shape, grid.shape)
assert "drpo" not in sys.modules, "imported drpo"
print("ok")
"""
    assert sorted(p.stem for p in (root / "features").glob("*.py") if p.stem != "__init__") == ["dinov2", "mae"]
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]


def test_generator_files_are_self_contained(tiny_flux):
    """generators/*.py are copied into other trainers: each imports without drpo, and one builds its fields."""
    root = Path(__file__).resolve().parent
    names = sorted(p.stem for p in (root / "generators").glob("*.py") if p.stem != "__init__")
    assert names == ["flux", "sana", "sd3"]
    script = f"""
import sys
sys.path.insert(0, {str(root)!r})
import importlib
from diffusers import FluxPipeline
mods = [importlib.import_module("generators." + n) for n in {names!r}]
gen = mods[0].generator(FluxPipeline.from_pretrained({tiny_flux!r}), 4)
assert len(gen.recipe) == 4 and gen.net.config.in_channels == 16
assert "drpo" not in sys.modules, "imported drpo"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]


def test_no_reference_to_a_file_outside_the_repository():
    """Comments and docs cite the paper or the repository's own files: every .md named exists here."""
    root = Path(__file__).resolve().parent
    files = [root / "drpo.py", root / "eval.py", root / "README.md", *root.glob("rewards/*.py"), *root.glob("features/*.py"),
             *root.glob("generators/*.py"),
             *root.glob("benchmarks/*.py"), *root.glob("docs/*.md"), *root.glob("examples/*.py")]
    for f in files:
        text = f.read_text()
        # a path to a .md file, a capitalized one (README.md), or a markdown link target; not outputs like table.md
        names = re.findall(r"(?:[\w.-]+/)+[\w.-]+\.md\b|\b[A-Z][\w-]*\.md\b", text)
        for name in names + re.findall(r"\]\(([^)#:]+\.md)[)#]", text):
            assert (root / name).is_file() or (f.parent / name).is_file(), f"{f.name} names {name}"
        assert not re.search(r"\.\./shared|DESIGN\.md", text), f.name  # the brief beside the checkout


# ---------------------------------------------------------------- GenEval -----------------

def tiny_detector(confident="person"):
    """A random tiny Mask2Former whose every query names one class with probability ~1, so that
    its masks become detections with real scores (mask score x ~1)."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    torch.manual_seed(0)
    swin = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                      out_features=["stage1", "stage2", "stage3", "stage4"])
    net = Mask2FormerForUniversalSegmentation(Mask2FormerConfig(
        backbone_config=swin, hidden_dim=32, num_queries=10, num_labels=80, feature_size=32, mask_feature_size=32,
        encoder_layers=1, decoder_layers=2, dim_feedforward=64, num_attention_heads=2, encoder_feedforward_dim=64))
    with torch.no_grad():
        net.class_predictor.bias[geneval.CLASSES.index(confident)] = 50.0
    return net.eval()


def det(label, score, box=(0, 0, 10, 10), color=None):
    return {"label": label, "score": score, "box": list(box), "color": color}


@pytest.mark.parametrize("meta,dets,correct,reason", [
    # single object: a score must exceed 0.3; exactly 0.3 is not kept
    ({"tag": "single_object", "include": [{"class": "cat", "count": 1}]}, [det("cat", 0.31)], True, ""),
    ({"tag": "single_object", "include": [{"class": "cat", "count": 1}]}, [det("cat", 0.3), det("dog", 0.9)], False,
     "expected cat>=1, found 0"),
    # two objects: both needed
    ({"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]},
     [det("cat", 0.8), det("dog", 0.5)], True, ""),
    ({"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]},
     [det("cat", 0.8)], False, "expected dog>=1, found 0"),
    # counting: exactly N confident (> 0.9) objects; one too many fails the exclude clause
    ({"tag": "counting", "include": [{"class": "cat", "count": 3}], "exclude": [{"class": "cat", "count": 4}]},
     [det("cat", 0.95)] * 3 + [det("cat", 0.9)], True, ""),
    ({"tag": "counting", "include": [{"class": "cat", "count": 3}], "exclude": [{"class": "cat", "count": 4}]},
     [det("cat", 0.95)] * 4, False, "expected cat<4, found 4"),
    ({"tag": "counting", "include": [{"class": "cat", "count": 3}], "exclude": [{"class": "cat", "count": 4}]},
     [det("cat", 0.95)] * 2 + [det("cat", 0.5)], False, "expected cat>=3, found 2"),
    # the cap: at most 16 kept per class, so 20 confident cats pass "fewer than 17"
    ({"tag": "counting", "include": [{"class": "cat", "count": 16}], "exclude": [{"class": "cat", "count": 17}]},
     [det("cat", 0.95)] * 20, True, ""),
    # colours: the first `count` kept objects (highest scores) must have the colour
    ({"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]},
     [det("car", 0.9, color="red")], True, ""),
    ({"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]},
     [det("car", 0.6, color="red"), det("car", 0.9, color="blue")], False,
     "expected red car>=1, found 0 red; and 1 blue"),
    ({"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                       {"class": "bus", "count": 1, "color": "green"}]},
     [det("car", 0.9, color="red"), det("bus", 0.9, color="yellow")], False,
     "expected green bus>=1, found 0 green; and 1 yellow"),
    # position: relative to the earlier clause's objects; a wrong side; no target
    ({"tag": "position", "include": [{"class": "dog", "count": 1},
                                     {"class": "cat", "count": 1, "position": ["left of", 0]}]},
     [det("dog", 0.9, (100, 0, 140, 40)), det("cat", 0.9, (0, 0, 40, 40))], True, ""),
    ({"tag": "position", "include": [{"class": "dog", "count": 1},
                                     {"class": "cat", "count": 1, "position": ["left of", 0]}]},
     [det("dog", 0.9, (0, 0, 40, 40)), det("cat", 0.9, (100, 0, 140, 40))], False,
     "expected cat left of target, found right of target"),
    ({"tag": "position", "include": [{"class": "dog", "count": 1},
                                     {"class": "cat", "count": 1, "position": ["above", 0]}]},
     [det("cat", 0.9, (0, 0, 40, 40))], False, "expected dog>=1, found 0\nno target for cat to be above"),
    # boxes that overlap almost entirely stand in no relation
    ({"tag": "position", "include": [{"class": "dog", "count": 1},
                                     {"class": "cat", "count": 1, "position": ["below", 0]}]},
     [det("dog", 0.9, (0, 0, 40, 40)), det("cat", 0.9, (2, 2, 42, 42))], False,
     "expected cat below target, found  target"),
])
def test_decide_gives_the_official_verdicts(meta, dets, correct, reason):
    assert geneval.decide({"prompt": "p", **meta}, dets) == (correct, reason)


def test_relative_position_follows_the_official_geometry():
    # centres 30 apart on x, sizes 20 + 20: offset shrinks by 0.1 * 40 = 4, still clearly left
    assert geneval.relative_position([0, 0, 20, 20], [30, 0, 50, 20]) == {"left of"}
    assert geneval.relative_position([0, 60, 20, 80], [0, 0, 20, 20]) == {"below"}  # y grows downward
    assert geneval.relative_position([0, 0, 20, 20], [30, 30, 50, 50]) == {"left of", "above"}  # diagonal: both
    assert geneval.relative_position([0, 0, 20, 20], [1, 1, 21, 21]) == set()  # within 10 % of the sizes


def test_geneval_grade_ranks_correct_over_partly_correct_over_wrong():
    meta = {"tag": "two_object", "prompt": "p", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
    correct = geneval.grade(meta, [det("cat", 0.35), det("dog", 0.35)])
    partly = geneval.grade(meta, [det("cat", 0.99), det("dog", 0.2)])
    wrong = geneval.grade(meta, [det("bird", 0.99)])
    assert correct > partly > wrong >= 0 and correct < 1
    assert geneval.decide(meta, [det("cat", 0.35), det("dog", 0.35)])[0]
    # among equally correct images, the more confident detections rank higher
    assert geneval.grade(meta, [det("cat", 0.9), det("dog", 0.9)]) > correct


def test_geneval_metadata_shapes_and_prompt_files(tmp_path):
    rows = [{"tag": "counting", "prompt": "a photo of three cats", "include": [{"class": "cat", "count": 3}],
             "exclude": [{"class": "cat", "count": 4}]},
            {"tag": "colors", "prompt": "a photo of a red car", "include": [{"class": "car", "count": 1, "color": "red"}]}]
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert drpo.read_prompts(tmp_path / "meta.jsonl") == ["a photo of three cats", "a photo of a red car"]
    assert geneval.read_metadata(tmp_path / "meta.jsonl") == rows
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="prompt"):
        drpo.read_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="needs prompt, tag and include"):
        geneval.read_metadata(tmp_path / "bad.jsonl")


GENEVAL_ROWS = [
    {"tag": "single_object", "prompt": "a photo of a person", "include": [{"class": "person", "count": 1}]},
    {"tag": "two_object", "prompt": "a photo of a person and a dog",
     "include": [{"class": "person", "count": 1}, {"class": "dog", "count": 1}]},
    {"tag": "colors", "prompt": "a photo of a red person", "include": [{"class": "person", "count": 1, "color": "red"}]},
]


def test_eval_geneval_runs_end_to_end_on_a_tiny_detector_and_clip(trained, tiny_clip, tmp_path, capsys):
    import csv

    import eval as ev

    tiny, lora = trained
    tiny_detector().save_pretrained(tmp_path / "det")
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GENEVAL_ROWS))
    out = tmp_path / "ge"
    assert ev.main(["--model", tiny, "--lora", str(lora), "--geneval", str(tmp_path / "meta.jsonl"), "--seeds", "2",
                    "--geneval-detector", str(tmp_path / "det"), "--geneval-clip", str(tiny_clip),
                    "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    rows = list(csv.DictReader(open(out / "geneval.csv")))
    assert len(rows) == 2 * 3 * 2  # models x prompts x seeds
    assert all((r["correct"] == "1") == (r["reason"] == "") for r in rows)
    assert any(r["correct"] == "1" for r in rows)  # the confident tiny detector finds persons
    assert all(r["correct"] == "0" and "expected dog>=1, found 0" in r["reason"] for r in rows
               if r["tag"] == "two_object")
    for label, tasks in res["geneval"].items():
        mine = [r for r in rows if r["model"] == label]
        for tag in ("single_object", "two_object", "colors"):
            got = [int(r["correct"]) for r in mine if r["tag"] == tag]
            assert tasks[tag] == pytest.approx(100 * sum(got) / len(got))
        assert tasks["overall"] == pytest.approx(sum(tasks[t] for t in ("single_object", "two_object", "colors")) / 3)
        assert f"| {label} |" in printed
    assert res["scores"]["geneval"]["brightlora"]["diff_vs_base"] == pytest.approx(
        (sum(int(r["correct"]) for r in rows if r["model"] == "brightlora")
         - sum(int(r["correct"]) for r in rows if r["model"] == "base")) / 6)
    # the verdicts are those of decide on the detector's output for exactly these images
    model = drpo.load_generator(tiny)
    images = ev.sample_images(model, [GENEVAL_ROWS[0]["prompt"]], torch.cat(
        [torch.randn((1, *drpo.latent_shape(model)), generator=torch.Generator().manual_seed(s)) for s in (0, 1)]))
    detect = geneval.load_detector("cpu", tmp_path / "det", tiny_clip)
    verdicts = [geneval.decide(GENEVAL_ROWS[0], d) for d in detect(images, [GENEVAL_ROWS[0]] * 2)]
    assert [(r["correct"] == "1", r["reason"]) for r in rows if r["model"] == "base" and r["prompt_index"] == "0"] \
        == verdicts


def test_geneval_reward_trains_the_tiny_model(tiny, tiny_clip, tmp_path, capsys):
    tiny_detector().save_pretrained(tmp_path / "det")
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GENEVAL_ROWS))
    out = tmp_path / "run"
    assert run(tiny, out, "--max-steps", "2", "--sample-every", "0", "--prompts", str(tmp_path / "meta.jsonl"),
               "--geneval-detector", str(tmp_path / "det"), "--geneval-clip", str(tiny_clip), reward="geneval") == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 <= r["neg_mean"] <= r["pos_mean"] < 1 for r in rows)
    # without the metadata the reward is refused before anything loads
    assert run(tiny, tmp_path / "nometa", "--max-steps", "1", reward="geneval") == 2
    assert "--prompts evaluation_metadata.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("arch", FLOW_FAMILIES)
def test_geneval_trains_and_evaluates_a_four_step_flow_transformer(request, tiny_clip, tmp_path, arch):
    """GenEval end to end on FLUX and SD3 at 4 steps: the reward ranks the 4-step samples, and eval.py grades
    the run's LoRA at the run's steps and size (read from its config.json)."""
    import csv

    import eval as ev

    folder, flags = family(request, arch)
    tiny_detector().save_pretrained(tmp_path / "det")
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GENEVAL_ROWS))
    paths = ["--geneval-detector", str(tmp_path / "det"), "--geneval-clip", str(tiny_clip)]
    out = tmp_path / "run"
    assert run(folder, out, "--max-steps", "2", "--sample-every", "0", "--prompts", str(tmp_path / "meta.jsonl"),
               *flags, *paths, reward="geneval") == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 <= r["neg_mean"] <= r["pos_mean"] < 1 for r in rows)
    assert ev.main(["--lora", str(out), "--geneval", str(tmp_path / "meta.jsonl"), "--seeds", "2", *paths,
                    "--out", str(tmp_path / "ge")]) == 0
    res = json.loads((tmp_path / "ge" / "results.json").read_text())
    assert (res["settings"]["inference_steps"], res["settings"]["resolution"]) == (4, 128)
    assert len(list(csv.DictReader(open(tmp_path / "ge" / "geneval.csv")))) == 2 * 3 * 2  # models x prompts x seeds


# ---------------------------------------------------------------- eval.py -----------------

@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, tmp_path_factory):
    """(tiny model, a LoRA trained on it for 3 steps), for SD, SDXL and SANA-Sprint."""
    tiny = request.getfixturevalue(FAMILIES[request.param])
    out = tmp_path_factory.mktemp("evalrun") / "brightlora"
    assert run(tiny, out, "--max-steps", "3", "--lr", "3e-2", "--sample-every", "0") == 0
    return tiny, out


def test_eval_matches_the_diffusers_pipeline_and_an_independent_comparison(trained, tmp_path):
    import numpy as np

    import eval as ev

    tiny, trained = trained
    prompts = ["a lighthouse at night", "a bowl of fruit on a table", "snow"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    argv = ["--model", tiny, "--lora", str(trained), "--reward", "brightness,jpeg", "--prompts",
            str(tmp_path / "p.txt"), "--seeds", "3", "--out", str(tmp_path / "ev")]
    assert ev.main(argv) == 0
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    rows = list(__import__("csv").DictReader(open(tmp_path / "ev" / "scores.csv")))
    assert len(rows) == 2 * 3 * 3 and (tmp_path / "ev" / "grid.png").is_file()
    assert "| brightlora |" in (tmp_path / "ev" / "table.md").read_text()
    # independent: the plain diffusers pipeline on the documented noises, brightness by numpy
    bright, shape = {}, (1, 32, 4, 4) if is_sana(tiny) else (1, 4, 16, 16)
    for label, lora in (("base", None), ("brightlora", trained)):
        pipe = pipeline(tiny, lora)
        bright[label] = np.array([np.asarray(stock_one_step(pipe, p, torch.randn(
            shape, generator=torch.Generator().manual_seed(s)))[0], dtype=np.float64).mean() / 255
            for p in prompts for s in range(3)])
    for label in bright:
        ours = np.array([float(r["brightness"]) for r in rows if r["model"] == label])
        np.testing.assert_allclose(ours, bright[label], atol=2e-3, rtol=0)
        assert abs(res["scores"]["brightness"][label]["mean"] - bright[label].mean()) < 2e-3
    d = bright["brightlora"] - bright["base"]
    got = res["scores"]["brightness"]["brightlora"]
    assert abs(d.mean()) > 1e-3  # the LoRA changed the images
    assert got["diff_vs_base"] == pytest.approx(d.mean(), abs=2e-3)
    ours = {m: np.array([float(r["brightness"]) for r in rows if r["model"] == m]) for m in bright}
    assert got["diff_vs_base"] == pytest.approx((ours["brightlora"] - ours["base"]).mean(), abs=1e-9)  # the mean
    assert got["win_rate"] == pytest.approx(((d > 0) + 0.5 * (d == 0)).mean(), abs=1 / 9 + 1e-9)
    boot = np.random.default_rng(1).choice(d, (20000, d.size)).mean(1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    assert got["ci95"][0] <= got["diff_vs_base"] <= got["ci95"][1]
    assert got["ci95"] == pytest.approx([lo, hi], abs=0.1 * (hi - lo) + 2e-3)
    assert res["seeds"] == [0, 1, 2] and res["prompts"] == prompts


def test_eval_paper_scales_report_imagereward_times_ten(trained, tmp_path):
    import eval as ev

    tiny, lora = trained
    (tmp_path / "p.txt").write_text("a red car\n")
    weights = ["--imagereward-ckpt", str(IR / "ImageReward_tiny.pt"), "--imagereward-config",
               str(IR / "med_config.json"), "--imagereward-tokenizer", str(IR / "tokenizer")]
    res = {}
    for extra in ([], ["--paper-scales"]):
        out = tmp_path / ("paper" if extra else "plain")
        assert ev.main(["--model", tiny, "--lora", str(lora), "--reward", "imagereward,brightness", "--prompts",
                        str(tmp_path / "p.txt"), "--seeds", "2", "--out", str(out), *weights, *extra]) == 0
        res[bool(extra)] = json.loads((out / "results.json").read_text())["scores"]
    for label in ("base", "brightlora"):
        assert res[True]["imagereward"][label]["mean"] == pytest.approx(10 * res[False]["imagereward"][label]["mean"])
        assert res[True]["brightness"][label]["mean"] == pytest.approx(res[False]["brightness"][label]["mean"])


def test_eval_refuses_bad_input(trained, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    import eval as ev

    tiny, trained = trained
    (tmp_path / "p.txt").write_text("a cat\n")
    (tmp_path / "empty.txt").write_text("\n")
    lora = load_file(trained / "pytorch_lora_weights.safetensors")
    for name, change in (("wrongkeys", lambda k, v: (k.replace("attn1", "attn7"), v)),
                         ("otherfamily", lambda k, v: (k.replace("unet.", "transformer.", 1) if k.startswith("unet.")
                                                       else k.replace("transformer.", "unet.", 1), v)),
                         ("wrongshape", lambda k, v: (k, torch.zeros(v.shape[0], 2 * v.shape[1])
                                                      if "lora.down" in k else v))):
        (tmp_path / name).mkdir()
        save_file(dict(change(k, v) for k, v in lora.items()), tmp_path / name / "pytorch_lora_weights.safetensors")
    base = ["--model", tiny, "--reward", "brightness", "--seeds", "1", "--out", str(tmp_path / "ev")]
    for extra, message in ((["--lora", str(tmp_path / "nolora"), "--prompts", str(tmp_path / "p.txt")],
                            "no pytorch_lora_weights.safetensors"),
                           (["--lora", str(tmp_path / "wrongkeys"), "--prompts", str(tmp_path / "p.txt")],
                            "another architecture"),
                           (["--lora", str(tmp_path / "wrongshape"), "--prompts", str(tmp_path / "p.txt")],
                            "another architecture"),
                           (["--lora", str(tmp_path / "otherfamily"), "--prompts", str(tmp_path / "p.txt")],
                            "a LoRA for another family"),
                           (["--prompts", str(tmp_path / "empty.txt")], "has no prompts"),
                           (["--prompts", str(tmp_path / "p.txt"), "--max-prompts", "0"], "--max-prompts must be"),
                           (["--prompts", str(tmp_path / "p.txt"), "--reward", "brightness,nosuch"], "unknown reward"),
                           (["--prompts", "parti"], "--prompts parti.txt" if importlib.util.find_spec("datasets")
                            else "pip install datasets")):
        assert ev.main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()  # nothing written on failure


# ---------------------------------------------------------------- watching a run ----------

HELD = "a lighthouse at night\na bowl of fruit on a table\nsnow on a red roof\n"


def held_rows(out):
    return [r for r in metrics_of(out) if any(k.startswith("eval/") for k in r)]


def test_heldout_eval_equals_eval_py_on_each_snapshot_and_leaves_training_bitwise_unchanged(tiny, tmp_path):
    import eval as ev

    (tmp_path / "held.txt").write_text(HELD)
    common = ("--max-steps", "10", "--sample-every", "0", "--lr", "1e-2")
    watch = ("--eval-every", "5", "--save-lora-every", "5", "--eval-reward", "brightness", "--eval-prompts",
             str(tmp_path / "held.txt"), "--eval-seeds", "3")
    assert run(tiny, tmp_path / "blind", *common) == 0
    assert run(tiny, tmp_path / "watched", *common, *watch) == 0
    assert same_lora(tmp_path / "blind", tmp_path / "watched")  # the evaluation changes no update
    held = held_rows(tmp_path / "watched")
    assert [r for r in metrics_of(tmp_path / "watched") if r not in held] == metrics_of(tmp_path / "blind")
    assert [r["step"] for r in held] == [0, 5, 10] and held[0]["eval/brightness_gain"] == 0
    assert held[-1]["eval/brightness_gain"] > 0  # brightness training raised the held-out brightness
    loras = tmp_path / "watched" / "loras"
    assert sorted(p.name for p in loras.iterdir()) == ["best", "step_000000", "step_000005", "step_000010"]
    assert same_lora(loras / "step_000010", tmp_path / "watched")
    best = max(held, key=lambda r: r["eval/brightness"])["step"]
    assert held[-1]["best_step"] == best and (loras / "best").resolve() == (loras / f"step_{best:06d}").resolve()
    # eval.py on every snapshot, reading the run's model, held-out prompts and seeds: the same figures
    out = tmp_path / "ev"
    assert ev.main(["--lora", str(tmp_path / "watched"), "--snapshots", "--reward", "brightness", "--out",
                    str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["prompts"] == HELD.splitlines() and res["seeds"] == [0, 1, 2] and (out / "steps.png").is_file()
    scores = res["scores"]["brightness"]
    assert scores["base"]["mean"] == pytest.approx(held[0]["eval/brightness"], abs=1e-4)
    for r in held:
        assert scores[f"step_{r['step']:06d}"]["mean"] == pytest.approx(r["eval/brightness"], abs=1e-4)
        assert scores[f"step_{r['step']:06d}"]["diff_vs_base"] == pytest.approx(r["eval/brightness_gain"], abs=1e-4)
    assert held[-1]["eval/brightness_gain"] > 1e-3  # so the equalities above compare different images
    for snap in ("step_000005", "best"):  # each snapshot is a LoRA folder the stock pipeline loads
        pipeline(tiny, loras / snap)
        assert "load_lora_weights" in (loras / snap / "README.md").read_text()


def test_torchrun_splits_the_heldout_eval_over_processes_and_changes_no_update(tiny, tmp_path):
    (tmp_path / "held.txt").write_text(HELD)  # 3 prompts: 2 on rank 0, 1 on rank 1
    common = ["--model", tiny, "--reward", "brightness", "--candidates", "8", "--n-pos", "3", "--n-neg", "3",
              "--lr", "1e-2", "--seed", "0", "--sample-every", "0", "--max-steps", "3"]
    watch = ["--eval-every", "2", "--eval-prompts", str(tmp_path / "held.txt"), "--eval-seeds", "2"]
    for name, extra in (("watched", watch), ("blind", ["--eval-every", "0"])):
        r = torchrun(*common, "--grad-accum", "1", *extra, "--output-dir", str(tmp_path / name))
        assert r.returncode == 0, r.stderr[-3000:]
    assert same_lora(tmp_path / "watched", tmp_path / "blind")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker
    try:
        assert drpo.main(common + watch + ["--grad-accum", "2", "--output-dir", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    two, one = held_rows(tmp_path / "watched"), held_rows(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [0, 2, 3]
    for a, b in zip(one, two):  # every prompt scored once, in its place
        assert a.pop("warnings", {}).keys() == b.pop("warnings", {}).keys()  # the same warning signs
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


def test_resume_keeps_the_snapshots_and_the_best_step(tiny, tmp_path):
    (tmp_path / "held.txt").write_text(HELD)
    common = ("--sample-every", "0", "--lr", "1e-2", "--eval-every", "2", "--save-lora-every", "2", "--save-every",
              "4", "--eval-prompts", str(tmp_path / "held.txt"), "--eval-seeds", "2")
    assert run(tiny, tmp_path / "full", "--max-steps", "6", *common) == 0
    assert run(tiny, tmp_path / "cut", "--max-steps", "4", *common) == 0
    loras = tmp_path / "cut" / "loras"
    shutil.copytree(loras / "step_000004", loras / "step_000006")  # as if cut after saving a later snapshot
    assert run(tiny, tmp_path / "cut", "--max-steps", "6", *common, "--resume") == 0
    assert held_rows(tmp_path / "cut") == held_rows(tmp_path / "full")  # the base is not logged again
    names = sorted(p.name for p in (tmp_path / "full" / "loras").iterdir())
    assert sorted(p.name for p in loras.iterdir()) == names
    for name in names:
        assert same_lora(loras / name, tmp_path / "full" / "loras" / name), name
    assert (loras / "best").resolve().name == (tmp_path / "full" / "loras" / "best").resolve().name


def test_eval_py_samples_as_the_run_trained_and_refuses_a_contradicting_flag(tiny_sdxl, tmp_path, capsys,
                                                                             monkeypatch):
    """A DMD2-style run (LCM at --timestep 399): eval.py --lora RUN samples what the stock pipeline with
    timesteps=[399] and the LoRA samples, and so does the model card's code."""
    import numpy as np

    import eval as ev

    model = with_scheduler(tiny_sdxl, tmp_path / "dmd2", "LCMScheduler")
    assert run(model, tmp_path / "run", "--max-steps", "2", "--lr", "3e-2", "--sample-every", "0",
               "--timestep", "399") == 0
    (tmp_path / "p.txt").write_text("a snowy owl\n")
    base = ["--lora", str(tmp_path / "run"), "--reward", "brightness", "--prompts", str(tmp_path / "p.txt"),
            "--seeds", "2"]
    assert ev.main(base + ["--out", str(tmp_path / "ev")]) == 0
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["settings"]["timesteps"] == [399] and res["settings"]["model"] == model
    stock = pipeline(model, tmp_path / "run")
    want = [np.asarray(stock("a snowy owl", latents=torch.randn((1, 4, 16, 16), generator=torch.Generator()
                                                                .manual_seed(s)), timesteps=[399],
                             guidance_scale=0.0).images[0], dtype=np.float64).mean() / 255 for s in range(2)]
    assert res["scores"]["brightness"]["run"]["mean"] == pytest.approx(np.mean(want), abs=1e-4)
    # the model card's code is the stock call that samples this: run it on a known global noise
    card = (tmp_path / "run" / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0]
    assert "timesteps=[399]" in code and "guidance_scale=0.0" in code
    torch.manual_seed(11)
    z = torch.randn((1, 4, 16, 16))
    torch.manual_seed(11)
    ns = {}
    exec(code.replace('"a photo of a cat"', '"a snowy owl"'), ns)
    mine = lora_generator(model, tmp_path / "run", timestep=399)
    got = np.asarray(ev.sample_images(mine, ["a snowy owl"], z)[0], dtype=np.float64)
    assert np.abs(np.asarray(ns["image"], dtype=np.float64) - got).max() <= 1
    # a flag that contradicts the run is refused, naming both values, before anything loads
    monkeypatch.setattr(drpo, "load_generator", lambda *a, **k: pytest.fail("loaded a model first"))
    assert ev.main(base + ["--timestep", "999", "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "--timesteps 999" in err and "399" in err and "--override" in err and not (tmp_path / "no").exists()
    monkeypatch.undo()
    assert ev.main(base + ["--timestep", "999", "--override", "--out", str(tmp_path / "over")]) == 0
    assert json.loads((tmp_path / "over" / "results.json").read_text())["settings"]["timesteps"] == [999]


def test_lora_off_nests_and_the_outermost_switches_the_lora_back_on(tiny):
    """The held-out base is scored under lora_off, and the teacher features inside switch it off again."""
    model = drpo.load_generator(tiny)
    params = drpo.add_lora(model.net, 4, 4, ["to_q", "to_v"])
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn_like(p))  # a LoRA that changes the samples
    z, cond = torch.randn((1, 4, 16, 16)), model.conditioning(["a cat"], 128)
    step = lambda: drpo.generate(model.net, z, cond, model.recipe)
    with torch.no_grad():
        on = step()
        with drpo.lora_off(model.net):
            base = step()
            with drpo.lora_off(model.net):
                pass
            after_inner = step()
        again = step()
    assert (on - base).abs().max() > 1e-3
    assert torch.equal(after_inner, base) and torch.equal(again, on)


def test_eval_py_checks_the_lora_shapes_before_any_model_loads(tiny, tiny_sdxl, tmp_path, capsys, monkeypatch):
    import eval as ev

    assert run(tiny_sdxl, tmp_path / "xl", "--max-steps", "1", "--sample-every", "0") == 0
    monkeypatch.setattr(drpo, "load_generator", lambda *a, **k: pytest.fail("loaded a model before checking --lora"))
    monkeypatch.setattr(drpo, "load_reward", lambda *a, **k: pytest.fail("loaded a reward before checking --lora"))
    (tmp_path / "p.txt").write_text("a cat\n")
    assert ev.main(["--model", tiny, "--override", "--lora", str(tmp_path / "xl"), "--prompts",
                    str(tmp_path / "p.txt"), "--out", str(tmp_path / "ev")]) == 2
    assert "another architecture" in capsys.readouterr().err


def test_pairs_run_without_an_eval_reward_has_no_heldout_eval(tiny, tmp_path):
    write_image(tmp_path / "c.png", 220)
    write_image(tmp_path / "r.png", 30)
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "chosen": "c.png", "rejected": "r.png"}\n')
    argv = ["--model", tiny, "--pairs", str(tmp_path / "p.jsonl"), "--candidates", "4", "--n-pos", "1", "--n-neg",
            "1", "--max-steps", "2", "--sample-every", "0"]
    assert drpo.main(argv + ["--output-dir", str(tmp_path / "off")]) == 0
    assert held_rows(tmp_path / "off") == []
    (tmp_path / "held.txt").write_text(HELD)
    assert drpo.main(argv + ["--output-dir", str(tmp_path / "on"), "--eval-reward", "brightness", "--eval-prompts",
                             str(tmp_path / "held.txt"), "--eval-seeds", "2"]) == 0
    assert [r["step"] for r in held_rows(tmp_path / "on")] == [0, 2]


# ---------------------------------------------------------------- pictures ----------------

def test_labelled_grids_grow_by_their_label_bands_and_say_when_the_model_is_random(tiny, tmp_path):
    import eval as ev
    from PIL import Image

    images = [Image.new("RGB", (64, 48), c) for c in ("red", "green", "blue", "gray", "olive", "navy")]
    bare = ev.image_grid(images, 3)
    grid = ev.image_grid(images, 3, ["a prompt", "a much longer prompt that is shortened"], ["base", "lora", "x"],
                         ev.random_model_note(tiny))
    assert bare.size == (3 * 64, 2 * 48)
    assert grid.size == (bare.width + 150, bare.height + 18 + 18)  # a row band on the left, column band, note band
    ink = lambda box: any(lo < hi for lo, hi in grid.crop(box).getextrema())  # noqa: E731 (not flat: text drawn)
    assert ink((0, 18, 150, 18 + 48)) and ink((150, 0, 150 + 64, 18)) and ink((0, grid.height - 18, 300, grid.height))
    assert grid.crop((150, 18, grid.width, grid.height - 18)).tobytes() == bare.tobytes()  # the images, untouched
    assert "random weights" in ev.random_model_note(tiny) and ev.random_model_note("stabilityai/sd-turbo") is None
    # a run's sample grid: its prompts on the left, the update and noise on top, the random-weights note below
    assert run(tiny, tmp_path / "r", "--max-steps", "1", "--grid-prompts", "2", "--grid-noises", "3") == 0
    model = drpo.load_generator(tiny)
    side = drpo.latent_shape(model)[-1] * model.pipe.vae_scale_factor
    assert Image.open(tmp_path / "r" / "samples" / "step_000001.png").size == (150 + 3 * side, 18 + 2 * side + 18)


def test_steps_png_marks_the_best_step(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    import eval as ev

    drawn = []
    monkeypatch.setattr(plt, "close", drawn.append)  # keep the figure to read it back
    step = lambda mean: {"mean": mean, "diff_vs_base": mean - 0.5, "ci95": [mean - 0.6, mean - 0.4]}  # noqa: E731
    ev.plot_steps({"brightness": {"base": {"mean": 0.5}, "step_000002": step(0.7), "step_000004": step(0.6)}},
                  tmp_path / "steps.png")
    [ax] = drawn[0].axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["best: update 2"]
    assert (tmp_path / "steps.png").stat().st_size > 0


def test_each_tiny_alias_samples_with_its_real_models_card_settings():
    """The published model cards: SD-Turbo and SDXL-Turbo 1 step without guidance; FLUX.1-schnell 4 steps with
    256-token prompts; SD3.5-Large-Turbo 4 steps without guidance. SANA-Sprint: DrPO trains its one step."""
    cards = {"tiny": dict(num_inference_steps=1, guidance_scale=0.0), "tiny-sdxl": dict(num_inference_steps=1,
             guidance_scale=0.0), "tiny-sana": dict(num_inference_steps=1), "tiny-flux": dict(
             num_inference_steps=4, max_sequence_length=256), "tiny-sd3": dict(num_inference_steps=4, guidance_scale=0.0)}
    assert set(cards) == set(drpo.TINY_MODELS)
    for alias, card in cards.items():
        model = drpo.load_generator(alias)
        assert {k: model.stock_call[k] for k in card} == card, alias
        assert len(model.recipe) == card["num_inference_steps"], alias  # the steps drpo.py trains through
        assert drpo.check_model(alias) == len(model.recipe), alias  # as check_args counts them before loading
    readme = (Path(__file__).resolve().parent / "README.md").read_text()
    command = re.search(r"python drpo\.py (--model tiny-flux [^`\n]*)", readme).group(1).split()
    args = drpo.build_parser().parse_args(command)
    model = drpo.load_generator(args.model, steps=args.inference_steps, timesteps=args.timesteps)
    assert len(model.recipe) == 4 and model.stock_call["num_inference_steps"] == 4  # schnell's 4, not the stock 28


@pytest.mark.parametrize("name, hint", [("sd-trubo", "did you mean sd-turbo?"), ("tiny-flx", "did you mean tiny-flux?"),
                                        ("dmd2-sdxl-1step", "docs/models.md")])
def test_a_misspelt_or_unbuilt_model_name_fails_at_once_offline_with_what_to_do(tmp_path, capsys, name, hint):
    start = time.monotonic()
    assert drpo.main(["--model", name, "--reward", "brightness", "--output-dir", str(tmp_path / "o")]) == 2
    assert time.monotonic() - start < 2  # no hub retries
    err = capsys.readouterr().err
    assert hint in err and "hf download" not in err and not (tmp_path / "o").exists()


def hacking_run(tiny, out, reward):
    """benchmarks/hacking_check.py's run, shorter: a large learning rate, held-out evaluations every 5 updates."""
    return drpo.main(["--model", tiny, "--reward", reward, "--max-steps", "10", "--lr", "3e-3", "--grad-accum", "1",
                      "--eval-every", "5", "--eval-seeds", "2", "--sample-every", "0", "--output-dir", str(out)])


def test_a_run_hacked_on_purpose_raises_warning_signs_and_its_random_reward_control_none(tiny, tmp_path, capsys):
    assert hacking_run(tiny, tmp_path / "hacked", "brightness") == 0
    assert hacking_run(tiny, tmp_path / "control", "random") == 0
    hacked, control = held_rows(tmp_path / "hacked"), held_rows(tmp_path / "control")
    assert [r["step"] for r in hacked] == [r["step"] for r in control] == [0, 5, 10]
    for rows in (hacked, control):  # every statistic logged against the base's, at every evaluation
        assert all(f"eval/drift/{name}_gain" in r for r in rows for name in __import__("eval").ImageStats.NAMES)
    signs = {k: r["step"] for r in hacked for k in r.get("warnings", {})}
    assert {"drift/brightness", "drift/dark_fraction"} & set(signs) and min(signs.values()) <= 10
    assert sum("drift/brightness" in r.get("warnings", {}) for r in hacked) <= 1  # said once
    assert hacked[-1]["eval/drift/brightness_gain"] > 0  # brighter: the hack it warns of
    assert not any("warnings" in r for r in control)
    assert "look at them for reward hacking" in capsys.readouterr().err


def test_report_to_tensorboard_holds_every_metric_and_the_pictures_and_a_resume_continues_it(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    import io

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import run_folder

    (tmp_path / "held.txt").write_text(HELD)
    out, common = tmp_path / "tb", ("--report-to", "tensorboard", "--max-steps", "4", "--eval-every", "2",
                                    "--eval-prompts", str(tmp_path / "held.txt"), "--eval-seeds", "2",
                                    "--sample-every", "2", "--save-every", "2")
    assert run(tiny, out, *common) == 0
    shutil.copyfile(out / "checkpoint.prev.pt", out / "checkpoint.pt")  # back to update 2, as if cut during 3
    assert run(tiny, out, *common, "--resume") == 0  # redoes 3 and 4: their first logs must be gone
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    logged = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    expected = {}
    for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        for key, value in run_folder.flat_row(row):
            if not isinstance(value, str):
                expected.setdefault(key, []).append((row["step"], float(np.float32(value))))
    assert logged == expected and "reward_mean" in logged and "eval/drift/dark_fraction" in logged
    assert "phases_s/optimizer" in logged  # nested figures by name
    assert sorted(events.Tags()["images"]) == ["eval/images", "samples"]
    assert [e.step for e in events.Images("eval/images")] == [0, 2, 4]
    for e in events.Images("samples"):  # the sample grids, pixel for pixel
        saved = Image.open(out / "samples" / f"step_{e.step:06d}.png").convert("RGB")
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(e.encoded_image_string))), np.asarray(saved))
    assert [e.step for e in events.Images("samples")] == [2, 4]


def test_report_to_wandb_offline_writes_its_local_run_and_a_resume_continues_it(tiny, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for key, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_CONFIG_DIR", tmp_path / "cfg"),
                       ("WANDB_CACHE_DIR", tmp_path / "cache"), ("WANDB_DATA_DIR", tmp_path / "data")):
        monkeypatch.setenv(key, str(value))
    (tmp_path / "held.txt").write_text(HELD)
    out, common = tmp_path / "wb", ("--report-to", "wandb", "--eval-every", "2", "--eval-prompts",
                                    str(tmp_path / "held.txt"), "--eval-seeds", "1", "--sample-every", "2")
    assert run(tiny, out, *common, "--max-steps", "2") == 0
    run_id = (out / "wandb-run-id").read_text()
    [local] = (out / "wandb").glob(f"offline-run-*-{run_id}")
    records = (local / f"run-{run_id}.wandb").read_bytes()
    for name in ("reward_mean", "eval/drift/brightness", "phases_s/optimizer", "lambda_ref"):  # metrics, config
        assert name.encode() in records, name
    assert (local / "files" / "README.md").read_text() == (out / "README.md").read_text()  # the model card
    assert {p.name.split("_")[0] for p in (local / "files" / "media" / "images").rglob("*.png")} == {"samples",
                                                                                                    "images"}
    time.sleep(1)  # W&B names a run's local folder by the second
    assert run(tiny, out, *common, "--max-steps", "3", "--resume") == 0
    assert (out / "wandb-run-id").read_text() == run_id and len(list((out / "wandb").glob(f"*-{run_id}"))) == 2


def test_report_to_a_package_not_installed_says_how_to_get_it_before_loading(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: importing it fails
    monkeypatch.setattr(drpo, "load_generator", lambda *a, **k: pytest.fail("loaded a model first"))
    assert run(tiny, tmp_path / "o", "--report-to", "wandb", "--max-steps", "1") == 2
    err = capsys.readouterr().err.strip()
    assert "--report-to wandb needs the wandb package: pip install -r requirements-track.txt" in err
    assert len(err.splitlines()) == 1


# ---------------------------------------------------------------- pairwise judge --------

from rewards import judge as vlm_judge  # noqa: E402


@pytest.fixture(scope="session")
def tiny_judge(tmp_path_factory):
    return tiny_from_the_command_line(tmp_path_factory.mktemp("judge") / "qwen3vl", "judge", "--judge")


@pytest.mark.parametrize("answer, verdict", [
    ('```json\n{"winner": "B", "confidence": 0.8, "reason": "sharper fur"}\n```', "B"),
    ('Sure. {"winner": "A", "confidence": 0.6, "reason": "closer to the prompt"} Hope that helps.', "A"),
    ('{"winner": "b", "confidence": 0.9, "reason": "x"}', "B"),
    ('{"winner": " Tie ", "confidence": 0.5, "reason": "both fine"}', "tie"),
    ('{"confidence": 0.9} then {"winner": "A"}', "A"),  # the first object that has a winner
    ("A", None), ("B", None), ("Image A is better.", None),  # no JSON: never guessed from free text
    ('{"winner": "C"}', None), ('{"winner": "A"', None), ("\n\n#$%&", None), ("", None),
])
def test_judge_answers_count_only_as_json_verdicts(answer, verdict):
    assert vlm_judge.parse_verdict(answer) == verdict


def test_judge_orders_combine_into_position_consistent_verdicts_and_rates():
    c = vlm_judge.consistent
    assert c("lora", "lora") == "lora" and c("base", "base") == "base"
    assert c("lora", "base") == "tie" and c("lora", "tie") == "tie" and c("tie", "tie") == "tie"
    assert c(None, "lora") is None and c("lora", None) is None
    assert vlm_judge.winner_of("A", "lora", "base") == "lora" and vlm_judge.winner_of("B", "lora", "base") == "base"
    assert vlm_judge.winner_of("tie", "lora", "base") == "tie" and vlm_judge.winner_of(None, "lora", "base") is None
    r = vlm_judge.rates(["lora", "lora", "base", "tie", None], "lora")
    assert r == {"wins": 2, "losses": 1, "ties": 1, "valid": 4, "invalid": 1, "win_rate": 2 / 3, "preference": 2.5 / 4}
    assert math.isnan(vlm_judge.rates([None, None], "lora")["preference"])
    # every prompt a win: the interval is [1, 1]; half wins and half losses: it straddles 1/2
    assert vlm_judge.preference_ci([["lora", "lora"]] * 5, "lora") == [1.0, 1.0]
    lo, hi = vlm_judge.preference_ci([["lora"], ["base"]] * 10, "lora")
    assert lo < 0.5 < hi


def test_judge_order_follows_the_authors_hash():
    """sha256("qwen3vl_pairwise_v1:PROMPT_ID:SEED")[:8] from coreutils' sha256sum; odd = swapped."""
    known = {(0, 0): "e91022db", (0, 1): "9d07e21e", (0, 2): "aceaf069", (1, 0): "8093b0bf", (1, 1): "cab5d931",
             (2, 0): "141d67dc", (2, 3): "77abe68a", (5, 1): "fe2197e6", (42, 0): "fd5313be", (100, 3): "f54c64fb"}
    for (prompt_id, seed), head in known.items():
        assert vlm_judge.swapped(prompt_id, seed) == (int(head, 16) % 2 == 1), (prompt_id, seed)
    assert {vlm_judge.swapped(*k) for k in known} == {True, False}


def test_judge_template_reaches_the_chat_template_verbatim(tiny, tiny_judge, tmp_path, capsys):
    import eval as ev

    theirs = 'Judge two images for "{prompt}".\nReturn {"winner": "A"|"B"|"tie"} only.  Trailing spaces stay. '
    (tmp_path / "t.txt").write_text(theirs)
    judge = vlm_judge.load_judge(tiny_judge, template=ev.read_template(tmp_path / "t.txt"))
    text = judge.text("a red {fox}")
    assert vlm_judge.NAMES + theirs.replace("{prompt}", "a red {fox}") in text
    assert vlm_judge.INSTRUCTION.splitlines()[0] not in text
    assert text.count("<|image_pad|>") == 2  # image A, then image B, before the words
    assert text.index("<|image_pad|>") < text.rindex("<|image_pad|>") < text.index(vlm_judge.NAMES)
    assert vlm_judge.INSTRUCTION.splitlines()[0] in vlm_judge.load_judge(tiny_judge).text("x")
    (tmp_path / "bad.txt").write_text("no field here")
    with pytest.raises(ValueError, match=r"no \{prompt\} field"):
        ev.read_template(tmp_path / "bad.txt")
    assert ev.main(["--model", "tiny", "--judge", tiny_judge, "--judge-template", str(tmp_path / "nosuch.txt"),
                    "--prompts", str(tmp_path / "t.txt"), "--out", str(tmp_path / "e")]) == 2
    assert "--judge-template" in capsys.readouterr().err
    assert ev.main(["--model", "tiny", "--judge-template", str(tmp_path / "t.txt"), "--prompts", str(tmp_path / "t.txt"),
                    "--out", str(tmp_path / "e")]) == 2
    assert "add --judge" in capsys.readouterr().err
    assert ev.main(["--model", tiny, "--timestep", "1000", "--reward", "brightness", "--prompts",
                    str(tmp_path / "t.txt"), "--out", str(tmp_path / "e")]) == 2
    assert "--timesteps 1000: give decreasing timesteps in 0 .. 999" in capsys.readouterr().err
    with pytest.raises(OSError, match="hf download Qwen/Qwen3-VL-8B-Instruct --local-dir DIR"):
        vlm_judge.load_judge(str(tmp_path / "no_judge_here"))


def test_judge_inputs_expand_each_image_and_batch_with_left_padding(tiny_judge):
    from PIL import Image

    judge = vlm_judge.load_judge(tiny_judge)
    small, big = Image.new("RGB", (64, 64), (200, 0, 0)), Image.new("RGB", (128, 96), (0, 0, 200))
    batch = judge.inputs([(small, big, "a"), (big, big, "a much longer prompt than the first one")])
    tok = judge_tokenizer(tiny_judge)
    pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
    grids = batch["image_grid_thw"].tolist()
    assert grids == [[1, 4, 4], [1, 6, 8], [1, 6, 8], [1, 6, 8]]  # 16-pixel patches
    assert [(row == pad_id).sum().item() for row in batch["input_ids"]] == [4 + 12, 12 + 12]  # / merge 2 x 2
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].all()  # left padding
    one = judge.inputs([(small, big, "a")])
    n = one["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][0, -n:], one["input_ids"][0])
    assert torch.equal(batch["pixel_values"][:len(one["pixel_values"])], one["pixel_values"])


def judge_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_judge_inputs_equal_the_stock_qwen3vl_processor_where_torchvision_imports(tiny_judge):
    try:
        import torchvision  # noqa: F401
        from transformers import Qwen3VLProcessor
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    except Exception as e:  # torchvision's wheel does not import beside the CPU torch of these machines
        pytest.skip(f"the stock processor needs torchvision ({e})")
    from PIL import Image
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    judge = vlm_judge.load_judge(tiny_judge)
    tokenizer = AutoTokenizer.from_pretrained(tiny_judge)
    stock = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor.from_pretrained(tiny_judge), tokenizer=tokenizer,
                             video_processor=Qwen3VLVideoProcessor())
    a, b = Image.new("RGB", (128, 128), (200, 10, 10)), Image.new("RGB", (96, 64), (10, 10, 200))
    ours = judge.inputs([(a, b, "a red car")])
    theirs = stock(text=[judge.text("a red car")], images=[a, b], return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["image_grid_thw"], theirs["image_grid_thw"])
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"].to(ours["pixel_values"].dtype))


def test_judge_port_runs_alone_without_drpo(tiny_judge):
    script = f"""
import sys
from PIL import Image
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import rewards.judge as port
judge = port.load_judge({tiny_judge!r}, max_new_tokens=4)
answers = judge([(Image.new("RGB", (64, 64)), Image.new("RGB", (64, 64), (255, 255, 255)), "a white square")])
assert len(answers) == 1 and isinstance(answers[0], str), answers
assert "drpo" not in sys.modules, "imported drpo"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]


@pytest.fixture(scope="module")
def two_loras(tiny, tmp_path_factory):
    runs = tmp_path_factory.mktemp("judged")
    for name, lr in (("bright", "3e-2"), ("other", "1e-2")):
        assert run(tiny, runs / name, "--max-steps", "2", "--lr", lr, "--sample-every", "0") == 0
    return runs / "bright", runs / "other"


def test_eval_judge_runs_end_to_end_and_random_answers_are_invalid_never_wins(tiny, two_loras, tiny_judge,
                                                                               tmp_path, capsys):
    import eval as ev

    (tmp_path / "p.txt").write_text("a lighthouse at night\nsnow\n")
    out = tmp_path / "ev"
    assert ev.main(["--model", tiny, "--lora", str(two_loras[0]), "--judge", tiny_judge, "--prompts",
                    str(tmp_path / "p.txt"), "--seeds", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = list(__import__("csv").DictReader(open(out / "judge.csv")))
    assert len(rows) == 2 * 2 * 2  # prompts x seeds x both orders
    assert {(r["model_a"], r["model_b"]) for r in rows} == {("bright", "base"), ("base", "bright")}
    assert all(r["verdict"] == "invalid" and r["winner"] == "invalid" for r in rows)  # a random model's tokens
    res = json.loads((out / "results.json").read_text())["judge"]["bright vs base"]
    assert res["one_order"]["wins"] == res["consistent"]["wins"] == 0
    assert res["invalid_answers"] == res["answers"] == 8 and res["consistent"]["valid"] == 0
    assert "| bright vs base |" in printed and "| bright vs base |" in (out / "table.md").read_text()
    assert json.loads((out / "results.json").read_text())["scores"] == {}  # --judge alone scores no rewards
    assert (out / "images" / "bright" / "00001_1.png").is_file()


def scripted_judge(*args, **kwargs):
    """Stands in for the model to pin eval's bookkeeping: prefers the brighter image, except that
    on prompts containing "biased" it always answers A (a position bias), and on "mute" it rambles."""
    import numpy as np

    def judge(pairs):
        answers = []
        for a, b, prompt in pairs:
            if "mute" in prompt:
                answers.append("I cannot decide.")
                continue
            ma, mb = (np.asarray(im.convert("RGB"), dtype=np.float32).mean() / 255 for im in (a, b))  # brightness
            winner = "A" if "biased" in prompt else "A" if ma > mb else "B" if mb > ma else "tie"
            answers.append(f'```json\n{{"winner": "{winner}", "confidence": 0.7, "reason": "brighter"}}\n```')
        return answers
    return judge


def test_eval_judge_rates_equal_a_recount_of_judge_csv(tiny, two_loras, tmp_path, monkeypatch):
    import eval as ev

    monkeypatch.setattr(vlm_judge, "load_judge", scripted_judge)
    prompts = ["a lighthouse at night", "snow", "a biased bowl of fruit", "a mute cat"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "ev"
    assert ev.main(["--model", tiny, "--lora", str(two_loras[0]), "--lora", str(two_loras[1]), "--judge", "scripted",
                    "--reward", "brightness", "--prompts", str(tmp_path / "p.txt"), "--seeds", "3",
                    "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    rows = list(__import__("csv").DictReader(open(out / "judge.csv")))
    assert set(res["judge"]) == {"bright vs base", "other vs base", "bright vs other"}
    assert len(rows) == 3 * len(prompts) * 3 * 2 and "brightness" in res["scores"]  # beside a reward
    for name, got in res["judge"].items():
        x = name.split(" vs ")[0]
        mine = [r for r in rows if r["comparison"] == name]
        recount = lambda ws: {"wins": ws.count(x), "ties": ws.count("tie"), "valid": len(ws) - ws.count("invalid")}
        one = [r["winner"] for r in mine if r["authors_order"] == "1"]
        assert len(one) == len(prompts) * 3
        for key, value in recount(one).items():
            assert got["one_order"][key] == value, (name, key)
        orders = {}
        for r in mine:
            orders.setdefault((r["prompt_index"], r["seed"]), []).append(r["winner"])
        both = ["invalid" if "invalid" in o else o[0] if o[0] == o[1] else "tie" for o in orders.values()]
        for key, value in recount(both).items():
            assert got["consistent"][key] == value, (name, key)
        valid = recount(both)["valid"]
        assert got["consistent"]["preference"] == pytest.approx((both.count(x) + both.count("tie") / 2) / valid)
        assert got["invalid_answers"] == sum(r["winner"] == "invalid" for r in mine) == 2 * 3  # the mute prompt
        # the position-biased prompt never yields a consistent win; the brightness-driven ones agree across orders
        biased = [w for (i, _), w in zip(orders, both) if prompts[int(i)].startswith("a biased")]
        assert biased and all(w == "tie" for w in biased)
        assert got["agreement"] == pytest.approx(
            sum(o[0] == o[1] for o in orders.values() if "invalid" not in o) / valid)
    # and the consistent wins are the pairs the brightness reward (scores.csv) orders the same way
    scores = {}
    for r in __import__("csv").DictReader(open(out / "scores.csv")):
        scores.setdefault(r["model"], []).append((r["prompt"], float(r["brightness"])))
    plain = [(p, a, b) for (p, a), (_, b) in zip(scores["base"], scores["bright"]) if "biased" not in p and "mute" not in p]
    assert res["judge"]["bright vs base"]["consistent"]["wins"] == sum(b > a for _, a, b in plain)
    assert res["judge"]["bright vs base"]["consistent"]["losses"] == sum(b < a for _, a, b in plain)


def test_toy2d_moves_toward_the_reward_and_lambda_ref_holds_it_near_the_base(tmp_path):
    toy2d = importlib.import_module("examples.toy2d")
    free, _ = toy2d.train(60, lambda_ref=0.5)
    held, _ = toy2d.train(60, lambda_ref=3.0)
    first, last = sum(free["reward"][:10]) / 10, sum(free["reward"][-10:]) / 10
    assert last > first + 0.3  # the cloud reached the ring (mean reward -0.81 -> -0.24 measured)
    assert held["dist_ref"][-1] < 0.5 * free["dist_ref"][-1]  # a larger lambda_ref keeps it closer to the base
    # what the picture shows: without the reference drift the samples collapse onto one point; with it they stay
    # apart (mean pairwise distance at step 199, measured: 0.04 at lambda_ref 0, 0.20 at 0.5, 0.83 at step 0)
    spread = lambda snaps: torch.pdist(snaps[-1][1]).mean().item()
    (_, none), (_, some) = toy2d.train(200, lambda_ref=0.0, frames=2), toy2d.train(200, lambda_ref=0.5, frames=2)
    assert spread(none) < 0.1 * torch.pdist(none[0][1]).mean().item() and spread(some) > 3 * spread(none)
    toy2d.main(["--out", str(tmp_path), "--steps", "12", "--frames", "3"])
    from PIL import Image

    with Image.open(tmp_path / "toy2d.gif") as gif:
        assert gif.n_frames == 3
    with Image.open(tmp_path / "toy2d.png") as png:
        assert png.width > png.height > 100


def test_the_readme_trainer_runs_as_printed_learns_and_collapses_without_the_reference_term(capsys):
    code = docs_block("README.md", "## The field in your own trainer")
    with torch.random.fork_rng():
        exec(code, {})  # exactly as printed
        base, tuned = map(float, re.search(r"mean reward (\S+) \(base\) -> (\S+)", capsys.readouterr().out).groups())
        assert tuned > base + 0.1  # measured: -0.89 -> -0.73
        # the README's line on lambda_ref: without the reference term the samples end on one point of the circle
        # (mean pairwise distance measured 0.12, the base's 1.82)
        ns = {}
        exec(code.replace("drpo_objective(gen, pos, neg, ref)", "drpo_objective(gen, pos, neg, ref, lambda_ref=0.0)"), ns)
        z = torch.randn(1000, 2, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.pdist(ns["G"](z)).mean() < 0.2 * torch.pdist(ns["G0"](z)).mean()


def test_curves_are_drawn_for_a_run_and_for_several_runs(tiny, tmp_path, capsys):
    import eval as ev
    from PIL import Image

    for name in ("a", "b"):
        assert run(tiny, tmp_path / name, "--max-steps", "3", "--sample-every", "0") == 0
        with Image.open(tmp_path / name / "curves.png") as im:  # written at the end even without grids
            assert im.width > 4 * 100
    assert ev.main(["--curves", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "both")]) == 0
    assert (tmp_path / "both" / "curves.png").is_file()
    assert ev.main(["--curves", str(tmp_path / "nothing"), "--out", str(tmp_path / "none")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


# ---------------------------------------------------------------- benchmarks --------------

def test_hpsv3_cost_stand_in_patchifies_like_qwen2vl_and_passes_gradient():
    """benchmarks/step_cost.py times HPSv3's architecture on the GPU only; check its code at toy size."""
    import importlib.util

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    spec = importlib.util.spec_from_file_location("step_cost", Path(__file__).parent / "benchmarks" / "step_cost.py")
    sc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sc)
    net = sc.Qwen2VLScorer("qwen2vl-tiny", torch.float32).eval()
    seen = {}
    net.model.model.visual.register_forward_pre_hook(lambda m, args: seen.setdefault("pixels", args[0]))
    img = torch.rand(1, 3, 448, 448, requires_grad=True)
    net(img).sum().backward()
    assert img.grad.abs().sum() > 0
    proc = Qwen2VLImageProcessorPil.from_pretrained(HPS / "base")  # the fixture's processor settings
    pil = drpo.to_pil(torch.nn.functional.interpolate(img.detach(), size=(448, 448), mode="bicubic").clamp(0, 1))
    ref = proc(images=pil, do_resize=False, return_tensors="pt")["pixel_values"]
    ours = seen["pixels"]
    assert ours.shape == ref.shape == (1024, 1176)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0.05)  # equal up to the processor's uint8 rounding


# ---------------------------------------------------------------- every flag, a bad value -

# drpo.py: each row gives one flag (or input file) a bad value and names what the one-line message must say: the flag
# or file and the fix. {d} is a scratch folder with the files of bad_inputs(); SANA the tiny SANA-Sprint model.
DRPO_BAD = [
    (["--model", "{d}/nope"], "--model {d}/nope: no such folder. Pass a diffusers pipeline folder"),
    (["--model", "sd-trubo"], "--model sd-trubo: no such folder (did you mean sd-turbo?); DMD2, Lightning: docs/models.md"),
    (["--model", "{d}/afile"], "--model {d}/afile: is a file"),
    (["--model", "{d}"], "--model {d}: is not a diffusers pipeline"),
    (["--resolution", "100"], "--resolution 100: this model needs a multiple of 16"),
    (["--resolution", "-16"], "--resolution -16: this model needs a multiple of 16"),
    (["--timestep", "1000"], "--timesteps 1000: give decreasing timesteps in 0 .. 999"),
    (["--timesteps", "499,999"], "--timesteps 499,999: give decreasing timesteps in 0 .. 999, one per step"),
    (["--timesteps", "999,x"], "argument --timesteps/--timestep: invalid ints value: '999,x'"),
    (["--inference-steps", "0"], "--inference-steps must be at least 1, got 0"),
    (["--inference-steps", "2000"], "--inference-steps 2000: this model's scheduler has 1000 timesteps"),
    (["--inference-steps", "4", "--timesteps", "999,499"], "--inference-steps 4 and --timesteps 999,499 (2 steps) "
     "disagree"),
    (["--grad-steps", "0", "--inference-steps", "2"], "--grad-steps must be at least 1, got 0"),
    (["--grad-steps", "2"], "--grad-steps 2 exceeds the sampler's 1 step(s); give at most 1"),
    (["--model", "SANA", "--inference-steps", "2"], "SANA-Sprint trains at its one step here"),
    (["--device", "bogus"], "--device bogus: not a torch device"),
    (["--device", "cuda"], "--device cuda: this torch build sees no CUDA GPU; use cpu"),
    (["--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
    (["--lora-rank", "0"], "--lora-rank must be at least 1, got 0"),
    (["--lora-alpha", "0"], "--lora-alpha must be positive, got 0"),
    (["--lora-targets", "to_q,to_zz"], "--lora-targets: 'to_zz' names no Linear or Conv2d layer of this unet; its "
                                       "layers end in"),
    (["--candidates", "0"], "--candidates must be at least 1"),
    (["--n-pos", "0"], "--n-pos must be at least 1"),
    (["--n-neg", "0"], "--n-neg must be at least 1"),
    (["--n-pos", "5", "--n-neg", "4"], "--n-pos 5 + --n-neg 4 exceeds --candidates 8"),
    (["--pos-weight", "0"], "--pos-weight must be positive"),
    (["--neg-weight", "-1"], "--neg-weight must be positive"),
    (["--ref-weight", "0"], "--ref-weight must be positive"),
    (["--ref-neg-weight", "0"], "--ref-neg-weight must be positive"),
    (["--lambda-ref", "-1"], "--lambda-ref must be 0 (off) or positive"),
    (["--radii", "0,-1"], "--radii must be positive numbers, e.g. 0.02,0.05,0.2"),
    (["--radii", "a,b"], "argument --radii: invalid floats value: 'a,b'"),
    (["--ref-radii", "0.1,0"], "--ref-radii must be positive numbers"),
    (["--kernel", "gauss"], "argument --kernel: invalid choice: 'gauss'"),
    (["--report-to", "mlflow"], "argument --report-to: invalid choice: 'mlflow'"),
    (["--reward", "brightnes"], "unknown reward 'brightnes'; choose one of"),
    (["--reward", ""], "--reward is empty; name a reward"),
    (["--reward", "brightness:2,nosuchmodule_xyz:score"], "--reward nosuchmodule_xyz:score: no module "
                                                          "'nosuchmodule_xyz' on the Python path; run from its folder"),
    (["--reward", "test_drpo:no_such_function"], "--reward test_drpo:no_such_function: test_drpo has no function "
                                                 "'no_such_function'"),
    (["--pairs", "{d}/missing.jsonl"], "--pairs {d}/missing.jsonl: no such file; give a JSON-lines file"),
    (["--pairs", "{d}/empty.txt"], "--pairs {d}/empty.txt is empty; write one JSON object per line"),
    (["--pairs", "{d}/notjson.jsonl"], "--pairs {d}/notjson.jsonl, line 1 is not JSON"),
    (["--pairs", "{d}/pairs.jsonl", "--reward", "brightness"], "--pairs replaces --reward and --prompts"),
    (["--reward-batch", "0"], "--reward-batch must be at least 1"),
    (["--reward-device", "bogus"], "--reward-device bogus: not a torch device"),
    (["--reward-device", "cuda:+1"], "--reward-device cuda:+1: this torch build sees no CUDA GPU"),
    (["--reward-precision", "fp16"], "argument --reward-precision: invalid choice"),
    (["--reward", "hpsv3", "--hpsv3-ckpt", "{d}/nope.safetensors"], "--hpsv3-ckpt {d}/nope.safetensors: no such file"),
    (["--hpsv3-base", "{d}"], "--hpsv3-base is a weight file of the hpsv3 reward, which no --reward uses; drop it"),
    (["--reward", "imagereward", "--imagereward-ckpt", "{d}/nope.pt"], "--imagereward-ckpt {d}/nope.pt: no such file"),
    (["--imagereward-config", "{d}/afile"], "--imagereward-config is a weight file of the imagereward reward"),
    (["--imagereward-tokenizer", "{d}"], "--imagereward-tokenizer is a weight file of the imagereward reward"),
    (["--geneval-detector", "{d}"], "--geneval-detector is a weight file of the geneval reward"),
    (["--geneval-clip", "{d}"], "--geneval-clip is a weight file of the geneval reward"),
    (["--reward", "geneval"], "--reward geneval finds each prompt's checks in the GenEval metadata: pass --prompts "
                              "evaluation_metadata.jsonl"),
    (["--features", "teachr"], "--features teachr: unknown feature map; choose one of teacher, mae, latent, dinov2, "
                               "or `module.path:function`"),
    (["--features", "nosuchmodule_xyz:phi"], "--features nosuchmodule_xyz:phi: no module 'nosuchmodule_xyz'"),
    (["--features", "mae"], "pass --mae-ckpt"),
    (["--features", "mae", "--mae-ckpt", "{d}/nope.pth"], "modelscope download"),
    (["--mae-ckpt", "{d}/afile"], "--mae-ckpt is for --features mae, not teacher: drop it"),
    (["--teacher-layers", "down_blocks.2,mid_block"], "--teacher-layers: 'down_blocks.2' is not a block of this UNet; "
                                                      "use mid_block, down_blocks.I or up_blocks.I with I in -2..1"),
    (["--features", "latent", "--teacher-layers", "mid_block"], "--teacher-layers is for --features teacher, not "
                                                                "latent"),
    (["--features", "dinov2", "--dinov2", "{d}/nodino"], "--dinov2 {d}/nodino: no such folder"),
    (["--dinov2", "facebook/dinov2-small"], "--dinov2 is for --features dinov2, not teacher"),
    (["--max-steps", "0"], "--max-steps must be at least 1"),
    (["--lr", "0"], "--lr must be positive"),
    (["--adam-beta1", "1"], "--adam-beta1 must be in [0, 1), e.g. 0.9, got 1.0"),
    (["--adam-beta2", "-0.1"], "--adam-beta2 must be in [0, 1)"),
    (["--weight-decay", "-1"], "--weight-decay must be 0 (off) or positive"),
    (["--max-grad-norm", "0"], "--max-grad-norm must be positive"),
    (["--grad-accum", "0"], "--grad-accum must be at least 1"),
    (["--prompts-per-step", "0"], "--prompts-per-step must be at least 1"),
    (["--grad-chunk", "-1"], "--grad-chunk must be 0 (off) or positive"),
    (["--prompts", "{d}/missing.txt"], "--prompts {d}/missing.txt: no such file; give a text file"),
    (["--prompts", "{d}/empty.txt"], "--prompts {d}/empty.txt has no prompts; write one prompt per line"),
    (["--prompts", "{d}/latin1.txt"], "--prompts {d}/latin1.txt is not UTF-8 text"),
    (["--prompts", "{d}/noprompt.jsonl"], "--prompts {d}/noprompt.jsonl: every line of a .jsonl file must be an "
                                          "object with a \"prompt\""),
    (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (["--output-dir", "{d}/afile"], "--output-dir {d}/afile is a file; pass a folder"),
    (["--output-dir", "{d}/full"], "--output-dir {d}/full holds x (another run?): a new run would replace them"),
    (["--output-dir", "{d}/afile/sub"], "--output-dir {d}/afile/sub: cannot write there (Not a directory)"),
    (["--resume", "--output-dir", "{d}/full"], "--output-dir {d}/full holds x, but no checkpoint to resume from"),
    (["--resume", "--output-dir", "{d}/noconfig"], "--resume: {d}/noconfig/config.json is missing or damaged"),
    (["--resume", "--output-dir", "{d}/listconfig"], "--resume: {d}/listconfig/config.json holds a list, not the run's"),
    (["--resume", "--output-dir", "{d}/cutmetrics"], "{d}/cutmetrics/metrics.jsonl, line 1 is not a metrics row"),
    (["--resolution", "100000"], "--resolution must be a side of at most 4096 pixels, got 100000"),
    (["--pos-weight", "1e39"], "--pos-weight must be positive, at most 1e6 (the paper's: 3000), got 1e+39"),
    (["--lr", "1e30"], "--lr must be positive and at most 1, got 1e+30"),
    (["--reward", "brightness:inf"], "--reward brightness:inf: a weight is a finite number other than 0, got inf"),
    (["--reward", "brightness:1e999"], "a weight is a finite number other than 0, got 1e999"),
    (["--reward", "brightness:0,jpeg"], "--reward brightness:0: a weight is a finite number other than 0"),
    (["--prompts", "{d}/numbers.jsonl"], "--prompts {d}/numbers.jsonl: prompt 1 is 3; every prompt is a non-empty"),
    (["--prompts", "{d}/nulls.jsonl"], "prompt 2 is None; every prompt is a non-empty string"),
    (["--prompts", "{d}/lists.jsonl"], "prompt 1 is ['a', 'b']; every prompt is a non-empty string"),
    (["--sample-every", "-1"], "--sample-every must be 0 (off) or positive"),
    (["--grid-prompts", "0"], "--grid-prompts must be at least 1"),
    (["--grid-noises", "0"], "--grid-noises must be at least 1"),
    (["--save-every", "0"], "--save-every must be at least 1"),
    (["--save-lora-every", "0"], "--save-lora-every must be at least 1"),
    (["--eval-every", "-1"], "--eval-every must be 0 (off) or positive"),
    (["--pairs", "{d}/pairs.jsonl", "--eval-every", "5"], "--eval-every: with --pairs there is no training reward to "
                                                          "evaluate with; name one with --eval-reward"),
    (["--eval-prompts", "{d}/missing.txt"], "--eval-prompts {d}/missing.txt: no such file"),
    (["--eval-prompts", "{d}/empty.txt"], "--eval-prompts {d}/empty.txt has no prompts"),
    (["--eval-prompts", "{d}/latin1.txt"], "--eval-prompts {d}/latin1.txt is not UTF-8"),
    (["--eval-reward", "nosuch"], "--eval-reward nosuch: unknown reward 'nosuch'"),
    (["--eval-reward", "geneval"], "needs --eval-prompts evaluation_metadata.jsonl"),
    (["--eval-seeds", "0"], "--eval-seeds must be at least 1"),
    (["--force"], "--force only overrides the settings check of --resume; add --resume or drop --force"),
    (["--resume", "--output-dir", "{d}/old"], "{d}/old/checkpoint.pt is missing, damaged or not a DrPO checkpoint"),
    (["--reward", "vlm"], "--reward vlm needs --reward-url (the server's OpenAI-compatible base"),
    (["--reward", "vlm-rating", "--reward-url", "http://127.0.0.1:9/v1"], "--reward vlm-rating needs --reward-model"),
    (["--reward", "vlm", "--reward-url", "ftp://x", "--reward-model", "m"], "--reward-url ftp://x: not an http://"),
    (["--reward-url", "http://127.0.0.1:9/v1"], "--reward-url is a setting of --reward vlm / vlm-rating, which no "
                                                "--reward uses; drop it"),
    (["--reward-model", "m"], "--reward-model is a setting of --reward vlm / vlm-rating, which no --reward uses"),
    (["--reward", "vlm", "--reward-url", "http://127.0.0.1:9/v1", "--reward-model", "m", "--reward-template", "{d}/missing.txt"], "--reward-template {d}/missing.txt: no such file"),
    (["--reward", "vlm", "--reward-url", "http://127.0.0.1:9/v1", "--reward-model", "m", "--reward-template", "{d}/empty.txt"], "--reward-template {d}/empty.txt has no {{prompt}} field"),
    (["--reward-template", "{d}/empty.txt"], "--reward-template is a setting of --reward vlm / vlm-rating"),
    (["--reward", "vlm", "--reward-url", "http://127.0.0.1:9/v1", "--reward-model", "m", "--reward-concurrency", "0"], "--reward-concurrency must be at least 1, got 0"),
    (["--reward-concurrency", "4"], "--reward-concurrency is a setting of --reward vlm / vlm-rating"),
    (["--reward-api-key-env", "MY_KEY"], "--reward-api-key-env is a setting of --reward vlm / vlm-rating"),
    (["--reward", "http://127.0.0.1:9", "--reward-timeout", "0"], "--reward-timeout must be positive, got 0.0"),
    (["--reward-timeout", "5"], "--reward-timeout is a setting of a served reward (vlm, http://), which no --reward"),
    (["--reward", "http://127.0.0.1:9", "--reward-retry", "-1"], "--reward-retry must be 0 or positive, got -1.0"),
    (["--reward-retry", "5"], "--reward-retry is a setting of a served reward (vlm, http://), which no --reward uses"),
    (["--reward", "http://127.0.0.1:9:x"], "--reward http://127.0.0.1:9:x: not a URL like http://HOST:PORT"),
    (["--reward", "http://:9"], "--reward http://:9: not a URL like http://HOST:PORT"),
    (["--reward", "vlm", "--reward-url", "http://127.0.0.1:9/v1", "--reward-model", "m", "--eval-reward", "vlm"], "--eval-reward vlm cannot watch the run: it ranks each prompt's images"),
    (["--quantize", "int4"], "argument --quantize: invalid choice: 'int4'"),
    (["--quantize", "nf4"], "--quantize nf4 goes through bitsandbytes, which needs a CUDA GPU (this run's device is "
                            "cpu); on a CPU use --quantize int8"),
    (["--reward-quantize", "nf4"], "argument --reward-quantize: invalid choice: 'nf4'"),
    (["--reward-quantize", "int8"], "--reward-quantize: brightness has no reward network to quantize"),
    (["--offload"], "--offload: brightness has no reward network to offload"),
    (["--reward", "http://127.0.0.1:9", "--reward-quantize", "int8"], "--reward-quantize: http://127.0.0.1:9 is "
                                                                        "served by another process"),
    # family-specific checks, on the tiny SANA-Sprint (DC-AE /32, patch 1, 4 transformer blocks, 32 channels)
    (["--model", "SANA", "--timestep", "399"], "SANA-Sprint's one step starts at the pure-noise end"),
    (["--model", "SANA", "--features", "mae", "--mae-ckpt", str(FIXTURES / "mae_tiny" / "mae_latent_tiny.pth")],
     "latents have 32 channels"),
    (["--model", "SANA", "--resolution", "100"], "needs a multiple of 32"),
    (["--model", "SANA", "--teacher-layers", "transformer_blocks.4"], "not a block of this transformer"),
    (["--model", "SANA", "--lora-targets", "to_zz"], "'to_zz' names no Linear or Conv2d layer of this transformer"),
]
DRPO_SWITCHES = {"-h", "--help", "--gradient-checkpointing", "--overwrite", "--cache-conditioning",
                 "--offload"}  # flags without a value to get wrong

# eval.py, the same way (a run folder of two updates is {d}/run).
EVAL_BAD = [
    (["--model", "{d}/nope"], "--model {d}/nope: no such folder"),
    (["--lora", "{d}/nope"], "--lora {d}/nope: no pytorch_lora_weights.safetensors there; pass the --output-dir"),
    (["--lora", "{d}/damaged"], "--lora {d}/damaged: {d}/damaged/pytorch_lora_weights.safetensors is damaged or not a "
                                "safetensors file"),
    (["--lora", "{d}/badconfig"], "{d}/badconfig/config.json: model is 123, not a model name"),
    (["--lora", "{d}/badseeds"], "{d}/badseeds/config.json: eval_seeds is -3, not a number of seeds"),
    (["--lora", "{d}/noprompts"], "--lora {d}/noprompts: its run's --eval-prompts {d}/gone.txt no longer exists"),
    (["--resolution", "100000"], "--resolution must be a side of at most 4096 pixels, got 100000"),
    (["--lora", "{d}", "--snapshots"], "--snapshots: {d} has no loras/step_N folders"),
    (["--lora", "{d}/run", "--lora", "{d}/run", "--snapshots"], "--snapshots evaluates the snapshots of one run"),
    (["--lora", "{d}/run", "--timestep", "500"], "--timesteps 500 contradicts the run of --lora {d}/run"),
    (["--reward", "nosuch"], "unknown reward 'nosuch'"),
    (["--reward", "nosuchmodule_xyz:score"], "--reward nosuchmodule_xyz:score: no module"),
    (["--prompts", "{d}/missing.txt"], "--prompts {d}/missing.txt: no such file"),
    (["--prompts", "{d}/latin1.txt"], "--prompts {d}/latin1.txt is not UTF-8"),
    (["--geneval", "{d}/missing.jsonl", "--reward", ""], "--geneval {d}/missing.jsonl: no such file"),
    (["--geneval", "{d}/noprompt.jsonl", "--reward", ""], "{d}/noprompt.jsonl, line 1: a GenEval metadata line needs"),
    (["--geneval", "{d}/notjson.jsonl", "--reward", ""], "{d}/notjson.jsonl, line 1 is not JSON"),
    (["--geneval", "{d}/noprompt.jsonl"], "--geneval scores its metadata's prompts with its own checks: drop --prompts "
                                          "and --reward"),
    (["--judge", "{d}/nojudge"], "--judge {d}/nojudge: no such folder"),
    (["--judge", "--judge-template", "{d}/missing.txt"], "--judge-template {d}/missing.txt: no such file"),
    (["--judge", "--judge-template", "{d}/empty.txt"], "has no {{prompt}} field"),
    (["--judge-template", "{d}/empty.txt"], "--judge-template is the instruction of --judge; add --judge"),
    (["--judge-batch", "0"], "--judge-batch must be at least 1"),
    (["--curves", "{d}"], "--curves {d}: no metrics.jsonl there"),
    (["--curves", "{d}/cutmetrics"], "{d}/cutmetrics/metrics.jsonl, line 1 is not a metrics row"),
    (["--max-prompts", "0"], "--max-prompts must be at least 1"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--out", "{d}/afile"], "--out {d}/afile is a file; pass a folder"),
    (["--resolution", "100"], "--resolution 100: this model needs a multiple of 16"),
    (["--timestep", "1000"], "--timesteps 1000: give decreasing timesteps in 0 .. 999"),
    (["--timesteps", "499,999"], "--timesteps 499,999: give decreasing timesteps in 0 .. 999, one per step"),
    (["--timesteps", "999,x"], "argument --timesteps/--timestep: invalid ints value: '999,x'"),
    (["--inference-steps", "0"], "--inference-steps must be at least 1, got 0"),
    (["--inference-steps", "2000"], "--inference-steps 2000: this model's scheduler has 1000 timesteps"),
    (["--inference-steps", "4", "--timesteps", "999,499"], "--inference-steps 4 and --timesteps 999,499 (2 steps) "
     "disagree"),
    (["--device", "bogus"], "--device bogus: not a torch device"),
    (["--precision", "fp16"], "argument --precision: invalid choice"),
    (["--reward-device", "bogus"], "--reward-device bogus: not a torch device"),
    (["--reward-batch", "0"], "--reward-batch must be at least 1"),
    (["--reward", "hpsv3", "--hpsv3-ckpt", "{d}/nope.safetensors"], "--hpsv3-ckpt {d}/nope.safetensors: no such file"),
    (["--hpsv3-base", "{d}"], "--hpsv3-base is a weight file of the hpsv3 reward, which no --reward uses"),
    (["--imagereward-ckpt", "{d}"], "--imagereward-ckpt is a weight file of the imagereward reward"),
    (["--imagereward-config", "{d}"], "--imagereward-config is a weight file of the imagereward reward"),
    (["--imagereward-tokenizer", "{d}"], "--imagereward-tokenizer is a weight file of the imagereward reward"),
    (["--geneval-detector", "{d}"], "--geneval-detector is a weight file of the geneval reward"),
    (["--geneval", "{d}/meta.jsonl", "--reward", "", "--geneval-clip", "{d}/nope"], "--geneval-clip {d}/nope: no such"),
    (["--grid-prompts", "0"], "--grid-prompts must be at least 1"),
    (["--reward", "vlm", "--reward-url", "http://127.0.0.1:9/v1", "--reward-model", "m"], "--reward vlm cannot evaluate: it ranks each prompt's images against the first of them"),
    (["--reward", "vlm-rating"], "--reward vlm-rating needs --reward-url"),
    (["--reward-url", "http://127.0.0.1:9/v1"], "--reward-url is a setting of --reward vlm / vlm-rating"),
    (["--reward-model", "m"], "--reward-model is a setting of --reward vlm / vlm-rating"),
    (["--reward-template", "{d}/empty.txt"], "--reward-template is a setting of --reward vlm / vlm-rating"),
    (["--reward-concurrency", "0"], "--reward-concurrency is a setting of --reward vlm / vlm-rating"),
    (["--reward-api-key-env", "K"], "--reward-api-key-env is a setting of --reward vlm / vlm-rating"),
    (["--reward-timeout", "0"], "--reward-timeout is a setting of a served reward (vlm, http://)"),
    (["--reward", "http://127.0.0.1:9", "--reward-retry", "-2"], "--reward-retry must be 0 or positive, got -2.0"),
]
EVAL_SWITCHES = {"-h", "--help", "--override", "--paper-scales"}


@pytest.fixture(scope="module")
def bad_inputs(tiny, tmp_path_factory):
    """A folder of bad and good input files, and a tiny two-update run, for the sweeps below."""
    d = tmp_path_factory.mktemp("bad")
    (d / "afile").write_text("not a folder\n")
    (d / "empty.txt").write_text("\n")
    (d / "latin1.txt").write_bytes("une forêt enneigée\n".encode("latin-1"))
    (d / "noprompt.jsonl").write_text('{"text": "a cat"}\n')
    (d / "notjson.jsonl").write_text("a cat\n")
    (d / "meta.jsonl").write_text('{"prompt": "a photo of a cat", "tag": "single_object", "include": '
                                  '[{"class": "cat", "count": 1}]}\n')
    write_image(d / "c.png", 220)
    write_image(d / "r.png", 30)
    (d / "pairs.jsonl").write_text('{"prompt": "a", "chosen": "c.png", "rejected": "r.png"}\n')
    (d / "full").mkdir()
    (d / "full" / "x").write_text("")
    (d / "old").mkdir()
    (d / "old" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    (d / "numbers.jsonl").write_text('{"prompt": 3}\n')
    (d / "nulls.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": null}\n')
    (d / "lists.jsonl").write_text('{"prompt": ["a", "b"]}\n')
    assert run(tiny, d / "run", "--max-steps", "2", "--grad-accum", "1", "--sample-every", "0") == 0
    for name, change in (("noconfig", lambda r: (r / "config.json").unlink()),  # damaged run folders
                         ("listconfig", lambda r: (r / "config.json").write_text("[1, 2]")),
                         ("cutmetrics", lambda r: (r / "metrics.jsonl").write_text("{not json\n" + (
                             r / "metrics.jsonl").read_text())),
                         ("damaged", lambda r: (r / "pytorch_lora_weights.safetensors").write_bytes(
                             (r / "pytorch_lora_weights.safetensors").read_bytes()[:1000])),
                         ("badconfig", lambda r: (r / "config.json").write_text(json.dumps(
                             {**json.loads((r / "config.json").read_text()), "model": 123}))),
                         ("badseeds", lambda r: (r / "config.json").write_text(json.dumps(
                             {**json.loads((r / "config.json").read_text()), "eval_seeds": -3}))),
                         ("noprompts", lambda r: (r / "config.json").write_text(json.dumps(
                             {**json.loads((r / "config.json").read_text()), "eval_prompts": str(d / "gone.txt")})))):
        shutil.copytree(d / "run", d / name)
        change(d / name)
    return d


def no_model_loads(monkeypatch):
    """Any model, reward, judge or feature network loading (or the tiny model being built) fails the test."""
    def loaded(*a, **k):
        raise AssertionError("a model was loaded before the settings were checked")

    for name in ("load_generator", "load_reward", "teacher_features"):
        monkeypatch.setattr(drpo, name, loaded)
    monkeypatch.setattr(tiny_model, "make_tiny", loaded)
    monkeypatch.setattr(drpo.beside("features.mae"), "mae_encoder", loaded)
    monkeypatch.setattr(drpo.beside("features.dinov2"), "dinov2_encoder", loaded)
    monkeypatch.setattr(drpo.beside("rewards.judge"), "load_judge", loaded)
    monkeypatch.setattr(drpo.beside("rewards.geneval"), "load_detector", loaded)


def refused(main, argv, capsys):
    """main(argv)'s exit code and its stderr; argparse's own refusals exit with 2 as well."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def options(parser):
    return {o for action in parser._actions for o in action.option_strings}


def test_every_flag_of_drpo_and_eval_has_a_bad_value_in_the_sweep():
    import eval as ev

    for parser, table, switches in ((drpo.build_parser(), DRPO_BAD, DRPO_SWITCHES),
                                    (ev.build_parser(), EVAL_BAD, EVAL_SWITCHES)):
        swept = {f for flags, _ in table for f in flags if f.startswith("--")}
        assert options(parser) - switches <= swept, options(parser) - switches - swept


@pytest.mark.parametrize("flags,message", DRPO_BAD, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_drpo_refuses_each_bad_flag_before_any_model_loads(tiny, tiny_sana, bad_inputs, tmp_path, capsys, monkeypatch,
                                                           flags, message):
    if torch.cuda.is_available() and "cuda" in " ".join(flags):
        pytest.skip("a CUDA device is there")
    no_model_loads(monkeypatch)
    flags = [tiny_sana if f == "SANA" else f.format(d=bad_inputs) for f in flags]
    argv = ["--model", tiny, *([] if "--pairs" in flags else ["--reward", "brightness"]), "--output-dir",
            str(tmp_path / "o"), "--candidates", "8", "--n-pos", "3", "--n-neg", "3", "--max-steps", "1", *flags]
    code, err = refused(drpo.main, argv, capsys)
    assert code == 2 and message.format(d=bad_inputs) in err.strip().splitlines()[-1], err  # one line says it
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written
    assert [f.name for f in (bad_inputs / "old").iterdir()] == ["checkpoint.pt"]


@pytest.mark.parametrize("flags,message", EVAL_BAD, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_eval_refuses_each_bad_flag_before_any_model_loads(tiny, bad_inputs, tmp_path, capsys, monkeypatch, flags,
                                                           message):
    import eval as ev

    no_model_loads(monkeypatch)
    flags = [f.format(d=bad_inputs) for f in flags]
    argv = [*([] if "--model" in flags else ["--model", tiny]), "--reward", "brightness", "--seeds", "1", "--out",
            str(tmp_path / "ev"), *flags]
    code, err = refused(ev.main, argv, capsys)
    assert code == 2 and message.format(d=bad_inputs) in err.strip().splitlines()[-1], err
    assert "Traceback" not in err
    assert not (tmp_path / "ev").exists()


# ---------------------------------------------------------------- your own code ------------

def docs_block(path, heading):
    """The first ```python block after a heading of a docs file, as written."""
    text = (Path(__file__).resolve().parent / path).read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(heading):], re.S)[1]


def test_the_features_docs_example_runs_as_a_feature_map_and_a_factory(tiny, tmp_path, monkeypatch):
    (tmp_path / "myfeatures.py").write_text(docs_block("docs/features.md", "## Your own feature map"))
    monkeypatch.syspath_prepend(str(tmp_path))
    latents = torch.randn(3, 4, 8, 8)
    for spec, key, shape in (("myfeatures:pooled", "pooled", (3, 16, 4)), ("myfeatures:projected()", "proj",
                                                                           (3, 64, 64))):
        phi = drpo.load_features(spec)
        assert {k: tuple(v.shape) for k, v in phi(latents, None, None).items()} == {key: shape}
    loras = []
    for spec in ("myfeatures:pooled", "myfeatures:projected()"):
        assert run(tiny, tmp_path / spec, "--features", spec, "--max-steps", "2", "--sample-every", "0") == 0
        loras.append(load_file(tmp_path / spec / "pytorch_lora_weights.safetensors"))
        assert max(v.abs().max().item() for k, v in loras[-1].items() if "lora.up" in k or "lora_B" in k) > 0
    assert any(not torch.equal(loras[0][k], loras[1][k]) for k in loras[0])  # each map drives its own update


RECEIVED = []


def reward_factory(device, dtype):
    RECEIVED.append(("reward", torch.device(device), dtype))
    return drpo.brightness_reward


def features_factory(device, dtype):
    RECEIVED.append(("features", torch.device(device), dtype))
    return drpo.load_features("latent")


def test_factories_get_the_runs_device_and_dtype_and_a_plain_function_is_itself(tiny, tmp_path):
    RECEIVED.clear()
    argv = ("--reward-device", "cpu", "--reward-precision", "bf16", "--max-steps", "2", "--sample-every", "0")
    assert run(tiny, tmp_path / "f", *argv, "--features", "test_drpo:features_factory()",
               reward="test_drpo:reward_factory()") == 0
    assert sorted(RECEIVED, key=str) == [("features", torch.device("cpu"), torch.float32),  # each called once
                                         ("reward", torch.device("cpu"), torch.bfloat16)]
    assert run(tiny, tmp_path / "b", *argv, "--features", "latent") == 0  # the built-in reward and map
    assert same_lora(tmp_path / "f", tmp_path / "b")


def test_an_error_in_the_users_code_keeps_its_traceback_and_one_in_the_input_is_one_line(tiny, tmp_path):
    (tmp_path / "usermod.py").write_text("def score(images, prompts):\n    return helper(images)\n\n\n"
                                         "def helper(images):\n    return [1 / 0 for _ in images]\n")
    (tmp_path / "badimport.py").write_text("x = 1\nundefined_name + 1\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    base = [sys.executable, str(Path(__file__).resolve().parent / "drpo.py"), "--model", tiny, "--candidates", "4",
            "--n-pos", "1", "--n-neg", "1", "--max-steps", "1", "--eval-every", "0", "--sample-every", "0"]
    done = subprocess.run([*base, "--reward", "usermod:score", "--output-dir", str(tmp_path / "a")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1, done.stderr
    assert f'File "{tmp_path / "usermod.py"}", line 6, in helper' in done.stderr  # the user's own line
    assert "UserCodeError: --reward usermod:score raised ZeroDivisionError: division by zero" in done.stderr
    done = subprocess.run([*base, "--features", "badimport:phi", "--output-dir", str(tmp_path / "b")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1 and f'File "{tmp_path / "badimport.py"}", line 2' in done.stderr, done.stderr
    assert "importing badimport raised NameError" in done.stderr
    done = subprocess.run([*base, "--reward", "usermod:scor", "--output-dir", str(tmp_path / "c")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == "error: --reward usermod:scor: usermod has no function 'scor'; name one of its " \
                                  "functions after the colon"


def test_train_called_from_python_checks_its_settings_first(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(drpo, "load_generator", lambda *a, **k: pytest.fail("loaded a model before the check"))
    with pytest.raises(ValueError, match="--lora-targets: 'to_zz' names no Linear"):
        drpo.train(drpo.build_parser().parse_args(["--model", tiny, "--lora-targets", "to_zz",
                                                   "--output-dir", str(tmp_path / "x")]))
    monkeypatch.undo()
    args = drpo.build_parser().parse_args(["--model", tiny, "--reward", "brightness", "--candidates", "4", "--n-pos",
                                           "1", "--n-neg", "1", "--max-steps", "1", "--grad-accum", "1",
                                           "--output-dir", str(tmp_path / "o")])  # --reward, --eval-every: unset
    assert drpo.train(args) is None
    assert (tmp_path / "o" / "pytorch_lora_weights.safetensors").is_file() and args.eval_every == 25


def test_the_heldout_prompts_are_none_of_the_built_in_training_prompts():
    import eval as ev

    train, held = drpo.read_prompts(None), drpo.read_prompts(ev.HELDOUT)
    assert len(train) == 16 and len(held) == 32 and not set(train) & set(held)


# ---------------------------------------------------------------- rewards served elsewhere ----------

def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url, proc, seconds):
    """Poll url until it answers 200; fail with the server's output if it exits or takes longer."""
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"{url} did not answer within {seconds} s")


@contextlib.contextmanager
def server_process(argv, health, seconds=90):
    """A real server process on 127.0.0.1 at a port picked here (argv's {port}), yielding its base URL; stopped, with
    every process it started, in finally."""
    port = free_port()
    proc = subprocess.Popen([a.format(port=port) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, cwd=Path(__file__).resolve().parent,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                                str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH")]))})
    try:
        wait_for(f"http://127.0.0.1:{port}{health}", proc, seconds)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(15)


def reward_service(spec, *extra):
    return server_process([sys.executable, "-m", "rewards.serve", "--reward", spec, "--port", "{port}",
                           "--accelerator", "cpu", "--devices", "1", *extra], "/health")


@contextlib.contextmanager
def scripted_vlm(**script):
    """examples/scripted_vlm.py's server in a thread, on a port the OS picks: (its /v1 URL, its state)."""
    import threading

    from examples import scripted_vlm as sv

    server = sv.make_server(0, **script)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", server.state
    finally:
        server.shutdown()
        server.server_close()


def grey_images(*levels):
    from PIL import Image

    return [Image.new("RGB", (16, 16), (v, v, v)) for v in levels]


def test_a_served_reward_trains_the_bitwise_same_lora_and_evaluates_the_same(tiny, tmp_path):
    import eval as ev

    with reward_service("brightness") as url:
        assert run(tiny, tmp_path / "served", "--max-steps", "2", "--sample-every", "0", reward=url) == 0
        assert ev.main(["--lora", str(tmp_path / "served"), "--reward", url, "--max-prompts", "2", "--seeds", "2",
                        "--out", str(tmp_path / "eval_served")]) == 0
    assert run(tiny, tmp_path / "local", "--max-steps", "2", "--sample-every", "0") == 0
    assert same_lora(tmp_path / "served", tmp_path / "local")
    assert [m["reward_mean"] for m in metrics_of(tmp_path / "served")] == \
        [m["reward_mean"] for m in metrics_of(tmp_path / "local")]
    assert ev.main(["--lora", str(tmp_path / "served"), "--reward", "brightness", "--max-prompts", "2", "--seeds", "2",
                    "--out", str(tmp_path / "eval_local")]) == 0
    served = (tmp_path / "eval_served" / "scores.csv").read_text().replace(url, "brightness")
    assert served == (tmp_path / "eval_local" / "scores.csv").read_text()


def test_the_reward_service_batches_clients_scores_as_in_process_and_refuses_bad_requests(tmp_path):
    import base64
    import concurrent.futures
    import io
    import urllib.error
    import urllib.request

    from rewards import remote

    spec = "brightness,jpeg:0.5"  # an ensemble: z-scored over each request alone, as over each call in process
    local = drpo.load_reward(spec)
    calls = [(grey_images(*range(10 * i, 10 * i + 5 + i)), [f"prompt {i}"] * (5 + i)) for i in range(6)]
    with reward_service(spec, "--max-batch-size", "4", "--batch-timeout", "0.2") as url:
        reward = remote.served_reward(url)
        with concurrent.futures.ThreadPoolExecutor(6) as pool:  # six trainers at once: batched on the server
            got = list(pool.map(lambda c: reward(*c), calls))
        for (images, prompts), scores in zip(calls, got):
            assert torch.allclose(scores, local(images, prompts), atol=1e-6, rtol=0)

        def status(body):
            request = urllib.request.Request(url + "/score", body, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=30) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        buf = io.BytesIO()
        grey_images(9)[0].save(buf, format="JPEG")
        jpeg = base64.b64encode(buf.getvalue()).decode()
        png = remote.png_b64(grey_images(9)[0])
        for body, reason in [(b"not json", "JSON decode error"),
                             (json.dumps({"prompts": ["a"], "images": ["@@@"]}).encode(), "not base64 PNG data"),
                             (json.dumps({"prompts": ["a"], "images": [jpeg]}).encode(), "is JPEG, not PNG"),
                             (json.dumps({"prompts": ["a"], "images": [png[:60]]}).encode(), "damaged PNG"),
                             (json.dumps({"prompts": ["a", "b"], "images": [png]}).encode(), "one prompt per image"),
                             (json.dumps({"prompts": ["a"] * 257, "images": [png] * 257}).encode(), "1 to 256 images"),
                             (json.dumps({"images": [png]}).encode(), "prompts")]:
            code, text = status(body)
            assert 400 <= code < 500 and reason in text, (code, text[:300])
        code, text = status(json.dumps({"prompts": ["a"] * 2, "images": [png, remote.png_b64(grey_images(90)[0])]}
                                       ).encode())  # and it still serves
        assert code == 200 and torch.allclose(torch.tensor(json.loads(text)["scores"]),
                                              local(grey_images(9, 90), ["a"] * 2), atol=1e-6, rtol=0)


def poison_reward(images, prompts):
    """Mean brightness (without a float copy of the pixels, so that the worker's memory is the service's), but NaN for
    the prompt "nan", an error for "raise", and the worker's death for "die"."""
    if "die" in prompts:
        os._exit(1)
    if "raise" in prompts:
        raise RuntimeError("a bug in the reward")
    from PIL import ImageStat

    scores = torch.tensor([sum(ImageStat.Stat(im).mean) / 765 for im in images])  # no copy of the pixels
    return torch.where(torch.tensor([p == "nan" for p in prompts]), torch.nan, scores)


def png_declaring(width, height):
    """A valid 1x1 PNG whose header says width x height: what a decompression bomb looks like before decoding."""
    import base64
    import io
    import struct
    import zlib

    buf = io.BytesIO()
    grey_images(0)[0].resize((1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # type + 13 bytes of IHDR
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return base64.b64encode(bytes(data)).decode()


def peak_rss_mb(pid):
    """The largest peak resident memory among pid's descendants (the workers decode), in MB."""
    import psutil

    peaks = []
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(OSError, psutil.Error):
            status = Path(f"/proc/{child.pid}/status").read_text()
            peaks.append(int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 1024)
    return max(peaks)


def test_the_reward_service_survives_what_one_request_can_do(tmp_path):
    """Started for real on 127.0.0.1: a decompression bomb, requests past and at the pixel cap, one client's poisoned
    request batched with another's, a reward that raises, a worker that dies and a body that never ends each get
    their own answer, the others are scored as in process, the workers' memory stays within a stated bound, and a
    valid request is answered correctly afterwards. SIGTERM then stops the server with all its processes."""
    import concurrent.futures
    import socket
    import urllib.error
    import urllib.request

    import psutil
    from PIL import Image

    from rewards import remote, serve

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rewards.serve", "--reward", "test_drpo:poison_reward", "--port",
                             str(port), "--accelerator", "cpu", "--devices", "1", "--max-batch-size", "4",
                             "--batch-timeout", "1", "--body-timeout", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            cwd=Path(__file__).resolve().parent,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)})
    url = f"http://127.0.0.1:{port}"

    def post(prompts, images, timeout=60):
        body = json.dumps({"prompts": prompts, "images": images}).encode()
        request = urllib.request.Request(url + "/score", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    grey = grey_images(20, 200)
    pngs, expected = [remote.png_b64(im) for im in grey], poison_reward(grey, ["a", "b"]).tolist()
    try:
        wait_for(url + "/health", proc, 90)
        assert post(["a", "b"], pngs) == (200, {"scores": expected})
        baseline = peak_rss_mb(proc.pid)
        # a bomb, and requests past and at the pixel cap: 4xx before decoding, or scored
        code, answer = post(["a"], [png_declaring(100_000, 100_000)])
        assert code == 422 and "images[0] declares too many pixels" in answer["detail"], answer
        big = remote.png_b64(Image.new("RGB", (4096, 4096)))
        code, answer = post(["a"] * 32, [big] * 32)
        assert code == 422 and f"more than {serve.MAX_PIXELS} pixels" in answer["detail"], answer
        assert post(["a", "a"], [big] * 2) == (200, {"scores": [0.0, 0.0]})  # exactly MAX_PIXELS
        # the bound docs/rewards.md states: decoding a request costs at most 5 bytes a pixel of MAX_PIXELS (160 MB)
        assert peak_rss_mb(proc.pid) - baseline < 5 * serve.MAX_PIXELS / 2 ** 20, (baseline, peak_rss_mb(proc.pid))
        # one client's poisoned request batched with another's: each answered alone
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for bad, status, reason in (("nan", 422, "returned NaN or infinite scores"),
                                        ("raise", 500, "the reward raised UserCodeError")):
                poisoned, fine = pool.submit(post, [bad, bad], pngs), pool.submit(post, ["a", "b"], pngs)
                code, answer = poisoned.result()
                assert code == status and reason in answer["detail"] and "scores" not in answer, answer
                assert fine.result() == (200, {"scores": expected})
        # a body that never ends: 408 after --body-timeout, while /health answers
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"prompts\"")
            with urllib.request.urlopen(url + "/health", timeout=5) as answer:
                assert answer.read() == b"ok"
            assert slow.recv(200).startswith(b"HTTP/1.1 408")
        # a worker that dies: its request fails, the worker is restarted, the server goes on
        code, _ = post(["die"], pngs[:1])
        assert code == 500
        deadline = time.monotonic() + 120
        while (answer := post(["a", "b"], pngs)) != (200, {"scores": expected}) and time.monotonic() < deadline:
            time.sleep(1)
        assert answer == (200, {"scores": expected}) and proc.poll() is None
        # SIGTERM to the server alone: every process it started ends with it
        family = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0
        gone, alive = psutil.wait_procs(family, timeout=30)
        assert not alive, alive
        output = proc.stdout.read()
        assert "ready on http://127.0.0.1" in output and "Traceback" not in output, output[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(15)


def test_ctrl_c_stops_the_reward_service_whole_without_tracebacks(tmp_path):
    import psutil

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rewards.serve", "--reward", "brightness", "--port", str(port),
                             "--accelerator", "cpu", "--devices", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            cwd=Path(__file__).resolve().parent)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", proc, 90)
        family = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to every process of the group
        assert proc.wait(60) == 0
        assert not psutil.wait_procs(family, timeout=30)[1]
        output = proc.stdout.read()
        assert "Traceback" not in output and output.count("\n") < 10, output
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(15)


def test_a_reward_service_that_is_down_stops_the_run_naming_the_url(tiny, tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    assert run(tiny, tmp_path / "down", "--reward-retry", "2", reward=url) == 2
    assert time.monotonic() - start < 60
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: the reward service at {url} did not answer for 2 s") and "--resume" in err


def test_rewards_serve_refuses_what_it_cannot_serve(tmp_path, capsys):
    from rewards import serve

    for argv, message in [(["--reward", "vlm"], "--reward vlm is already a service"),
                          (["--reward", "http://127.0.0.1:9"], "--reward http://127.0.0.1:9 is already a service"),
                          (["--reward", "nope"], "unknown reward 'nope'"),
                          (["--reward", "brightness", "--max-batch-size", "0"], "--max-batch-size must be at least 1"),
                          (["--reward", "brightness", "--devices", "two"], "--devices must be a number or auto"),
                          (["--reward", "geneval"], "--reward geneval needs --prompts evaluation_metadata.jsonl"),
                          (["--reward", "brightness", "--hpsv3-ckpt", str(tmp_path / "x")], "--hpsv3-ckpt is a weight "
                           "file of the hpsv3 reward, which no --reward uses")]:
        assert serve.main(argv) == 2
        assert capsys.readouterr().err.strip().startswith(f"error: {message}"), argv


def test_vlm_compares_each_candidate_with_the_anchor_in_both_orders():
    from rewards import vlm

    with scripted_vlm() as (url, state):  # prefers the brighter image
        reward = vlm.vlm_reward(url, "scripted")
        scores = reward(grey_images(100, 50, 150, 100, 200) + grey_images(10, 20), ["a"] * 5 + ["b"] * 2)
        assert scores.tolist() == [0.5, 0.0, 1.0, 0.5, 1.0, 0.5, 1.0]  # anchors: the first image of each prompt
        assert reward.counts() == {"vlm_requests": 2 * 4 + 2 * 1, "vlm_invalid": 0} == {
            "vlm_requests": state["requests"], "vlm_invalid": 0}
        assert reward.counts() == {"vlm_requests": 0, "vlm_invalid": 0}  # taken: counted per update
        rating = vlm.vlm_reward(url, "scripted", mode="rating")
        assert torch.allclose(rating(grey_images(51, 102), ["a", "a"]), torch.tensor([2.0, 4.0]))
    with scripted_vlm(answer='{"winner": "A", "confidence": 0.9, "reason": "first"}') as (url, state):
        reward = vlm.vlm_reward(url, "scripted")  # pure position bias: the orders disagree, nobody wins
        assert reward(grey_images(100, 50, 150), ["a"] * 3).tolist() == [0.5, 0.5, 0.5]
        assert reward.counts()["vlm_invalid"] == 0


@pytest.mark.parametrize("answer", ["not json", '{"winner": "A", "confidence": 0.9, "rea', '{"winner": "maybe"}',
                                    '{"score": 11}'])
def test_vlm_invalid_answers_are_asked_again_then_neutral(answer):
    from rewards import vlm

    with scripted_vlm(answer=answer) as (url, state):
        pairwise = vlm.vlm_reward(url, "scripted")
        assert pairwise(grey_images(100, 50, 150), ["a"] * 3).tolist() == [0.5, 0.5, 0.5]
        assert pairwise.counts() == {"vlm_requests": 8, "vlm_invalid": 4}  # 4 questions, each asked twice
        rating = vlm.vlm_reward(url, "scripted", mode="rating")
        assert rating(grey_images(100, 50), ["a"] * 2).tolist() == [5.0, 5.0]  # none valid: the scale's middle
    with scripted_vlm(invalid_first=1) as (url, state):  # the first answer invalid, its second asking valid
        rating = vlm.vlm_reward(url, "scripted", mode="rating", reward_concurrency=1)
        assert torch.allclose(rating(grey_images(51, 102), ["a"] * 2), torch.tensor([2.0, 4.0]))
        assert rating.counts() == {"vlm_requests": 3, "vlm_invalid": 0}
    with scripted_vlm(answer='{"score": 4}', invalid_first=2) as (url, state):
        rating = vlm.vlm_reward(url, "scripted", mode="rating", reward_concurrency=1)
        assert rating(grey_images(51, 102, 153), ["a"] * 3).tolist() == [4.0, 4.0, 4.0]  # invalid -> the valid mean
        assert rating.counts() == {"vlm_requests": 4, "vlm_invalid": 1}


def test_vlm_retries_a_failing_server_and_stops_on_one_that_stays_down():
    from rewards import vlm

    with scripted_vlm(fail_first=3) as (url, state):  # 503 three times, then answers
        reward = vlm.vlm_reward(url, "scripted", reward_concurrency=1)
        assert reward(grey_images(100, 150), ["a"] * 2).tolist() == [0.5, 1.0]
        assert state["requests"] == 5
    url = f"http://127.0.0.1:{free_port()}/v1"
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=re.escape(f"the VLM server at {url} did not answer for")):
        vlm.vlm_reward(url, "scripted", reward_retry=2)(grey_images(100, 150), ["a"] * 2)
    assert 1 < time.monotonic() - start < 10
    with scripted_vlm(fail_after=0) as (url, state):  # 503 forever; 46 questions, 4 at a time
        with pytest.raises(ConnectionError, match=re.escape(f"the VLM server at {url} did not answer for")):
            vlm.vlm_reward(url, "scripted", reward_retry=1, reward_concurrency=4)(grey_images(*range(24)), ["a"] * 24)
        sent = state["requests"]
        time.sleep(2)  # once one request gives up, the queued ones do not take their turn at the server
        assert state["requests"] <= sent + 4 and sent <= 4 * 3


def test_vlm_requests_of_a_call_are_in_flight_together_up_to_the_concurrency():
    from rewards import vlm

    images = grey_images(*range(100, 108))  # 7 candidates against the anchor: 14 requests
    with scripted_vlm(latency=0.3) as (url, state):
        reward = vlm.vlm_reward(url, "scripted", reward_concurrency=16)
        reward(images[:2], ["a"] * 2)  # the client's first request sets up its connection pool
        start = time.monotonic()
        reward(images, ["a"] * 8)
        assert time.monotonic() - start < 4 * 0.3 and state["max_in_flight"] == 14  # one latency or so, not 14
    with scripted_vlm(latency=0.1) as (url, state):
        vlm.vlm_reward(url, "scripted", reward_concurrency=2)(images, ["a"] * 8)
        assert state["max_in_flight"] <= 2


def test_vlm_training_logs_its_requests_and_never_writes_the_key(tiny, tmp_path, monkeypatch, capfd):
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("MY_VLM_KEY", secret)
    (tmp_path / "held.txt").write_text("a lighthouse\na red barn\n")
    with scripted_vlm() as (url, state):
        assert run(tiny, tmp_path / "vlm", "--reward-url", url, "--reward-model", "scripted", "--reward-api-key-env",
                   "MY_VLM_KEY", "--max-steps", "2", "--eval-every", "2", "--eval-seeds", "1",
                   "--eval-prompts", str(tmp_path / "held.txt"), reward="vlm") == 0
        assert state["authorization"] == f"Bearer {secret}"  # sent to the server, and only there
    rows = metrics_of(tmp_path / "vlm")
    train = [m for m in rows if "reward_mean" in m]
    assert [m["vlm_requests"] for m in train] == [2 * 2 * 7] * 2 and all(m["vlm_invalid"] == 0 for m in train)
    assert any("eval/vlm-rating" in m for m in rows)  # the watch rates with the same server
    out = capfd.readouterr()
    assert secret not in out.out + out.err
    for f in (tmp_path / "vlm").rglob("*"):
        assert not f.is_file() or secret.encode() not in f.read_bytes(), f
    assert json.loads((tmp_path / "vlm" / "config.json").read_text())["reward_api_key_env"] == "MY_VLM_KEY"


def test_a_vlm_server_that_goes_down_mid_run_stops_it_and_resume_continues_exactly(tiny, tmp_path, capsys):
    common = ("--reward-model", "scripted", "--max-steps", "4", "--save-every", "1", "--sample-every", "0",
              "--reward-retry", "1")
    with scripted_vlm() as (url, _):
        assert run(tiny, tmp_path / "full", "--reward-url", url, *common, reward="vlm") == 0
    with scripted_vlm(fail_after=2 * 28 + 5) as (url, _):  # 28 requests per update: down during update 3
        assert run(tiny, tmp_path / "cut", "--reward-url", url, *common, reward="vlm") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert f"error: the VLM server at {url} did not answer for" in err and err.endswith("continue it with --resume")
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 2
    with scripted_vlm() as (url, _):  # back, at another address: the URL may change on --resume
        assert run(tiny, tmp_path / "cut", "--reward-url", url, *common, "--resume", reward="vlm") == 0
    assert metrics_of(tmp_path / "cut") == metrics_of(tmp_path / "full")
    assert same_lora(tmp_path / "cut", tmp_path / "full")


def test_sigterm_while_vlm_requests_are_in_flight_stops_at_the_next_micro_step(tiny, tmp_path, monkeypatch, capsys):
    from examples import scripted_vlm as sv

    rule, answered = sv.rule, []

    def rule_then_signal(content):  # the server (a thread of this process) sends SIGTERM in update 2's first micro-step
        answered.append(1)
        if len(answered) == 28 + 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return rule(content)

    monkeypatch.setattr(sv, "rule", rule_then_signal)
    with scripted_vlm(latency=0.01) as (url, _):
        assert run(tiny, tmp_path / "cut", "--reward-url", url, "--reward-model", "scripted", "--max-steps", "4",
                   "--sample-every", "0", reward="vlm") == 143
    # the micro-step in flight ends with its requests answered; update 2 is then dropped, update 1 saved
    assert "stopped by SIGTERM after update 1" in capsys.readouterr().err
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 1


def test_vlm_reward_runs_under_torchrun_as_in_one_process(tiny, tmp_path):
    common = ["--model", tiny, "--reward", "vlm", "--reward-model", "scripted", "--candidates", "8", "--n-pos", "3",
              "--n-neg", "3", "--lr", "1e-2", "--seed", "0", "--sample-every", "0", "--max-steps", "2",
              "--eval-every", "0"]
    with scripted_vlm() as (url, state):  # both processes send to the one server
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as each torchrun worker
        try:
            assert drpo.main(common + ["--reward-url", url, "--grad-accum", "2", "--output-dir",
                                       str(tmp_path / "one")]) == 0
        finally:
            torch.set_num_threads(threads)
        r = torchrun(*common, "--reward-url", url, "--grad-accum", "1", "--output-dir", str(tmp_path / "two"))
        assert r.returncode == 0, r.stderr[-3000:]
        assert state["requests"] == 2 * 2 * 2 * (2 * 7)  # 2 runs x 2 updates x 2 micro-steps x 14 questions
    one, two = metrics_of(tmp_path / "one"), metrics_of(tmp_path / "two")
    for a, b in zip(one, two):
        assert a["vlm_requests"] == b["vlm_requests"] == 28
        for key in ("reward_mean", "pos_mean", "neg_mean", "loss_pref", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key


def test_transformers_serve_with_a_tiny_vlm_answers_the_vlm_reward(tmp_path):
    from rewards import vlm

    folder = tiny_model.make_tiny_llava(tmp_path / "llava")
    cli = Path(sys.executable).parent / "transformers"
    with server_process([str(cli), "serve", "--host", "127.0.0.1", "--port", "{port}"], "/health", 120) as url:
        for mode in ("pairwise", "rating"):
            reward = vlm.vlm_reward(url + "/v1", str(folder), mode=mode, max_tokens=8)
            scores = reward(grey_images(100, 50, 150), ["a red barn"] * 3)
            counts = reward.counts()  # a random model's answers: mostly invalid, each asked twice
            questions = 4 if mode == "pairwise" else 3
            assert questions <= counts["vlm_requests"] <= 2 * questions
            assert counts["vlm_invalid"] <= counts["vlm_requests"] - questions  # invalid: asked twice
            assert scores.shape == (3,) and torch.isfinite(scores).all()


def test_torchrun_processes_share_one_reward_service_and_train_as_in_process(tiny, tmp_path):
    common = ["--model", tiny, "--candidates", "8", "--n-pos", "3", "--n-neg", "3", "--lr", "1e-2", "--seed", "0",
              "--sample-every", "0", "--max-steps", "2", "--eval-every", "0", "--grad-accum", "1"]
    with reward_service("brightness") as url:
        r = torchrun(*common, "--reward", url, "--output-dir", str(tmp_path / "served"))
        assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(*common, "--reward", "brightness", "--output-dir", str(tmp_path / "local"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert metrics_of(tmp_path / "served") == metrics_of(tmp_path / "local")
    assert same_lora(tmp_path / "served", tmp_path / "local")


def test_eval_rates_each_image_with_a_vlm_server(tiny, tmp_path):
    import csv

    import eval as ev

    common = ["--model", tiny, "--max-prompts", "2", "--seeds", "2"]
    with scripted_vlm() as (url, _):  # rates 10 x brightness
        assert ev.main([*common, "--reward", "vlm-rating", "--reward-url", url, "--reward-model", "scripted",
                        "--out", str(tmp_path / "vlm")]) == 0
    assert ev.main([*common, "--reward", "brightness", "--out", str(tmp_path / "b")]) == 0
    rated, bright = ([float(r[key]) for r in csv.DictReader(open(tmp_path / d / "scores.csv"))]
                     for d, key in (("vlm", "vlm-rating"), ("b", "brightness")))
    assert len(rated) == 4 and rated == pytest.approx([10 * b for b in bright], abs=1e-3)


def test_the_service_client_retries_busy_answers_and_names_refusals():
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from rewards import remote

    answers = [(503, b"busy"), (429, b"slow down"), (200, b'{"scores": [0.25]}'), (400, b"images[0] is JPEG")]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            code, body = answers.pop(0)
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/score"
    try:
        start = time.monotonic()
        assert json.loads(remote.post_json(url, {"x": 1}, 10, 20, "the service")) == {"scores": [0.25]}
        assert 1.4 < time.monotonic() - start < 5  # waited 0.5 s, then 1 s
        with pytest.raises(ValueError, match="the service refused the request: HTTP 400 images\\[0\\] is JPEG"):
            remote.post_json(url, {"x": 1}, 10, 20, "the service")
        answers.extend([(503, b"busy")] * 10)
        start = time.monotonic()
        with pytest.raises(ConnectionError, match=r"the service did not answer for \d+ s \(last: HTTP 503\)"):
            remote.post_json(url, {"x": 1}, 10, 3, "the service")
        assert time.monotonic() - start < 4  # gave up within the retry time
    finally:
        server.shutdown()
        server.server_close()


def test_the_service_serves_a_ported_reward_with_its_weight_files_and_your_own_function(tmp_path, monkeypatch):
    from PIL import Image

    from rewards import remote

    exp = json.loads((HPS / "expected.json").read_text())
    images = [Image.open(HPS / p) for p in exp["images"]]
    (tmp_path / "usermod.py").write_text("import numpy, torch\n\ndef darkness(images, prompts):\n"
                                         "    return torch.tensor([-float(numpy.asarray(im.convert('L')).mean()) for im "
                                         "in images])\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the server imports usermod
    paths = ["--hpsv3-ckpt", str(HPS / "HPSv3.safetensors"), "--hpsv3-base", str(HPS / "base")]
    with reward_service("hpsv3", *paths, "--reward-batch", "4") as url:  # the published scores, through HTTP
        scores = remote.served_reward(url)(images, exp["prompts"])
    torch.testing.assert_close(scores, torch.tensor([s[0] for s in exp["scores_batch"]]), rtol=0, atol=2e-5)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = "hpsv3,usermod:darkness:0.5"
    with reward_service(spec, *paths) as url:
        served = remote.served_reward(url)(images, exp["prompts"])
    local = drpo.load_reward(spec, hpsv3_ckpt=HPS / "HPSv3.safetensors", hpsv3_base=HPS / "base")
    torch.testing.assert_close(served, local(images, exp["prompts"]), rtol=0, atol=1e-5)


# One 24 GB card (memory.py): exact levers give bitwise the same run; quantized frozen weights train a LoRA for the
# full-precision base.


def metric_rows(folder):
    """metrics.jsonl's rows without their timings."""
    rows = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in ("seconds", "phases_s")} for row in rows]


def assert_same_run(a, b):
    """Two run folders with bitwise the same LoRA and the same metrics, held-out ones included."""
    la, lb = load_file(Path(a) / "pytorch_lora_weights.safetensors"), load_file(Path(b) / "pytorch_lora_weights.safetensors")
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    assert max(v.abs().max().item() for k, v in la.items() if "lora_B" in k or "lora.up" in k) > 0  # it trained
    assert metric_rows(a) == metric_rows(b)


def test_a_prompts_conditioning_does_not_depend_on_its_batch_mates(tiny_sdxl, tiny_sd3):
    # batched, SDXL's and SD3's pooled text projections differ from one prompt's in the last bit; by_prompt
    # encodes one at a time, which is what lets --cache-conditioning keep each prompt's rows
    for folder in (tiny_sdxl, tiny_sd3):
        model = drpo.load_generator(folder)
        both = model.conditioning(["a red cube", "two cats on a sofa"], 64)
        one = [model.conditioning([p], 64) for p in ("a red cube", "two cats on a sofa")]
        flat = lambda c: [v for x in c.values() for v in (flat(x) if isinstance(x, dict) else [x])]
        for i, rows in enumerate(one):
            assert all(torch.equal(b[i:i + 1], r) for b, r in zip(flat(both), flat(rows)))


def test_cached_conditioning_encodes_each_prompt_once_and_moves_the_text_encoders_off(tiny_sdxl, monkeypatch):
    import memory
    model = drpo.load_generator(tiny_sdxl)
    prompts = ["a red cube", "two cats on a sofa", "a red cube"]
    before = model.conditioning(prompts, 64)
    memory.cache_conditioning(model, prompts, 64)
    assert set(model.conditioning.cache) == {("a red cube", 64), ("two cats on a sofa", 64)}
    for name in ("text_encoder", "text_encoder_2"):  # no prompt is encoded again
        monkeypatch.setattr(getattr(model.pipe, name), "forward", lambda *a, **k: pytest.fail("encoded again"))
    after = model.conditioning(prompts, 64)
    assert after.keys() == before.keys() and torch.equal(after["encoder_hidden_states"], before["encoder_hidden_states"])
    assert all(torch.equal(after["added_cond_kwargs"][k], v) for k, v in before["added_cond_kwargs"].items())


@pytest.mark.parametrize("arch", ["sd", *FLOW_FAMILIES])
def test_cache_conditioning_gives_bitwise_the_same_run_and_held_out_evaluation(request, tmp_path, arch):
    tiny, steps = family(request, arch)
    (tmp_path / "held.txt").write_text("a lighthouse at dusk\na bowl of soup\nan old bicycle\n")
    common = [*steps, "--prompts-per-step", "2", "--max-steps", "2", "--grad-accum", "1", "--eval-every", "1",
              "--eval-prompts", str(tmp_path / "held.txt"), "--eval-seeds", "2", "--sample-every", "1"]
    assert run(tiny, tmp_path / "plain", *common) == 0
    assert run(tiny, tmp_path / "cached", *common, "--cache-conditioning") == 0
    assert_same_run(tmp_path / "plain", tmp_path / "cached")
    assert "eval/brightness" in metric_rows(tmp_path / "cached")[-1]
    grids = sorted((tmp_path / "plain" / "samples").glob("*.png"))
    assert grids and all((tmp_path / "cached" / "samples" / g.name).read_bytes() == g.read_bytes() for g in grids)


def test_cache_conditioning_under_torchrun_is_the_same_run(tiny, tmp_path):
    common = ["--model", tiny, "--reward", "brightness", "--candidates", "8", "--n-pos", "3", "--n-neg", "3",
              "--grad-accum", "1", "--max-steps", "2", "--lr", "1e-2", "--seed", "0", "--sample-every", "0",
              "--eval-every", "1", "--eval-seeds", "2"]
    for name, extra in (("plain", []), ("cached", ["--cache-conditioning"])):
        r = torchrun(*common, *extra, "--output-dir", str(tmp_path / name))
        assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(tmp_path / "plain", tmp_path / "cached")


@pytest.mark.parametrize("arch", ["sd", "flux"])
def test_int8_base_trains_and_its_lora_loads_into_the_stock_full_precision_pipeline(request, tmp_path, arch):
    from torchao.quantization import Int8Tensor
    tiny, steps = family(request, arch)
    model = drpo.load_generator(tiny, quantize="int8")
    linears = [m for m in model.net.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m.weight, Int8Tensor) for m in linears)  # every Linear of the network
    assert run(tiny, tmp_path / "q", *steps, "--quantize", "int8", "--max-steps", "3", "--lr", "1e-2") == 0
    lora = load_file(tmp_path / "q" / "pytorch_lora_weights.safetensors")
    assert max(v.abs().max().item() for k, v in lora.items() if "lora_B" in k or "lora.up" in k) > 1e-4
    plain, tuned = pipeline(tiny), pipeline(tiny, tmp_path / "q")  # the stock pipeline, not quantized
    net = tuned.unet if arch == "sd" else tuned.transformer
    assert not any(type(p) is not torch.nn.Parameter for p in net.parameters())  # full precision
    call = dict(num_inference_steps=1, output_type="latent", generator=torch.Generator().manual_seed(0),
                **(dict(guidance_scale=0.0) if arch == "sd" else dict(height=128, width=128)))
    a = plain("a red cube", **call).images
    b = tuned("a red cube", **{**call, "generator": torch.Generator().manual_seed(0)}).images
    assert (a - b).abs().max() > 1e-4  # the LoRA acts on the full-precision base


@pytest.mark.parametrize("argv,match", [
    (["--quantize", "nf4"], "needs a CUDA GPU"),
    (["--reward-quantize", "int8"], "has no reward network to quantize"),
    (["--reward-quantize", "int8", "--reward", "http://127.0.0.1:9"], "served by another process"),
    (["--offload"], "--offload: brightness has no reward network to offload"),
    (["--offload", "--reward", "vlm", "--reward-url", "http://127.0.0.1:9/v1", "--reward-model", "m"],
     "--offload: vlm is served by another process"),
    (["--offload", "--reward", "test_drpo:offload_probe()"], "--offload: nothing to offload, the reward runs on the "
                                                             "CPU"),
    (["--offload", "--reward", "test_drpo:offload_probe()", "--reward-quantize", "int8"], "choose one"),
])
def test_impossible_memory_levers_are_refused_before_anything_loads(tiny, tmp_path, capsys, argv, match):
    start = time.monotonic()
    assert run(tiny, tmp_path / "o", *argv) == 2
    assert match in capsys.readouterr().err and time.monotonic() - start < 5
    assert not (tmp_path / "o" / "config.json").exists()


OFFLOAD_SEEN, OFFLOAD_NETS = [], []


def offload_probe(device, dtype):
    """Your own reward with a .networks tuple: it keeps the weight it finds at each batch it scores."""
    net = torch.nn.Linear(3, 1)

    def score(images, prompts):
        OFFLOAD_SEEN.append(net.weight)
        return [float(i) for i in range(len(images))]
    score.networks = (net,)
    OFFLOAD_NETS[:] = [net]
    return score


def test_offload_keeps_the_weights_on_the_host_but_while_the_reward_scores():
    # the "device" is PyTorch's meta device: this CPU has no other, and the weights' place is what is tested
    import memory
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    seen = []
    run = memory.offload(lambda: seen.append({t.device.type for t in net.state_dict().values()}), (net,), "meta")
    host = [t.data_ptr() for t in net.state_dict().values()]
    run()
    with run.on_device():  # held across calls: the calls' own ends leave the weights where they are
        run()
        assert {t.device.type for t in net.state_dict().values()} == {"meta"}
        run()
    assert seen == [{"meta"}] * 3
    after = net.state_dict()
    assert [t.data_ptr() for t in after.values()] == host  # back on the very host copy: leaving copies nothing
    assert all(torch.equal(after[k], v) for k, v in before.items())
    with pytest.raises(ZeroDivisionError), run.on_device():
        1 / 0
    assert {t.device.type for t in net.state_dict().values()} == {"cpu"}


def test_offloaded_reward_scores_each_call_with_its_weights_brought_once():
    OFFLOAD_SEEN.clear()
    reward = drpo.load_reward("test_drpo:offload_probe()", "meta", batch_size=2, offload=True)
    assert {p.device.type for p in OFFLOAD_NETS[0].parameters()} == {"cpu"}
    assert reward([None] * 5, ["a"] * 5).tolist() == [0, 1, 0, 1, 0]  # 3 batches of one call, all on the device
    assert [w.device.type for w in OFFLOAD_SEEN] == ["meta"] * 3
    assert all(w is OFFLOAD_SEEN[0] for w in OFFLOAD_SEEN)  # one copy to the device for the whole call
    assert {p.device.type for p in OFFLOAD_NETS[0].parameters()} == {"cpu"}


def test_a_missing_quantization_package_is_one_line_before_loading(tiny, tmp_path, capsys, monkeypatch):
    import memory
    real = importlib.util.find_spec
    monkeypatch.setattr(memory.importlib.util, "find_spec", lambda name: None if name == "torchao" else real(name))
    assert run(tiny, tmp_path / "o", "--quantize", "int8") == 2
    assert "pip install -r requirements-quant.txt" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["hpsv3", "imagereward"])
def test_quantized_reward_keeps_its_scores_close_on_the_tiny_checkpoints(name):
    from PIL import Image
    from torchao.quantization import Int8Tensor
    paths = (dict(hpsv3_ckpt=HPS / "HPSv3.safetensors", hpsv3_base=HPS / "base") if name == "hpsv3" else
             dict(imagereward_ckpt=IR / "ImageReward_tiny.pt", imagereward_config=IR / "med_config.json",
                  imagereward_tokenizer=IR / "tokenizer"))
    exp = json.loads(((HPS if name == "hpsv3" else IR) / "expected.json").read_text())
    images = [Image.open((HPS if name == "hpsv3" else IR) / p) for p in exp["images"]]
    prompts = exp["prompts"] if name == "hpsv3" else [p for p in exp["prompts"] for _ in images]  # one set / prompt
    images = images if name == "hpsv3" else images * len(exp["prompts"])
    full = drpo.load_reward(name, "cpu", **paths)(images, prompts)
    reward = drpo.load_reward(name, "cpu", quantize="int8", **paths)
    network = next(iter(reward.members.values())).args[1].networks[0]
    assert any(isinstance(m.weight, Int8Tensor) for m in network.modules() if isinstance(m, torch.nn.Linear))
    quantized = reward(images, prompts)
    assert not torch.equal(quantized, full)  # it did change the network
    # DrPO only ranks each prompt's set: its order stays, and its scores move by nearly one offset (tiny random
    # checkpoints: weak evidence; benchmarks/reward_quantize.py measures top-n agreement over many sets)
    n = len(full) if name == "hpsv3" else len(exp["images"])
    for q, f in zip(quantized.split(n), full.split(n)):
        assert torch.equal(q.argsort(), f.argsort())
        assert ((q - q.mean()) - (f - f.mean())).abs().max() < 0.1 * f.std()


def test_the_24gb_recipe_of_the_paper_runs_every_lever_at_once_at_toy_size(tmp_path, monkeypatch):
    # benchmarks/card_24gb.py's SD-Turbo + HPSv3 recipe (chunks, the conditioning cache, an int8 UNet, an int8
    # reward of HPSv3's computation given as your own function with .networks), on the tiny models, one update
    from torchao.quantization import Int8Tensor

    from benchmarks import card_24gb, step_cost
    monkeypatch.setenv("CARD_REWARD_ARCH", "qwen2vl-tiny")
    monkeypatch.setattr(step_cost, "_NET", {})
    _, flags, levers = card_24gb.RECIPES["sd-turbo + hpsv3"]
    assert drpo.main(["--model", "tiny", *card_24gb.toy(flags), *levers, *card_24gb.COMMON, "--max-steps", "1",
                      "--output-dir", str(tmp_path / "o")]) == 0
    assert isinstance(step_cost._NET["net"].model.lm_head.weight, Int8Tensor)
    assert (tmp_path / "o" / "pytorch_lora_weights.safetensors").is_file()

