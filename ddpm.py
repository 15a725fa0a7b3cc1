"""
Denoising Diffusion Probabilistic Models (Ho, Jain and Abbeel 2020, arXiv:2006.11239) in one file.

Read it top to bottom beside docs/walkthrough.md: config, noise schedule, forward process,
U-Net, loss (Algorithm 1), samplers (Algorithm 2 and DDIM), data, training loop, command line.

    python ddpm.py train                          # tiny preset on built-in toy cars, a few CPU minutes
    python ddpm.py sample                         # a grid from the latest run's EMA weights
    python ddpm.py train --preset cars64 --data cars --data-dir ~/stanford_cars   # the GPU run

Code name      paper                       Code name    paper
-----------    -------------------------   ---------    ------------------------------------
beta           beta_t (variance schedule)  x0, xt       x_0, x_t
alpha          alpha_t = 1 - beta_t        eps          epsilon ~ N(0, I)
alpha_bar      prod_{s<=t} alpha_s         eps_pred     epsilon_theta(x_t, t), the U-Net
q_sample       q(x_t | x_0)   [eq. 4]      p_sample     one step of p_theta(x_{t-1} | x_t) [alg. 2]
q_posterior    q(x_{t-1} | x_t, x_0) [eq. 6, 7]         p_sample_loop  Algorithm 2, all T steps

Time index, stated once: the paper counts t = 1..T; this code stores step t at index t-1, so
`t` in code runs over 0..T-1, index 0 is one step of noise, and the U-Net is fed the index.
"""

import argparse, csv, hashlib, math, os, pickle, random, signal, sys, time
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import asdict, dataclass, field, fields
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageDraw


class UserError(Exception):
    """Bad input: main() prints the message, exits with code 2 and shows no traceback."""


# ----------------------------------------------------------------------------------------------
# Config: one dataclass; the command line is built from it, and presets override it.

def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    preset: str = opt("tiny", "starting point: tiny (CPU minutes), cars64 (the seed notebook, GPU), paper32 (the paper's CIFAR-10 net)")
    data: str = opt("toycars", "toycars (drawn in memory, no download), cars (Stanford Cars on disk) or a folder of images")
    data_dir: str = opt("", "where Stanford Cars lies; else $DDPM_DATA_DIR, else ./data/stanford_cars")
    image_size: int = opt(32, "images are H = W = image_size; must be divisible by 2 ** (len(ch_mult) - 1)")
    n_toycars: int = opt(20000, "how many toy cars to draw")
    T: int = opt(1000, "diffusion steps")
    schedule: str = opt("linear", "beta schedule: linear (the paper) or cosine (Nichol and Dhariwal 2021)")
    beta_1: float = opt(1e-4, "linear schedule: beta at t = 1")
    beta_T: float = opt(0.02, "linear schedule: beta at t = T")
    ch: int = opt(32, "U-Net base channels")
    ch_mult: tuple = opt((1, 2, 2), "channels of each resolution level, as multiples of ch")
    num_res_blocks: int = opt(1, "residual blocks per level on the way down (one more on the way up)")
    attn_res: tuple = opt((8,), "resolutions that get self-attention")
    dropout: float = opt(0.0, "dropout inside residual blocks")
    batch_size: int = opt(64, "images per step, over all ranks together")
    micro_batch: int = opt(0, "images per forward and backward pass: each rank's batch goes through in chunks this size, "
                              "whose gradients add up to the whole batch's: the same step, in less memory. 0: on a "
                              "CPU, chunks whose activations stay in its caches (faster); elsewhere the whole batch")
    lr: float = opt(1e-3, "peak learning rate of Adam")
    lr_schedule: str = opt("cosine", "after warm-up: cosine (decay to 0 at the last step) or constant")
    warmup: int = opt(200, "steps of linear learning-rate warm-up")
    steps: int = opt(2000, "training steps in all (a resumed run continues up to this)")
    grad_clip: float = opt(1.0, "clip the gradient's global norm to this (0: off)")
    ema_decay: float = opt(0.995, "decay of the exponential moving average of the weights")
    seed: int = opt(0, "seed for data, noise and weights")
    out_dir: str = opt("", "run folder for checkpoints, samples and the loss log; default runs/<preset>")
    device: str = opt("auto", "auto (cuda, then mps, then cpu), cuda, mps or cpu")
    precision: str = opt("auto", "fp32 or bf16 autocast; auto: bf16 on CUDA and on CPUs with native bf16, else fp32")
    compile: bool = opt(False, "torch.compile the U-Net (slow to start, faster after)")
    log_every: int = opt(50, "steps between loss log rows (and non-finite checks)")
    sample_every: int = opt(500, "steps between preview grids (DDIM, 50 steps, EMA weights)")
    ckpt_every: int = opt(500, "steps between checkpoints (one is always written at the end)")
    keep_ckpts: bool = opt(False, "also keep a copy of every checkpoint as ckpt_step<N>.pt (to evaluate over training)")


PRESETS = {
    "tiny": {},
    # The seed notebook: Stanford Cars at 64x64, T = 512, channel multipliers (1, 2, 1, 1), attention
    # at 16 and 8, Adam 6e-4 with warm-up then cosine decay, batch 100; 10.7M parameters (the seed's own
    # U-Net had 9.1M in another layout).
    "cars64": dict(data="cars", image_size=64, T=512, ch=96, ch_mult=(1, 2, 1, 1), num_res_blocks=2,
                   attn_res=(16, 8), batch_size=100, lr=6e-4, warmup=1000, steps=100_000,
                   ema_decay=0.9995, sample_every=5000, ckpt_every=5000, log_every=100),
    # The paper's CIFAR-10 model (appendix B): 35.7M parameters.
    "paper32": dict(image_size=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_res=(16,),
                    dropout=0.1, T=1000, lr=2e-4, lr_schedule="constant", warmup=5000, batch_size=128,
                    steps=800_000, grad_clip=1.0, ema_decay=0.9999, sample_every=10_000,
                    ckpt_every=10_000, log_every=100),
}


def make_config(preset="tiny", **overrides):
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    return Config(**{**PRESETS[preset], **overrides, "preset": preset})


# ----------------------------------------------------------------------------------------------
# Noise schedule: beta_1..beta_T, alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s.

def linear_beta(T, beta_1=1e-4, beta_T=0.02):
    """The paper's schedule (sec. 4): beta rises linearly from 1e-4 to 0.02 over T = 1000 steps."""
    return torch.linspace(beta_1, beta_T, T, dtype=torch.float64)


def cosine_beta(T, s=0.008):
    """Nichol and Dhariwal 2021 (arXiv:2102.09672, eq. 17): alpha_bar_t = f(t) / f(0),
    f(t) = cos((t/T + s) / (1 + s) * pi/2)^2; beta clipped at 0.999 so the last step stays finite."""
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)


class Schedule:
    """beta, alpha and alpha_bar as (T,) tensors; paper step t = 1..T lives at index t-1.
    Kept in float64, as the paper's code does: near t = 1, 1 - alpha_bar ~ 1e-4, and float32 would
    lose three of its seven digits there. The images themselves stay float32."""

    def __init__(self, beta):
        self.T = len(beta)
        self.beta = beta.double()
        self.alpha = 1 - self.beta
        self.alpha_bar = torch.cumprod(self.alpha, dim=0)

    @classmethod
    def from_config(cls, cfg):
        if cfg.schedule == "cosine":
            return cls(cosine_beta(cfg.T))
        if cfg.schedule != "linear":
            raise UserError(f"unknown schedule {cfg.schedule!r}; use linear or cosine.")
        return cls(linear_beta(cfg.T, cfg.beta_1, cfg.beta_T))

    def to(self, device):
        dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64  # MPS has no float64
        for name in ("beta", "alpha", "alpha_bar"):
            setattr(self, name, getattr(self, name).to(device, dtype))
        return self

    def at(self, name, t):
        """Gather schedule[name] at index t: (B,) long -> (B, 1, 1, 1), to broadcast over images.
        For alpha_bar, index -1 means "before step 1", where alpha_bar_0 = 1 (nothing noised yet)."""
        v = getattr(self, name)[t.clamp(min=0)]
        if name == "alpha_bar":
            v = torch.where(t >= 0, v, torch.ones_like(v))
        return v.view(-1, 1, 1, 1)


# ----------------------------------------------------------------------------------------------
# Forward process q: add Gaussian noise, in closed form for any t.

def q_sample(sched, x0, t, eps):
    """x0: (B, C, H, W) in [-1, 1], t: (B,) long in 0..T-1, eps: like x0 -> xt: like x0."""
    alpha_bar = sched.at("alpha_bar", t)
    # [eq. 4] q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), reparameterized with eps
    return (alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps).to(x0.dtype)


def q_posterior(sched, x0, xt, t):
    """Mean and variance of q(x_{t-1} | x_t, x_0), the reverse step that training imitates."""
    beta, alpha = sched.at("beta", t), sched.at("alpha", t)
    alpha_bar, alpha_bar_prev = sched.at("alpha_bar", t), sched.at("alpha_bar", t - 1)
    # [eq. 7, mean] mu_tilde = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
    #                  + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
    mean = (alpha_bar_prev.sqrt() * beta / (1 - alpha_bar)) * x0 \
        + (alpha.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar)) * xt
    # [eq. 7, variance] beta_tilde = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t
    var = (1 - alpha_bar_prev) / (1 - alpha_bar) * beta
    return mean.to(xt.dtype), var


# ----------------------------------------------------------------------------------------------
# The network eps_theta(x_t, t): a U-Net (Ronneberger et al. 2015) as in the paper's appendix B.
# Any shape-preserving network fits here; this one is the paper's, scaled by Config.

def timestep_embedding(t, dim):
    """Sinusoidal position embedding of the Transformer (paper sec. 4): t (B,) -> (B, dim).
    Frequencies run geometrically from 1 to 1/10000, so nearby t differ in the fast
    components and far-apart t in the slow ones; the MLP after it reads off "how noisy"."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / (half - 1))
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def norm(c):
    return nn.GroupNorm(math.gcd(32, c // 4), c)  # the paper's 32 groups; fewer for narrow nets


def zero(module):
    """Zero a layer's weights so the residual branch it ends starts as "add nothing"."""
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    """Two 3x3 convolutions with the time embedding added per channel between them."""

    def __init__(self, c_in, c_out, emb_dim, dropout):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.drop = norm(c_out), nn.Dropout(dropout)
        self.conv2 = zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):  # x: (B, c_in, H, W), emb: (B, emb_dim) -> (B, c_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, as in the paper's code."""

    def __init__(self, c):
        super().__init__()
        self.norm, self.qkv, self.proj = norm(c), nn.Conv2d(c, 3 * c, 1), zero(nn.Conv2d(c, c, 1))

    def forward(self, x):  # (B, C, H, W) -> (B, C, H, W)
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three c) h w -> three b (h w) c", three=3)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, fused
        return x + self.proj(rearrange(h, "b (h w) c -> b c h w", h=x.shape[2]))


class Block(nn.Module):
    """A residual block, then attention if this resolution has it."""

    def __init__(self, c_in, c_out, emb_dim, dropout, attn):
        super().__init__()
        self.res = ResBlock(c_in, c_out, emb_dim, dropout)
        self.attn = Attention(c_out) if attn else nn.Identity()

    def forward(self, x, emb):
        return self.attn(self.res(x, emb))


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x, emb=None):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """eps_theta(x_t, t): x (B, 3, H, W), t (B,) long index -> predicted noise (B, 3, H, W)."""

    def __init__(self, cfg):
        super().__init__()
        levels, ch, emb_dim = len(cfg.ch_mult), cfg.ch, 4 * cfg.ch
        if cfg.image_size % 2 ** (levels - 1):
            raise UserError(f"image size {cfg.image_size} cannot go through {levels} levels of the U-Net: "
                            f"it must be divisible by 2 ** {levels - 1} = {2 ** (levels - 1)}. Pick another "
                            f"--image-size, or fewer levels with --ch-mult.")
        self.ch = ch
        self.emb = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        # Down: each level's blocks, then halve the resolution; remember every output for the skips.
        self.down, skip_ch, c, res = nn.ModuleList(), [ch], ch, cfg.image_size
        for i, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(Block(c, ch * mult, emb_dim, cfg.dropout, res in cfg.attn_res))
                c = ch * mult
                skip_ch.append(c)
            if i < levels - 1:
                self.down.append(Downsample(c))
                skip_ch.append(c)
                res //= 2
        self.mid = nn.ModuleList([Block(c, c, emb_dim, cfg.dropout, attn=True),
                                  Block(c, c, emb_dim, cfg.dropout, attn=False)])
        # Up: one block more per level than on the way down, each eating one skip.
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(Block(c + skip_ch.pop(), ch * mult, emb_dim, cfg.dropout, res in cfg.attn_res))
                c = ch * mult
            if i > 0:
                self.up.append(Upsample(c))
                res *= 2
        # The output conv starts at zero: eps_pred = 0 at first, so the first loss is E[eps^2] = 1.
        self.out = nn.Sequential(norm(c), nn.SiLU(), zero(nn.Conv2d(c, 3, 3, padding=1)))

    def forward(self, x, t):
        emb = self.emb(timestep_embedding(t, self.ch))  # (B, 4 ch)
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            if isinstance(layer, Block):
                h = torch.cat([h, skips.pop()], dim=1)
            h = layer(h, emb)
        return self.out(h)


# ----------------------------------------------------------------------------------------------
# Training objective: Algorithm 1, the simplified loss L_simple [eq. 14].

def draw_t_eps(sched, x0, generator=None, rank=0, world=1):
    """The random draws of Algorithm 1 for the batch x0: (B, C, H, W). Under torchrun x0 is this rank's
    share of a global batch of world * B; t and eps are drawn for the whole batch and sliced the same
    way, so that any number of ranks computes exactly what one process would."""
    B, mine = x0.shape[0], slice(rank * x0.shape[0], (rank + 1) * x0.shape[0])
    # [alg. 1, line 3] t ~ Uniform({1, ..., T}), as an index in 0..T-1
    t = torch.randint(0, sched.T, (world * B,), device=x0.device, generator=generator)[mine]
    # [alg. 1, line 4] eps ~ N(0, I)
    eps = torch.randn((world * B, *x0.shape[1:]), device=x0.device, generator=generator)[mine]
    return t, eps


def loss_fn(model, sched, x0, t, eps):
    """x0: (B, C, H, W) in [-1, 1], with its draws t and eps -> scalar loss."""
    # [alg. 1, line 5] gradient step on || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t) ||^2
    eps_pred = model(q_sample(sched, x0, t, eps), t)
    # [eq. 14] L_simple: the squared error, averaged over pixels and batch (the gradient step is the caller's)
    return F.mse_loss(eps_pred.float(), eps)


@torch.no_grad()
def ema_update(ema, model, decay):
    """EMA of the weights (sec. 4: decay 0.9999): theta_ema <- decay theta_ema + (1 - decay) theta."""
    # [sec. 4, EMA] one fused op over all tensors: theta_ema += (1 - decay) (theta - theta_ema)
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


# ----------------------------------------------------------------------------------------------
# Sampling: Algorithm 2 (ancestral, T steps) and DDIM (Song et al. 2021, any number of steps).

def predict_x0(sched, xt, t, eps_pred):
    """Invert eq. 4: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), clipped to [-1, 1].
    The data lives in [-1, 1], so anything outside is error; at large t the division by
    sqrt(alpha_bar_t) ~ 0.006 magnifies small errors of eps_pred, and clipping stops them
    from compounding over the steps (the paper's code clips too)."""
    alpha_bar = sched.at("alpha_bar", t)
    return ((xt - (1 - alpha_bar).sqrt() * eps_pred) / alpha_bar.sqrt()).clamp(-1, 1).to(xt.dtype)


@torch.no_grad()
def p_sample(model, sched, xt, t, generator=None, var="beta"):
    """One step of p_theta(x_{t-1} | x_t) for a batch at one time index t (int, 0..T-1)."""
    tt = torch.full((xt.shape[0],), t, device=xt.device, dtype=torch.long)
    eps_pred = model(xt, tt).float()
    # [alg. 2, line 4] mean = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta), which
    # equals the posterior mean [eq. 7] at x_0 = predict_x0(); going through x_0 lets us clip it.
    mean, beta_tilde = q_posterior(sched, predict_x0(sched, xt, tt, eps_pred), xt, tt)
    # [sec. 3.2] sigma_t^2 = beta_t (the paper's choice) or beta_tilde_t (eq. 7): both gave similar samples
    sigma2 = sched.at("beta", tt) if var == "beta" else beta_tilde
    # [alg. 2, line 3] z ~ N(0, I) if t > 1, else z = 0: the last step adds no noise, x_0 is the mean
    if t == 0:
        return mean
    return (mean + sigma2.sqrt() * torch.randn(xt.shape, device=xt.device, generator=generator)).to(xt.dtype)


@torch.no_grad()
def p_sample_loop(model, sched, shape, generator=None, device="cpu", keep=()):
    """[alg. 2] x_T ~ N(0, I), then p_sample for t = T..1.
    Returns x_0 and {s: x_s} for the paper steps s in `keep` (T is pure noise, 0 the result)."""
    x = torch.randn(shape, device=device, generator=generator)  # [alg. 2, line 1]
    trajectory = {sched.T: x} if sched.T in keep else {}
    for t in reversed(range(sched.T)):  # [alg. 2, line 2] index T-1..0 is paper step T..1
        x = p_sample(model, sched, x, t, generator)
        if t in keep:
            trajectory[t] = x
    return x, trajectory


@torch.no_grad()
def ddim_sample(model, sched, shape, steps=50, eta=0.0, generator=None, device="cpu", keep=()):
    """DDIM (Song, Meng and Ermon 2021, arXiv:2010.02502, eq. 12) on `steps` of the T indices.
    The same trained eps_theta serves: only the marginals q(x_t | x_0) of training matter, and
    DDIM picks a non-Markovian process with those marginals that can skip steps. eta = 0 is
    deterministic; eta = 1 with all steps is DDPM with sigma_t^2 = beta_tilde_t."""
    ts = torch.linspace(sched.T - 1, 0, steps, device=device).round().long().unique_consecutive()
    x = torch.randn(shape, device=device, generator=generator)
    trajectory = {sched.T: x} if sched.T in keep else {}
    for i, t in enumerate(ts.tolist()):
        t_prev = ts[i + 1].item() if i + 1 < len(ts) else -1  # -1: the last step lands on x_0
        tt, tt_prev = torch.full((shape[0],), t, device=device), torch.full((shape[0],), t_prev, device=device)
        alpha_bar, alpha_bar_prev = sched.at("alpha_bar", tt), sched.at("alpha_bar", tt_prev)
        x0 = predict_x0(sched, x, tt, model(x, tt).float())
        eps_pred = (x - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()  # the eps that fits the clipped x0
        # [ddim eq. 16] sigma = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) (1 - alpha_bar / alpha_bar_prev))
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
        # [ddim eq. 12] x_prev = sqrt(alpha_bar_prev) x0 + sqrt(1 - alpha_bar_prev - sigma^2) eps + sigma z
        x = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma ** 2).sqrt() * eps_pred
        if t_prev >= 0 and eta > 0:
            x = x + sigma * torch.randn(shape, device=device, generator=generator)
        x = x.float()
        if t_prev + 1 in keep:  # x now sits at paper step t_prev + 1
            trajectory[t_prev + 1] = x
    return x, trajectory


# ----------------------------------------------------------------------------------------------
# Data: uint8 tensors (N, 3, H, W) held in memory; batches become floats in [-1, 1] on the device.

def draw_toycar(rng, size):
    """One procedurally drawn car: sky, ground, a body of random colour and size, a cabin with
    windows, two wheels; random position, facing left or right. Far easier than photographs."""
    S = 2 * size  # draw at twice the size, then shrink: cheap anti-aliasing
    sky = tuple(rng.randint(a, b) for a, b in ((90, 170), (150, 210), (200, 255)))
    img = Image.new("RGB", (S, S), sky)
    d = ImageDraw.Draw(img)
    ground_y = int(S * rng.uniform(0.68, 0.8))
    d.rectangle([0, ground_y, S, S], fill=tuple(rng.randint(60, 120) for _ in range(3)))
    w, h = S * rng.uniform(0.55, 0.8), S * rng.uniform(0.13, 0.2)  # the body
    x0 = rng.uniform(0.02 * S, S - w - 0.02 * S)
    r = h * rng.uniform(0.45, 0.6)  # wheel radius
    y1 = ground_y - r * 0.9
    y0 = y1 - h
    colour = tuple(rng.choice([rng.randint(0, 60), rng.randint(180, 255)]) for _ in range(3))
    d.rounded_rectangle([x0, y0, x0 + w, y1], radius=h * 0.3, fill=colour)
    # Cabin: a trapezoid set towards the back; the front is on the right, mirrored below.
    cx0, cx1, ch = x0 + w * rng.uniform(0.1, 0.2), x0 + w * rng.uniform(0.6, 0.72), h * rng.uniform(0.8, 1.1)
    d.polygon([(cx0, y0), (cx0 + ch * 0.5, y0 - ch), (cx1 - ch * 0.7, y0 - ch), (cx1, y0)], fill=colour)
    glass, m = (200, 225, 240), ch * 0.18
    mid = (cx0 + cx1) / 2 + ch * 0.05
    d.polygon([(cx0 + m * 1.6, y0 - m * 0.3), (cx0 + ch * 0.5 + m * 0.3, y0 - ch + m), (mid - m * 0.4, y0 - ch + m),
               (mid - m * 0.4, y0 - m * 0.3)], fill=glass)
    d.polygon([(mid + m * 0.4, y0 - m * 0.3), (mid + m * 0.4, y0 - ch + m), (cx1 - ch * 0.7 - m * 0.2, y0 - ch + m),
               (cx1 - m * 1.8, y0 - m * 0.3)], fill=glass)
    d.rectangle([x0 + w - h * 0.25, y0 + h * 0.2, x0 + w - 1, y0 + h * 0.45], fill=(255, 230, 120))  # headlight
    for wx in (x0 + w * 0.2, x0 + w * 0.8):
        d.ellipse([wx - r, y1 - r, wx + r, y1 + r], fill=(25, 25, 25))
        d.ellipse([wx - r * 0.45, y1 - r * 0.45, wx + r * 0.45, y1 + r * 0.45], fill=(160, 160, 160))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img.resize((size, size), Image.BOX)


def toycars(n, size, seed=0):
    """n toy cars as a uint8 tensor (n, 3, size, size), the same for the same seed."""
    rng = random.Random(seed)
    pixels = b"".join(draw_toycar(rng, size).tobytes() for _ in range(n))
    return torch.frombuffer(bytearray(pixels), dtype=torch.uint8).view(n, size, size, 3).permute(0, 3, 1, 2).contiguous()


IMAGE_EXTS = (".jpg", ".jpeg", ".png")

CARS_HELP = """Stanford Cars cannot be downloaded automatically: its original URL is gone (torchvision's
StanfordCars(download=True) fails for this reason). Get it from the Kaggle mirror
(kaggle.com/datasets/jessicali9530/stanford-cars-dataset) or any copy, unpack it, and point
--data-dir at the folder. Accepted layouts: the torchvision one (cars_train/, cars_test/),
the Kaggle one (cars_train/cars_train/*.jpg, cars_test/cars_test/*.jpg), or class folders;
every .jpg/.jpeg/.png below the folder is used, no .mat files needed. Example:
    python ddpm.py train --data cars --data-dir ~/data/stanford_cars
To try the code without any download, use --data toycars."""


def find_images(root):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.lower().endswith(IMAGE_EXTS))


def load_image(path, size):
    """Decode one image to RGB, size x size (squashed, as the seed did, so the whole car stays in
    view); transparency goes onto white. Raises OSError or ValueError for an unreadable file."""
    with Image.open(path) as img:
        img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.getchannel("A"))
        return img.convert("RGB").resize((size, size), Image.BICUBIC)


def image_folder(root, size, cache_dir):
    """Every image below root as uint8 (N, 3, size, size); decoded once, then cached."""
    paths = find_images(root)
    if not paths:
        raise UserError(f"no images (.jpg, .jpeg, .png) were found under {root}. Point --data at a "
                        f"folder that holds images, at any depth, or use --data toycars.")
    key = hashlib.sha1(repr([(os.path.relpath(p, root), os.path.getsize(p), os.path.getmtime(p)) for p in paths]
                            + [size]).encode())  # the same folder gives the same key, however it is named
    cache = os.path.join(cache_dir, f"{os.path.basename(os.path.abspath(root))}-{size}-{key.hexdigest()[:12]}.pt")
    if os.path.exists(cache):
        try:
            return torch.load(cache, weights_only=True)
        except Exception:  # a damaged cache is only a lost shortcut: decode again and rewrite it
            pass
    from tqdm import tqdm
    images, bad = [], []
    for p in tqdm(paths, desc=f"decoding {len(paths)} images once", unit="img"):
        try:
            images.append(torch.frombuffer(bytearray(load_image(p, size).tobytes()), dtype=torch.uint8))
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
            bad.append(f"{p} ({e})")
    if bad:
        print(f"skipped {len(bad)} unreadable image(s) of {len(paths)}, e.g. {bad[0]}", file=sys.stderr)
    if not images:
        raise UserError(f"none of the {len(paths)} image files under {root} could be read; e.g. {bad[0]}.")
    data = torch.stack(images).view(-1, size, size, 3).permute(0, 3, 1, 2).contiguous()
    try:
        os.makedirs(cache_dir, exist_ok=True)
        atomic_save(data, cache)
    except OSError as e:
        print(f"note: could not cache the decoded images in {cache_dir} ({e}); decoding again next time",
              file=sys.stderr)
    return data


def load_data(cfg, cache_dir=os.path.join("data", "cache")):
    """The training images for cfg.data as uint8 (N, 3, H, W)."""
    if cfg.data == "toycars":
        return toycars(cfg.n_toycars, cfg.image_size, cfg.seed)
    if cfg.data == "cars":
        places = [p for p in (cfg.data_dir, os.environ.get("DDPM_DATA_DIR", ""), os.path.join("data", "stanford_cars")) if p]
        for place in places:
            if os.path.isdir(place) and find_images(place):
                return image_folder(place, cfg.image_size, cache_dir)  # train and test splits together
        raise UserError("no Stanford Cars images were found; looked in: " + ", ".join(places) + ".\n" + CARS_HELP)
    if os.path.isdir(cfg.data):
        return image_folder(cfg.data, cfg.image_size, cache_dir)
    raise UserError(f"--data {cfg.data!r} is neither toycars, cars, nor an existing folder of images.")


def get_batch(data, idx, flip):
    """uint8 images at idx, mirrored where flip is True, as floats in [-1, 1]: (B, 3, H, W)."""
    x = data[idx].float() / 127.5 - 1
    return torch.where(flip[:, None, None, None], x.flip(3), x)


# ----------------------------------------------------------------------------------------------
# Checkpoints: one file, written to a temporary name then renamed, loaded without running code.

def atomic_save(obj, path):
    """torch.save to path.tmp, then rename: a crash or Ctrl-C never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    """A checkpoint dict, loaded with weights_only=True so that a stranger's file cannot run code."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}. Train one first (python ddpm.py train) or pass --ckpt.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"refused to load {path}: it holds pickled objects other than tensors and plain "
                        f"values, which could run code on this machine ({str(e).splitlines()[0]}). Only load "
                        f"checkpoints written by ddpm.py.") from None
    except Exception as e:  # truncated zip, not a torch file at all, ...
        raise UserError(f"could not read {path} as a checkpoint ({type(e).__name__}: {str(e).splitlines()[0]}). "
                        f"It may be truncated or not a ddpm.py checkpoint; use another, or retrain.") from None
    if not isinstance(ckpt, dict) or not {"model", "ema", "config", "step"} <= ckpt.keys():
        raise UserError(f"{path} is a torch file but not a ddpm.py checkpoint (it lacks model, ema, config "
                        f"and step entries).")
    return ckpt


def config_from_checkpoint(ckpt, **overrides):
    known = {f.name: f.default for f in fields(Config)}
    saved = {k: tuple(v) if isinstance(known[k], tuple) else v for k, v in ckpt["config"].items() if k in known}
    return Config(**{**saved, **overrides})


def load_weights(module, state, path):
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"the weights in {path} do not fit the network its config describes; the checkpoint "
                        f"comes from another config or another version ({str(e).splitlines()[1].strip()}).") from None


def pick_device(name, local_rank=0):
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for, but this torch sees no CUDA GPU (torch "
                        f"{torch.__version__}, torch.cuda.is_available() is False). Use --device cpu, or "
                        f"install a CUDA build of torch on a machine with an NVIDIA GPU.")
    if name == "mps" and not mps:
        raise UserError("--device mps was asked for, but this machine or torch build has no MPS. Use --device cpu.")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise UserError(f"unknown device {name!r}; use auto, cuda, mps or cpu.")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


def use_bf16(precision, device):
    """bf16 autocast halves the cost of convolutions on GPUs and on CPUs with bf16 units (AVX512-BF16,
    AMX); elsewhere the CPU emulates bf16, which is slower than fp32."""
    if precision != "auto" or device.type != "cpu":
        return precision == "bf16" or (precision == "auto" and device.type == "cuda")
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def save_grid(x, path, nrow=None):
    """x: (B, 3, H, W) in [-1, 1] -> one PNG grid, written atomically."""
    from torchvision.utils import make_grid
    grid = make_grid((x.float().clamp(-1, 1) + 1) / 2, nrow=nrow or math.ceil(math.sqrt(len(x))), padding=1)
    tmp = f"{path}.tmp{os.getpid()}"
    Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).cpu().numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)


def writable_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to the folder {path} ({e.strerror}). Choose a writable one "
                        f"(--out-dir for train, --out for sample) or fix its permissions.") from None
    return path


# ----------------------------------------------------------------------------------------------
# Training loop: Algorithm 1 over and over, with warm-up, clipping, EMA, logs, previews, checkpoints.

def lr_at(step, cfg):
    """Linear warm-up over cfg.warmup steps, then constant or cosine decay towards 0 at cfg.steps."""
    if step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / (cfg.steps - cfg.warmup + 1)))


def setup(cfg, device, ddp=False, local_rank=0):
    """Everything a training step needs: U-Net, its EMA copy, Adam, schedule, random generators."""
    torch.manual_seed(cfg.seed)
    s = SimpleNamespace(cfg=cfg, sched=Schedule.from_config(cfg).to(device), model=UNet(cfg).to(device))
    bf16 = use_bf16(cfg.precision, device)
    if device.type == "cuda" or (device.type == "cpu" and not bf16):
        # NHWC lets cuDNN and oneDNN skip layout conversions around every conv (bench.py: 1.1x for fp32
        # on a CPU); oneDNN's bf16 kernels measured faster in the default layout, so they keep it.
        s.model = s.model.to(memory_format=torch.channels_last)
    s.ema = deepcopy(s.model).eval().requires_grad_(False)
    try:  # one fused kernel for all parameters: 3.6x faster than the per-tensor loop on a CPU
        s.opt = torch.optim.Adam(s.model.parameters(), lr=cfg.lr, fused=device.type in ("cuda", "cpu"))
    except RuntimeError:  # torch < 2.4 has no fused Adam on the CPU
        s.opt = torch.optim.Adam(s.model.parameters(), lr=cfg.lr)
    s.data_gen = torch.Generator().manual_seed(cfg.seed)  # which images, which flips
    s.noise_gen = torch.Generator(device).manual_seed(cfg.seed)  # t and eps
    s.ddp = torch.nn.parallel.DistributedDataParallel(s.model, [local_rank] if device.type == "cuda" else None) if ddp else None
    s.net = torch.compile(s.ddp or s.model) if cfg.compile else (s.ddp or s.model)
    s.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    s.micro = cfg.micro_batch
    if not s.micro and device.type == "cpu":
        # As many images as keep one full-resolution activation (ch x H x W) within 8 MiB, so that a layer's
        # output is still in the CPU's cache when the next layer reads it: paper32 at batch 128 trains 1.7x
        # faster in chunks of 16 (fp32) or 32 (bf16) (bench.py, README). tiny's batch of 64 fits whole.
        s.micro = max(1, 8 * 2 ** 20 // (cfg.ch * cfg.image_size ** 2 * (2 if bf16 else 4)))
    return s


def train_step(s, x0, step, rank=0, world=1):
    """One optimizer step of Algorithm 1 on the batch x0: loss, backward, clip, Adam, EMA.
    Returns the loss as a tensor: reading it (.item()) would make a GPU wait, so the loop does it rarely."""
    for group in s.opt.param_groups:
        group["lr"] = lr_at(step, s.cfg)
    t, eps = draw_t_eps(s.sched, x0, s.noise_gen, rank, world)
    s.opt.zero_grad(set_to_none=True)
    # The batch goes through in chunks of s.micro images (see setup); each chunk's mean loss, weighted by its
    # share of the batch, adds its part of the batch's gradient. DDP averages over the ranks after the last.
    m = s.micro or len(x0)
    chunks = list(zip(x0.split(m), t.split(m), eps.split(m)))
    loss = 0
    for i, (x, tc, ec) in enumerate(chunks):
        with s.ddp.no_sync() if s.ddp and i < len(chunks) - 1 else nullcontext():
            with s.autocast:
                part = loss_fn(s.net, s.sched, x, tc, ec) * (len(x) / len(x0))
            part.backward()
        loss += part.detach()
    if s.cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.cfg.grad_clip)
    s.opt.step()
    # EMA decay ramps up as (1 + step) / (10 + step), so short runs do not average in the random init.
    ema_update(s.ema, s.model, min(s.cfg.ema_decay, (1 + step) / (10 + step)))
    return loss


def train(cfg, resume=False):
    # Under torchrun each process is one rank; each computes its share of every global batch and
    # DistributedDataParallel averages the gradients, so N ranks train like one with the same batch.
    ddp = "RANK" in os.environ
    rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")) if ddp else (0, 1, 0)
    device = pick_device(cfg.device, local_rank)
    if ddp:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} does not split over {world} ranks; use a multiple of {world}.")
    master, B = rank == 0, cfg.batch_size // world
    out_dir = writable_dir(cfg.out_dir or os.path.join("runs", cfg.preset)) if master else cfg.out_dir
    ckpt_path = os.path.join(out_dir or os.path.join("runs", cfg.preset), "ckpt.pt")
    data = load_data(cfg).to(device)
    s = setup(cfg, device, ddp, local_rank)
    model, ema, opt, data_gen, noise_gen = s.model, s.ema, s.opt, s.data_gen, s.noise_gen
    step = 0
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        load_weights(model, ckpt["model"], ckpt_path)
        load_weights(ema, ckpt["ema"], ckpt_path)
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        data_gen.set_state(ckpt["rng"]["data"])
        noise_gen.set_state(ckpt["rng"]["noise"])

    def save(step):
        rng = {"torch": torch.get_rng_state(), "data": data_gen.get_state(), "noise": noise_gen.get_state()}
        state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                 "step": step, "config": asdict(cfg), "rng": rng}
        atomic_save(state, ckpt_path)
        if cfg.keep_ckpts:
            atomic_save(state, ckpt_path.replace("ckpt.pt", f"ckpt_step{step}.pt"))

    # Ctrl-C sets a flag that the loop reads between steps, so a step is never cut in half; a second
    # Ctrl-C stops at once, and the last checkpoint, written atomically, is still whole.
    stop = []
    if master and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, lambda *_: (stop.append(1), signal.signal(signal.SIGINT, signal.default_int_handler)))
    from tqdm import tqdm
    log = LossLog(os.path.join(out_dir, "log.csv"), step) if master else None
    bar = tqdm(total=cfg.steps, initial=step, disable=not master, unit="step", dynamic_ncols=True)
    loss_sum, n_sum, tic = torch.zeros((), device=device), 0, time.time()
    while step < cfg.steps and not stop:
        step += 1
        idx = torch.randint(len(data), (cfg.batch_size,), generator=data_gen)[rank * B:(rank + 1) * B]
        flip = (torch.rand(cfg.batch_size, generator=data_gen) < 0.5)[rank * B:(rank + 1) * B]
        x0 = get_batch(data, idx.to(device), flip.to(device))  # [alg. 1, line 2] x_0 ~ q(x_0)
        loss_sum += train_step(s, x0, step, rank, world)
        n_sum += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step % cfg.ckpt_every == 0 or step == cfg.steps:
            mean_loss = loss_sum.item() / n_sum  # the one host sync, every log_every steps
            if not math.isfinite(mean_loss):
                raise UserError(f"the loss became {mean_loss} by step {step}; training stopped. The last good "
                                f"checkpoint, if any, is still in {out_dir}. Try a lower --lr or --grad-clip 1.")
            speed = n_sum * cfg.batch_size / (time.time() - tic)
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{speed:.0f}")
            if log:
                log.write(step, mean_loss, lr_at(step, cfg), speed)
            loss_sum, n_sum, tic = torch.zeros((), device=device), 0, time.time()
        paused = time.time()  # previews and checkpoints do not count towards images/s
        if master and (step % cfg.sample_every == 0 or step == cfg.steps):
            with s.autocast:
                x, _ = ddim_sample(ema, s.sched, (64, 3, cfg.image_size, cfg.image_size), steps=50, eta=1.0,
                                   generator=torch.Generator(device).manual_seed(cfg.seed), device=device)
            os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
            save_grid(x, os.path.join(out_dir, "samples", f"step{step:07d}.png"))
        if master and (step % cfg.ckpt_every == 0 or step == cfg.steps):
            save(step)
        tic += time.time() - paused
    bar.close()
    if stop:
        save(step)
        print(f"\ninterrupted: saved step {step} to {ckpt_path}; continue with the same command and --resume",
              file=sys.stderr)
        sys.exit(130)
    if ddp:
        # DDP keeps the ranks in step; check it once: the largest weight gap between any two ranks. The
        # check runs on a process group of its own that is deleted right after, which waits for Gloo's
        # worker threads: DDP keeps the main group alive until interpreter exit, and a worker still
        # freeing an all-reduce of Python tensors then aborts the process (SIGABRT after a good run).
        group = torch.distributed.new_group()
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        hi, lo = flat.clone(), flat.clone()
        torch.distributed.all_reduce(hi, torch.distributed.ReduceOp.MAX, group=group)
        torch.distributed.all_reduce(lo, torch.distributed.ReduceOp.MIN, group=group)
        torch.distributed.destroy_process_group(group)
        del group
        if master:
            print(f"{world} ranks agree: largest weight difference between ranks {(hi - lo).max().item():.3g}")
        torch.distributed.destroy_process_group()
    if master:
        print(f"done: {step} steps; checkpoint {ckpt_path}; previews in {os.path.join(out_dir, 'samples')}")
    return model, ema


class LossLog:
    """log.csv: step, loss, lr, images/s, seconds since start; a resumed run drops rows after its step."""

    def __init__(self, path, step):
        rows = []
        if step > 0 and os.path.exists(path):
            with open(path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        self.f = open(path, "w", newline="")
        self.w = csv.DictWriter(self.f, ["step", "loss", "lr", "img_per_s", "seconds"])
        self.w.writeheader()
        self.w.writerows(rows)
        self.t0 = time.time() - (float(rows[-1]["seconds"]) if rows else 0.0)

    def write(self, step, loss, lr, speed):
        self.w.writerow(dict(step=step, loss=f"{loss:.5f}", lr=f"{lr:.3g}", img_per_s=f"{speed:.1f}",
                             seconds=f"{time.time() - self.t0:.1f}"))
        self.f.flush()


# ----------------------------------------------------------------------------------------------
# Command line: train, sample. Every Config field is a flag of train.

def sample(args):
    path = args.ckpt or latest_checkpoint()
    ckpt = load_checkpoint(path)
    cfg = config_from_checkpoint(ckpt)
    device = pick_device(args.device)
    out = args.out or os.path.join(os.path.dirname(path), f"sample_{args.sampler}.png")
    writable_dir(os.path.dirname(out) or ".")
    model = UNet(cfg)
    load_weights(model, ckpt["model" if args.raw else "ema"], path)
    model.to(device).eval()
    sched, g = Schedule.from_config(cfg).to(device), torch.Generator(device).manual_seed(args.seed)
    shape = (args.n, 3, cfg.image_size, cfg.image_size)
    t0 = time.time()
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=use_bf16("auto", device)):
        if args.sampler == "ddpm":
            x, _ = p_sample_loop(model, sched, shape, g, device)
        else:
            x, _ = ddim_sample(model, sched, shape, args.steps, args.eta, g, device)
    save_grid(x, out)
    if args.individual:
        folder = writable_dir(args.individual)
        for i, img in enumerate(x):
            save_grid(img[None], os.path.join(folder, f"{i:05d}.png"), nrow=1)
    steps = sched.T if args.sampler == "ddpm" else args.steps
    print(f"wrote {out}: {args.n} samples, {args.sampler} with {steps} steps, "
          f"{'raw' if args.raw else 'EMA'} weights of step {ckpt['step']}, in {time.time() - t0:.1f} s")


def latest_checkpoint():
    found = [os.path.join("runs", d, "ckpt.pt") for d in (os.listdir("runs") if os.path.isdir("runs") else [])]
    found = [p for p in found if os.path.isfile(p)]
    if not found:
        raise UserError("no checkpoint found under runs/. Train one first (python ddpm.py train), or pass "
                        "--ckpt path/to/ckpt.pt.")
    return max(found, key=os.path.getmtime)


ARCH_FIELDS = ("image_size", "T", "schedule", "beta_1", "beta_T", "ch", "ch_mult", "num_res_blocks", "attn_res")


def resolve_config(given, resume):
    """Config from defaults < preset < (the checkpoint, when resuming) < flags given on the command line."""
    cfg = make_config(given.pop("preset", "tiny"), **given)
    ckpt_path = os.path.join(cfg.out_dir or os.path.join("runs", cfg.preset), "ckpt.pt")
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        cfg = config_from_checkpoint(ckpt, **given)
        changed = [k for k in ARCH_FIELDS if getattr(cfg, k) != getattr(config_from_checkpoint(ckpt), k)]
        if changed:
            raise UserError(f"cannot resume {ckpt_path} with a different {', '.join(changed)}: the checkpoint "
                            f"comes from another config. Drop those flags, or start a new run with --out-dir.")
    elif os.path.exists(ckpt_path):
        raise UserError(f"{ckpt_path} already holds a checkpoint. Add --resume to continue it, pass --out-dir "
                        f"for a new run, or delete the folder to start over.")
    for name, value, allowed in (("schedule", cfg.schedule, ("linear", "cosine")),
                                 ("precision", cfg.precision, ("auto", "fp32", "bf16")),
                                 ("lr-schedule", cfg.lr_schedule, ("cosine", "constant"))):
        if value not in allowed:
            raise UserError(f"--{name} {value!r} is not one of {', '.join(allowed)}.")
    if min(cfg.steps, cfg.batch_size, cfg.warmup, cfg.log_every, cfg.sample_every, cfg.ckpt_every) < 1 or not cfg.ch_mult \
            or cfg.micro_batch < 0:
        raise UserError("--steps, --batch-size, --warmup and the --*-every intervals must be at least 1, --micro-batch "
                        "at least 0, and --ch-mult must name at least one level.")
    return cfg


def int_tuple(text):
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,2, not {text!r}") from None


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="python ddpm.py train --help and python ddpm.py sample --help list every flag.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model (Algorithm 1); writes runs/<preset>/",
                       description="Train eps_theta on --data. Flags override the --preset; defaults shown are the tiny preset's.",
                       argument_default=argparse.SUPPRESS)
    for f in fields(Config):
        shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        flag, kw = "--" + f.name.replace("_", "-"), dict(help=f"{f.metadata['help']} (default: {shown})")
        if isinstance(f.default, bool):
            t.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            t.add_argument(flag, type=int_tuple if isinstance(f.default, tuple) else type(f.default),
                           metavar=f.name.upper(), **kw)
    t.add_argument("--resume", action="store_true", default=False, help="continue the run in --out-dir from its checkpoint")
    s = sub.add_parser("sample", help="draw images from a checkpoint (Algorithm 2 or DDIM)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--ckpt", help="checkpoint file; default: the newest runs/*/ckpt.pt")
    s.add_argument("--n", type=int, default=64, help="how many images")
    s.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm", help="ddpm: Algorithm 2, all T steps; ddim: --steps steps")
    s.add_argument("--steps", type=int, default=50, help="DDIM steps")
    s.add_argument("--eta", type=float, default=1.0, help="DDIM noise: 1 like DDPM, forgiving of short training; 0 deterministic")
    s.add_argument("--seed", type=int, default=0, help="seed of the starting noise")
    s.add_argument("--out", help="PNG grid to write; default: sample_<sampler>.png beside the checkpoint")
    s.add_argument("--individual", metavar="DIR", help="also write each image as DIR/00000.png, ...")
    s.add_argument("--raw", action="store_true", help="use the raw weights instead of their EMA")
    s.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    v = sub.add_parser("visualize", help="draw the pictures of the docs from a run (plots.py, needs matplotlib)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    v.add_argument("--ckpt", help="checkpoint file; default: the newest runs/*/ckpt.pt")
    v.add_argument("--out", default="assets", help="folder for the pictures")
    v.add_argument("--seed", type=int, default=0, help="seed of the images and the starting noise")
    e = sub.add_parser("eval", help="FID, bits/dim and near-copies of a checkpoint (evaluate.py)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--ckpt", help="checkpoint file; default: the newest runs/*/ckpt.pt")
    e.add_argument("--n", type=int, default=10000, help="samples for FID and the near-copy check")
    e.add_argument("--n-ref", type=int, default=10000, help="training images for FID's reference statistics")
    e.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddim")
    e.add_argument("--steps", type=int, default=50, help="DDIM steps")
    e.add_argument("--eta", type=float, default=1.0, help="DDIM noise")
    e.add_argument("--batch", type=int, default=500, help="images per sampling batch")
    e.add_argument("--bpd-images", type=int, default=256, help="held-out images for bits/dim")
    e.add_argument("--bpd-t", type=int, default=8, help="random steps t per image for the bits/dim estimate")
    e.add_argument("--n-heldout", type=int, default=2000, help="held-out images for the near-copy baseline")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            given = {f.name: getattr(args, f.name) for f in fields(Config) if hasattr(args, f.name)}
            train(resolve_config(given, args.resume), args.resume)
        elif args.command == "sample":
            if args.n < 1 or args.steps < 1:
                raise UserError("--n and --steps must be at least 1.")
            sample(args)
        elif args.command == "eval":
            if min(args.n, args.n_ref, args.steps, args.batch, args.bpd_images, args.bpd_t, args.n_heldout) < 1:
                raise UserError("every count given to eval must be at least 1.")
            import evaluate
            evaluate.evaluate(args)
        elif args.command == "visualize":
            try:
                import plots
            except ImportError as e:
                raise UserError(f"visualize needs matplotlib ({e}); pip install matplotlib") from None
            plots.visualize(args.ckpt or latest_checkpoint(), args.out, args.seed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted; the last checkpoint written is intact.", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    # plots.py and evaluate.py `import ddpm`; point that at this very module, not a second copy of it,
    # so that their UserError is the one main() catches.
    sys.modules.setdefault("ddpm", sys.modules["__main__"])
    main()
