"""
Denoising Diffusion Probabilistic Models (Ho, Jain and Abbeel 2020, arXiv:2006.11239) in one file.

    python ddpm.py train                          # tiny preset on built-in toy cars, a few CPU minutes
    python ddpm.py sample                         # a grid from the latest run's EMA weights
    python ddpm.py train --preset cars64 --data cars --data-dir ~/stanford_cars   # the GPU run

Read it top to bottom beside the paper and docs/walkthrough.md. First the paper, in its order: the noise
schedule, the forward process and its posterior, the U-Net, Algorithm 1 (the loss and one training step), the
training loop, Algorithm 2. Then what came after the paper (cosine schedule, respacing, DDIM, guidance), and
last the config and the `train` and `sample` commands. What does not touch the math lives beside this file:
images.py (toy cars, image folders, classes), files.py (checkpoints, pictures, the loss log, the lock),
checks.py (what each flag may be, memory), launch.py (device, ranks, Ctrl-C, the command line); solvers.py
holds DPM-Solver++ with and without noise, faster solvers in this file's style.

Code name      paper                       Code name    paper
-----------    -------------------------   ---------    ------------------------------------
beta           beta_t (variance schedule)  x0, xt       x_0, x_t
alpha          alpha_t = 1 - beta_t        eps          epsilon ~ N(0, I)
alpha_bar      prod_{s<=t} alpha_s         eps_pred     epsilon_theta(x_t, t), the U-Net
q_sample       q(x_t | x_0)   [eq. 4]      p_sample     x_{t-1} ~ p_theta(x_{t-1} | x_t) [alg. 2]
q_posterior    q(x_{t-1} | x_t, x_0) [eq. 6, 7]         p_sample_loop  Algorithm 2, all T steps

Time index, stated once: the paper counts t = 1..T; this code stores step t at index t-1, so `t` in code runs
over 0..T-1, index 0 is one step of noise, and the U-Net is fed the index. The network takes one t per image:
a sampler, which moves the whole batch through the same t, hands it `t_batch`, that t repeated B times.
"""

import math, os, signal, sys, time
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import dataclass
from types import SimpleNamespace

if __name__ == "__main__":  # Ctrl-C while torch loads: a word and exit 130 (print gives None)
    signal.signal(signal.SIGINT, lambda *_: sys.exit(print("\ninterrupted", file=sys.stderr) or 130))

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import checks
import files
import images
import launch
import solvers


# ==============================================================================================
# THE PAPER
# ----------------------------------------------------------------------------------------------
# Noise schedule (sec. 2, 4): beta_1..beta_T, alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s.

def linear_beta(T, beta_1=1e-4, beta_T=0.02):
    """The paper's schedule (sec. 4): beta rises linearly from 1e-4 to 0.02 over T = 1000 steps."""
    return torch.linspace(beta_1, beta_T, T, dtype=torch.float64)


class Schedule:
    """beta, alpha, alpha_bar and alpha_bar_prev as (T,) tensors; paper step t = 1..T lives at index t-1.
    In float64, as in the paper's code: near t = 1, 1 - alpha_bar ~ 1e-4; float32 would lose 3 of 7 digits."""

    def __init__(self, beta):
        self.T = len(beta)
        self.beta = beta.double()
        self.alpha = 1 - self.beta
        self.alpha_bar = torch.cumprod(self.alpha, dim=0)
        # [alpha_bar_0] alpha_bar_{t-1} at index t-1: nothing is noised before the first step, alpha_bar_0 = 1
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])

    @classmethod
    def from_config(cls, cfg):
        beta = cosine_beta(cfg.T) if cfg.schedule == "cosine" else linear_beta(cfg.T, cfg.beta_1, cfg.beta_T)
        return cls(beta)

    def to(self, device):
        dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64  # MPS has no float64
        for name in ("beta", "alpha", "alpha_bar", "alpha_bar_prev"):
            setattr(self, name, getattr(self, name).to(device, dtype))
        return self


def at(values, t):
    """A schedule's values at the time indices t (B,), shaped (B, 1, 1, 1) to scale a batch of images."""
    return values[t].view(-1, 1, 1, 1)


# ----------------------------------------------------------------------------------------------
# Forward process q (sec. 2): Gaussian noise added in closed form for any t, and the posterior it implies.

def q_sample(sched, x0, t, eps):
    """x_t ~ q(x_t | x_0): x0 (B, C, H, W) in [-1, 1], t (B,) long in 0..T-1, eps like x0 -> x_t like x0."""
    alpha_bar = at(sched.alpha_bar, t)
    # [eq. 4] q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), reparameterized with eps
    xt = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps

    return xt.to(x0.dtype)  # the float64 schedule made it float64; back to the images' dtype


def q_posterior(sched, x0, xt, t):
    """Mean and variance of q(x_{t-1} | x_t, x_0), the reverse step that training imitates."""
    beta, alpha = at(sched.beta, t), at(sched.alpha, t)
    alpha_bar, alpha_bar_prev = at(sched.alpha_bar, t), at(sched.alpha_bar_prev, t)
    # [eq. 7, mean] mu_tilde = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
    #                  + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
    mean = (alpha_bar_prev.sqrt() * beta / (1 - alpha_bar)) * x0 \
        + (alpha.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar)) * xt
    # [eq. 7, variance] beta_tilde = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t
    beta_tilde = (1 - alpha_bar_prev) / (1 - alpha_bar) * beta

    return mean.to(xt.dtype), beta_tilde


# ----------------------------------------------------------------------------------------------
# The network eps_theta(x_t, t): a U-Net (Ronneberger et al. 2015) as in the paper's appendix B.
# Any shape-preserving network fits here; this one is the paper's, scaled by Config.

def timestep_embedding(t, dim):
    """Sinusoidal position embedding of the Transformer (paper sec. 4): t (B,) -> (B, dim). Frequencies run
    geometrically from 1 to 1/10000: nearby t differ in the fast ones, far-apart t in the slow."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / (half - 1))
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def norm(c):
    """Group norm with the paper's 32 groups where each keeps 4 channels or more: gcd(32, c / 4) groups, so 32
    for paper32's 128 and 256 channels, 8 for tiny's 32 (16 for its 64) and cars64's 96 (gcd(32, 24) = 8)."""
    return nn.GroupNorm(math.gcd(32, c // 4), c)


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
    """Halve H and W with a strided 3x3 conv. Takes emb, unused, so that the U-Net calls every layer alike."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x, emb=None):
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then a 3x3 conv. Takes emb, unused, as Downsample does."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """eps_theta(x_t, t): x (B, 3, H, W), t (B,) long index -> predicted noise (B, 3, H, W). With classes,
    eps_theta(x_t, t, y) for y (B,) class indices, where index num_classes (or y = None) means "no class"."""

    def __init__(self, cfg, num_classes=0):
        super().__init__()
        levels, ch, emb_dim = len(cfg.ch_mult), cfg.ch, 4 * cfg.ch
        assert cfg.image_size % 2 ** (levels - 1) == 0, "each level but the last halves the image size"
        self.ch = ch
        self.emb = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        # Down: each level's blocks, then halve the resolution. c, res: channels and resolution so far
        # (attention where res is in attn_res); skip_ch: channels of each output kept for a skip.
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
        # [unet out] The output conv starts at zero: eps_pred = 0 at first, so the first loss is E[eps^2] = 1.
        self.out = nn.Sequential(norm(c), nn.SiLU(), zero(nn.Conv2d(c, 3, 3, padding=1)))
        # [guidance, label] Classifier-free guidance: a vector per class, one for "no class", added to emb.
        self.num_classes = num_classes
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None

    def forward(self, x, t, y=None):
        emb = self.emb(timestep_embedding(t, self.ch))  # [time embedding] (B, 4 ch)
        # [guidance, label added] the class's vector added to the time's; y = None: "no class" for every image
        if self.label_emb is not None:
            emb = emb + self.label_emb(torch.full_like(t, self.num_classes) if y is None else y)

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
# Algorithm 1, training: the loss L_simple [eq. 14] and one optimizer step on it.

def get_batch(data, idx, flip):
    """uint8 images at idx, mirrored where flip is True, as floats in [-1, 1]: (B, 3, H, W)."""
    x = data[idx].float() / 127.5 - 1  # [data in -1 1] 0..255 to [-1, 1]
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def random_batch(data, B, generator, labels=None, rank=0, world=1):
    """B random training images from data, uint8 (N, 3, H, W), as floats in [-1, 1] on data's device, and
    their labels if any. Under torchrun, each of the `world` ranks draws for the whole batch of all ranks,
    in the order one process would, and keeps its own B rows: N ranks train exactly like one process."""
    mine = slice(rank * B, (rank + 1) * B)  # this rank's rows (all of them without torchrun: rank 0 of 1)
    # [alg. 1, line 2] x_0 ~ q(x_0): training images, each mirrored with probability 1/2 (appendix B)
    idx = torch.randint(0, len(data), (world * B,), generator=generator, device=generator.device)[mine]
    flip = torch.rand((world * B,), generator=generator, device=generator.device)[mine] < 0.5
    idx, flip = idx.to(data.device), flip.to(data.device)
    return get_batch(data, idx, flip), None if labels is None else labels[idx]


def loss_fn(model, sched, x0, t, eps, y=None, eps_in=None, min_snr=0.0):
    """x0 (B, C, H, W) in [-1, 1], with its draws t and eps (and its classes y, if any) -> scalar loss.
    Beyond the paper, off by default: x_t made with eps_in, and Min-SNR-gamma weights (docs/recipe.md)."""
    # [alg. 1, line 5, the loss] || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t) ||^2
    xt = q_sample(sched, x0, t, eps if eps_in is None else eps_in)
    eps_pred = model(xt, t, y).float()  # fp32, also when the net runs in bf16
    if min_snr:  # [min-snr] each image's error weighted by min(SNR_t, gamma) / SNR_t (1 where SNR_t <= gamma)
        snr = (sched.alpha_bar / (1 - sched.alpha_bar))[t]  # SNR_t = alpha_bar_t / (1 - alpha_bar_t)
        return ((snr.clamp(max=min_snr) / snr).float() * (eps_pred - eps).pow(2).mean((1, 2, 3))).mean()
    # [eq. 14] L_simple: the squared error, averaged over pixels and batch
    return F.mse_loss(eps_pred, eps)


@torch.no_grad()
def ema_update(ema, model, decay):
    """EMA of the weights (appendix B; the paper's decay is 0.9999, the presets' their own):
    theta_ema <- decay theta_ema + (1 - decay) theta."""
    for theta_ema, theta in zip(ema.parameters(), model.parameters()):
        # [app. B, EMA] theta_ema += (1 - decay) (theta - theta_ema), the same update, as one lerp
        theta_ema.lerp_(theta, 1 - decay)


def lr_at(step, cfg):
    """Linear warm-up over cfg.warmup steps, then constant or cosine decay towards 0 at cfg.steps."""
    if step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / (cfg.steps - cfg.warmup + 1)))


def setup(cfg, device, rank=0, world=1, classes=(), bf16=False, micro_batch=0):
    """Everything a training step needs: the U-Net, its EMA copy, Adam, the schedule, the random generators.
    rank, world: this process's place among torchrun's ranks (0 of 1 without it); classes: their names; bf16:
    bf16 autocast on; micro_batch: images per forward and backward pass (0: all); train() picks those two."""
    torch.manual_seed(cfg.seed)  # the initial weights, and dropout's masks
    s = SimpleNamespace(cfg=cfg, device=device, rank=rank, world=world, classes=list(classes),
                        sched=Schedule.from_config(cfg).to(device), micro_batch=micro_batch)
    s.model = UNet(cfg, len(classes)).to(device)
    if device.type == "cuda" or (device.type == "cpu" and not bf16):  # NHWC suits cuDNN and oneDNN's fp32
        s.model = s.model.to(memory_format=torch.channels_last)  # (bench.py: 1.1x on a CPU)
    s.ema = deepcopy(s.model).eval().requires_grad_(False)  # theta_EMA starts as theta
    try:  # Adam, fused into one kernel for all parameters: 3.6x faster than one per tensor on a CPU
        s.optimizer = torch.optim.Adam(s.model.parameters(), lr=cfg.lr, fused=device.type in ("cuda", "cpu"))
    except RuntimeError:  # torch < 2.4 has no fused Adam on the CPU
        s.optimizer = torch.optim.Adam(s.model.parameters(), lr=cfg.lr)
    # Two random streams: which images and flips (drawn on the CPU), then t and eps (on the device).
    s.data_generator = torch.Generator().manual_seed(cfg.seed)
    s.noise_generator = torch.Generator(device).manual_seed(cfg.seed)
    # The network as a step runs it: under torchrun inside DDP, whose backward() averages the ranks'
    # gradients; compiled if asked; inside s.autocast (bf16 where that pays, else a no-op).
    s.ddp = None
    if torch.distributed.is_initialized():
        gpu = [device.index] if device.type == "cuda" else None
        s.ddp = nn.parallel.DistributedDataParallel(s.model, gpu)
    s.net = torch.compile(s.ddp or s.model) if cfg.compile else (s.ddp or s.model)
    s.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    return s


def train_step(s, x0, step, y=None):
    """One optimizer step of Algorithm 1 on this rank's batch x0 (B, 3, H, W) in [-1, 1], with classes y (B,)
    or None; s comes from setup(). Returns the loss as a tensor: reading it (.item()) makes a GPU wait."""
    B, g = len(x0), s.noise_generator
    mine = slice(s.rank * B, (s.rank + 1) * B)  # drawn for all ranks, this rank's rows kept (random_batch)
    # [alg. 1, line 3] t ~ Uniform({1, ..., T}), as an index in 0..T-1
    t = torch.randint(0, s.sched.T, (s.world * B,), generator=g, device=g.device)[mine]
    # [alg. 1, line 4] eps ~ N(0, I)
    eps = torch.randn((s.world * B, *x0.shape[1:]), generator=g, device=g.device)[mine]
    eps_in = eps  # what x_t is made from: eps, as in the paper; the target stays eps in any case
    if s.cfg.input_perturbation:  # [input perturbation] beyond the paper: x_t from eps + gamma eps'
        eps_prime = torch.randn((s.world * B, *x0.shape[1:]), generator=g, device=g.device)[mine]
        eps_in = eps + s.cfg.input_perturbation * eps_prime
    if y is not None:
        # [guidance, drop] each class becomes "no class" (index num_classes) with probability cond_drop: one
        # network learns both the conditional and the unconditional model
        drop = torch.rand((s.world * B,), generator=g, device=g.device)[mine] < s.cfg.cond_drop
        y = torch.where(drop, len(s.classes), y)

    # [alg. 1, line 5, the step] the gradient of L_simple by backward(), then Adam. The batch goes through
    # the network in chunks of s.micro_batch images; each chunk's mean loss, weighted by its share of the
    # batch, adds its part of the whole batch's gradient. DDP syncs the ranks after the last chunk only.
    s.optimizer.zero_grad(set_to_none=True)
    size, loss = s.micro_batch or B, 0
    for start in range(0, B, size):
        c = slice(start, start + size)  # this chunk's images
        with s.ddp.no_sync() if s.ddp and start + size < B else nullcontext():
            with s.autocast:
                y_c = None if y is None else y[c]
                part = loss_fn(s.net, s.sched, x0[c], t[c], eps[c], y_c, eps_in[c], s.cfg.min_snr)
                part = part * (len(x0[c]) / B)  # its share of the batch's mean
            part.backward()
        loss += part.detach()
    if s.cfg.grad_clip > 0:  # clip the gradient's norm, as the paper's code does
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.cfg.grad_clip)
    for group in s.optimizer.param_groups:
        group["lr"] = lr_at(step, s.cfg)
    s.optimizer.step()
    # [ema ramp] the EMA's decay ramps up as (1 + step) / (10 + step), so a short run's average leaves the
    # random initial weights behind
    ema_update(s.ema, s.model, min(s.cfg.ema_decay, (1 + step) / (10 + step)))

    return loss


# ----------------------------------------------------------------------------------------------
# The training loop: Algorithm 1 over and over. What is not DDPM is one call each into files.py
# and launch.py.

def train(cfg, resume=False):
    """Draw a batch, take a step, log; now and then a preview grid and a checkpoint. Under torchrun each
    process is one rank that takes its share of every batch, and DDP averages the gradients."""
    # The device, the ranks under torchrun, the run folder (locked), and a check that a UNet fits in memory.
    run = launch.start_run(cfg, resume, UNet)
    data, labels, classes = images.load(cfg, labels=True) if cfg.cond else (images.load(cfg), None, ())
    data, labels = data.to(run.device), labels if labels is None else labels.to(run.device)  # uint8 images
    bf16 = launch.use_bf16(cfg.precision, run.device)  # on CUDA, and on CPUs with bf16 units
    s = setup(cfg, run.device, run.rank, run.world, classes, bf16,
              cfg.micro_batch or launch.default_micro_batch(cfg, run.device, bf16))
    step = files.restore(s, run.ckpt_path) if resume else 0
    log = files.LossLog(run, step, cfg)  # progress bar and log.csv
    stop = launch.stop_on_ctrl_c(run.master)  # Ctrl-C ends the loop between two steps
    while step < cfg.steps and not stop:
        step += 1
        x0, y = random_batch(data, cfg.batch_size // run.world, s.data_generator, labels, run.rank, run.world)
        log.add(train_step(s, x0, step, y))
        if step % cfg.log_every == 0 or step % cfg.ckpt_every == 0 or step == cfg.steps:
            log.write(step, lr_at(step, cfg))  # stops the run if the loss is not finite, before any save
        with log.paused():  # previews and checkpoints do not count towards images/s
            if run.master and (step % cfg.ckpt_every == 0 or step == cfg.steps):  # the checkpoint first
                files.save_checkpoint(s, step, run.ckpt_path, cfg.keep_ckpts)
            if run.master and (step % cfg.sample_every == 0 or step == cfg.steps):
                preview(s, os.path.join(run.out_dir, "samples", f"step{step:07d}.png"))
    log.close()
    if stop:
        launch.interrupted(s, step, run)  # saves this step, says how to go on, exits
    launch.end_run(run, s.model)  # under torchrun: check that the ranks agree, close the group
    if run.master:
        print(f"done: {step} steps; checkpoint {run.ckpt_path}; previews in {run.out_dir}{os.sep}samples")
    return s.model, s.ema


# ----------------------------------------------------------------------------------------------
# Algorithm 2, sampling: from pure noise x_T, T steps of p_theta down to x_0.

def predict_x0(sched, xt, t, eps_pred):
    """Eq. 4 solved for x_0: the clean image that x_t and the network's noise eps_pred point back to."""
    alpha_bar = at(sched.alpha_bar, t)
    x0 = (xt - (1 - alpha_bar).sqrt() * eps_pred) / alpha_bar.sqrt()
    return x0.to(xt.dtype)


@torch.no_grad()
def p_sample(model, sched, xt, t, generator=None, var="beta", clip=True):
    """One step of Algorithm 2, x_{t-1} ~ p_theta(x_{t-1} | x_t), for a batch xt at one time index t (an int).
    var: sigma_t^2 = beta_t ("beta") or beta_tilde_t ("beta_tilde"). clip=False: Algorithm 2 as printed;
    clip=True (default) clips x_0 as the paper's code does."""
    t_batch = torch.full((len(xt),), t, device=xt.device)
    beta, alpha, alpha_bar = at(sched.beta, t_batch), at(sched.alpha, t_batch), at(sched.alpha_bar, t_batch)
    eps_pred = model(xt, t_batch).float()  # fp32, also when the network runs in bf16
    # [eq. 11] mu_theta(x_t, t) = 1 / sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta(x_t, t))
    mean = (xt - beta / (1 - alpha_bar).sqrt() * eps_pred) / alpha.sqrt()
    # [clip] Not in Algorithm 2, but in the paper's code: the same mean, as the posterior mean of eq. 7 at the
    # x_0 that eq. 4 gives back from eps_pred (put that x_0 into eq. 7 and eq. 11 comes out), with x_0 first
    # clipped to [-1, 1], where the data lies. Where the clip does not act the two agree to float rounding.
    if clip:
        mean, _ = q_posterior(sched, predict_x0(sched, xt, t_batch, eps_pred).clamp(-1, 1), xt, t_batch)
    # [sec. 3.2] sigma_t^2 = beta_t (the paper's choice) or beta_tilde_t (eq. 7): both gave similar samples
    sigma2 = beta if var == "beta" else (1 - at(sched.alpha_bar_prev, t_batch)) / (1 - alpha_bar) * beta
    # [alg. 2, line 3] z ~ N(0, I) if t > 1, else z = 0, in the paper's count; in this code's index, the last
    # step is t == 0 (paper step 1), which adds no noise: x_0 is the mean
    if t == 0:
        return mean.to(xt.dtype)
    z = torch.randn(xt.shape, device=xt.device, generator=generator)
    # [alg. 2, line 4] x_{t-1} = mu_theta(x_t, t) + sigma_t z
    x_prev = mean + sigma2.sqrt() * z

    return x_prev.to(xt.dtype)


@torch.no_grad()
def p_sample_loop(model, sched, shape, generator=None, device="cpu", keep=(), var="beta", clip=True):
    """[alg. 2] x_T ~ N(0, I), then p_sample for t = T..1, with sigma_t^2 = var ("beta" or "beta_tilde").
    Returns x_0 and {s: x_s} for the paper steps s in `keep` (T is pure noise, 0 the result)."""
    x = torch.randn(shape, device=device, generator=generator)  # [alg. 2, line 1]
    trajectory = {sched.T: x} if sched.T in keep else {}
    for t in reversed(range(sched.T)):  # [alg. 2, line 2] index T-1..0 is paper step T..1
        x = p_sample(model, sched, x, t, generator, var, clip)
        if t in keep:
            trajectory[t] = x
    return x, trajectory


# ==============================================================================================
# BEYOND THE PAPER: a cosine schedule, samplers that skip steps, and classifier-free guidance.
# The network trained above serves them all unchanged.

def cosine_beta(T, s=0.008):
    """Nichol and Dhariwal 2021 (arXiv:2102.09672, eq. 17): alpha_bar_t = f(t) / f(0),
    f(t) = cos((t/T + s) / (1 + s) * pi/2)^2; beta clipped at 0.999 so the last step stays finite."""
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)


def timesteps(sched, steps, grid="uniform"):
    """`steps` distinct time indices from T-1 down to 0, where a sampler calls the network: evenly spaced in t
    ("uniform", DDIM's choice) or in lambda = log(sqrt(alpha_bar) / sqrt(1 - alpha_bar)), half the log
    signal-to-noise ratio ("lambda", DPM-Solver's), which puts more of them near t = 0."""
    steps = min(steps, sched.T)  # there are no more distinct steps than T
    if grid == "uniform":
        return torch.linspace(sched.T - 1, 0, steps).round().long()
    lam = 0.5 * (sched.alpha_bar / (1 - sched.alpha_bar)).log().cpu()  # falls as t grows
    ts = (lam.view(1, -1) - torch.linspace(lam[-1], lam[0], steps).view(-1, 1).double()).abs().argmin(1)
    # Where lambda is steep, several targets round to one index. Make them distinct, T-1 > ... > 0: with k
    # the steps left after each, ts - k must lie in [0, T - steps] and not rise from one to the next.
    k = torch.arange(steps - 1, -1, -1)
    return (ts - k).clamp(0, sched.T - steps).flip(0).cummax(0).values.flip(0) + k


def respace(model, sched, ts):
    """[Improved DDPM, sec. 4] Algorithm 2 on the subsequence ts of the steps: keep alpha_bar there, recompute
    beta_i = 1 - alpha_bar_{t_i} / alpha_bar_{t_(i-1)}, and feed the model the original index. The short chain
    then has the marginals q(x_t | x_0) of the long one. Returns (model, schedule) for p_sample_loop."""
    ts = ts.flip(0).to(sched.alpha_bar.device)  # ascending
    alpha_bar = sched.alpha_bar[ts]
    # [respace, beta] beta_i = 1 - alpha_bar_{t_i} / alpha_bar_{t_(i-1)}
    beta = 1 - alpha_bar / torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    # [respace, index] the network is fed the original index ts[i]
    return (lambda x, i: model(x, ts[i])), Schedule(beta.cpu()).to(sched.alpha_bar.device)


@torch.no_grad()
def ddim_sample(model, sched, shape, steps=50, eta=1.0, generator=None, device="cpu", keep=(),
                grid="uniform"):
    """DDIM (Song, Meng and Ermon 2021, arXiv:2010.02502, eq. 12) on `steps` of the T indices. The same
    eps_theta serves: only training's marginals q(x_t | x_0) matter; DDIM picks a non-Markovian process with
    them that can skip steps. eta = 0 is deterministic; eta = 1 with all steps is DDPM with beta_tilde_t."""
    ts = timesteps(sched, steps, grid).tolist()
    x = torch.randn(shape, device=device, generator=generator)
    trajectory = {sched.T: x} if sched.T in keep else {}
    for t, t_prev in zip(ts, ts[1:] + [-1]):  # -1: the last step lands on x_0
        t_batch = torch.full((shape[0],), t, device=device)
        alpha_bar = at(sched.alpha_bar, t_batch)
        # alpha_bar where this step lands; the last lands on x_0, where nothing is noised: alpha_bar_0 = 1
        t_prev_batch = torch.full_like(t_batch, t_prev)
        alpha_bar_prev = at(sched.alpha_bar, t_prev_batch) if t_prev >= 0 else torch.ones_like(alpha_bar)
        x0 = predict_x0(sched, x, t_batch, model(x, t_batch).float()).clamp(-1, 1)  # clipped, as in p_sample
        # [ddim eps] the eps that fits the clipped x0
        eps_pred = (x - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
        # [ddim eq. 16] sigma = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
        #                          * sqrt(1 - alpha_bar / alpha_bar_prev)
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
        # [ddim eq. 12] x_prev = sqrt(alpha_bar_prev) x0 + sqrt(1 - alpha_bar_prev - sigma^2) eps + sigma z
        x_prev = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma ** 2).sqrt() * eps_pred
        if t_prev >= 0 and eta > 0:
            x_prev = x_prev + sigma * torch.randn(shape, device=device, generator=generator)

        x = x_prev.float()  # the float64 schedule made it float64
        if t_prev + 1 in keep:  # x now sits at paper step t_prev + 1
            trajectory[t_prev + 1] = x
    return x, trajectory


def guided(model, y, w):
    """Classifier-free guidance (Ho and Salimans 2022, arXiv:2207.12598) for the classes y (B,), as a network
    that every sampler takes: w = 0 is the conditional model alone, a larger w leans harder to the class."""
    def eps(x, t):
        if w == 0:
            return model(x, t, y)
        # [guidance, eps] eps = (1 + w) eps(x, t, y) - w eps(x, t, no class); both halves in one batched pass
        no_class = torch.full_like(y, model.num_classes)
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, no_class])).float().chunk(2)
        return (1 + w) * cond - w * uncond
    return eps


def draw(model, sched, shape, sampler="ddpm", steps=None, eta=1.0, grid=None, generator=None, device="cpu"):
    """x_0 from a sampler by name: "ddpm" (Algorithm 2, respaced when steps < T), "ddim", "dpm++", "sde-dpm++"
    (solvers.py). Default steps: T for ddpm, else 50; default grid: lambda for DPM-Solvers, else uniform."""
    steps = steps or (sched.T if sampler == "ddpm" else min(50, sched.T))
    grid = grid or ("lambda" if "dpm++" in sampler else "uniform")
    if sampler == "ddpm":
        if steps < sched.T:
            model, sched = respace(model, sched, timesteps(sched, steps, grid))
        return p_sample_loop(model, sched, shape, generator, device)[0]
    if sampler == "ddim":
        return ddim_sample(model, sched, shape, steps, eta, generator, device, grid=grid)[0]
    ts, sde = timesteps(sched, steps, grid), sampler == "sde-dpm++"
    return solvers.dpm_solver_sample(model, sched.alpha_bar, ts, shape, generator, device, sde)


# ==============================================================================================
# CONFIG AND COMMANDS: every Config field is a flag of `train` (`python ddpm.py train --help` explains each).

@dataclass
class Config:
    preset: str = "tiny"            # tiny (CPU minutes), cars64 (the seed notebook), paper32 (the paper's)
    data: str = "toycars"           # toycars (drawn in memory), cars (Stanford Cars on disk), or a folder
    data_dir: str = ""              # where Stanford Cars lies; else $DDPM_DATA_DIR, else ./data/stanford_cars
    cond: bool = False              # class-conditional, for classifier-free guidance
    labels: str = ""                # with cond: a CSV of rows path,class, for a folder without class folders
    cond_drop: float = 0.1          # with cond: the probability that an image's class becomes "no class"
    image_size: int = 32            # H = W; divisible by 2 ** (len(ch_mult) - 1)
    n_toycars: int = 20000          # how many toy cars to draw
    T: int = 1000                   # [config T] diffusion steps
    schedule: str = "linear"        # linear (the paper) or cosine (Nichol and Dhariwal 2021)
    beta_1: float = 1e-4            # linear schedule: beta at t = 1
    beta_T: float = 0.02            # linear schedule: beta at t = T
    ch: int = 32                    # U-Net base channels
    ch_mult: tuple = (1, 2, 2)      # channels of each resolution level, as multiples of ch
    num_res_blocks: int = 1         # residual blocks per level on the way down (one more on the way up)
    attn_res: tuple = (8,)          # resolutions that get self-attention
    dropout: float = 0.0            # dropout inside residual blocks
    batch_size: int = 64            # images per step, over all ranks together
    micro_batch: int = 0            # images per forward and backward pass (0: chosen for the device)
    lr: float = 1e-3                # peak learning rate of Adam
    lr_schedule: str = "cosine"     # after warm-up: cosine (decay towards 0 at the last step) or constant
    warmup: int = 200               # steps of linear learning-rate warm-up
    steps: int = 2000               # training steps in all (a resumed run continues up to this)
    grad_clip: float = 1.0          # clip the gradient's global norm to this (0: off)
    min_snr: float = 0.0            # beyond the paper: Min-SNR-gamma's gamma (Hang et al. 2023: 5; 0: off)
    input_perturbation: float = 0.0 # beyond the paper: DDPM-IP's gamma (Ning et al. 2023: 0.1; 0: off)
    ema_decay: float = 0.995        # decay of the exponential moving average of the weights
    seed: int = 0                   # seed for data, noise and weights
    out_dir: str = ""               # run folder; default runs/<preset>
    device: str = "auto"            # auto (cuda, then mps, then cpu), cuda, mps or cpu
    precision: str = "auto"         # fp32 or bf16 autocast; auto: bf16 where the device runs it natively
    compile: bool = False           # torch.compile the U-Net (slow to start, faster after)
    log_every: int = 50             # steps between loss log rows (and non-finite checks)
    sample_every: int = 500         # steps between preview grids (DDIM, 50 steps, EMA weights)
    ckpt_every: int = 500           # steps between checkpoints (one is always written at the end)
    keep_ckpts: bool = False        # also keep every checkpoint as ckpt_step<N>.pt


PRESETS = {  # tiny: the defaults above with the batch, steps and learning rate of docs/recipe.md
    "tiny": dict(batch_size=32, lr=2e-3, steps=4000, warmup=400, sample_every=1000, ckpt_every=1000,
                 log_every=100),
    # The seed notebook: Stanford Cars at 64x64, T = 512, channels x (1, 2, 1, 1), attention at 16 and 8, Adam
    # 6e-4, warm-up then cosine decay, batch 100; 10.7M parameters (the seed's U-Net: 9.1M, another layout).
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
        raise checks.UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    return Config(**{**PRESETS[preset], **overrides, "preset": preset})


def preview(s, path):
    """The training loop's preview: 64 samples of DDIM (50 steps, eta = 1) from the EMA weights, from the same
    noise every time, so a run's grids show one set of images getting better; with classes, guided, w = 1."""
    shape, g = (64, 3, s.cfg.image_size, s.cfg.image_size), torch.Generator(s.device).manual_seed(s.cfg.seed)
    net = guided(s.ema, torch.arange(64, device=s.device) * len(s.classes) // 64, 1.0) if s.classes else s.ema
    with s.autocast:
        x, _ = ddim_sample(net, s.sched, shape, steps=50, eta=1.0, generator=g, device=s.device)
    checks.check_finite(x, "the preview", "the schedule (--T, --beta-1, --beta-T, --schedule)")
    files.save_grid(x, path)


def load_model(path, weights="ema", device="cpu"):
    """A trained eps_theta from a checkpoint, its EMA weights by default ("model": the raw ones).
    Returns (model in eval mode, its Config, the checkpoint dict)."""
    ckpt = files.load_checkpoint(path)
    cfg = files.config_from_checkpoint(Config, ckpt, path)
    files.check_shapes(lambda: UNet(cfg, len(ckpt.get("classes", []))), ckpt[weights], path)  # no memory yet
    model = UNet(cfg, len(ckpt.get("classes", [])))
    files.load_weights(model, ckpt[weights], path)
    return model.to(device).eval(), cfg, ckpt


def sample(args):
    path = args.ckpt or files.latest_checkpoint()
    device = launch.pick_device(args.device)
    model, cfg, ckpt = load_model(path, "model" if args.raw else "ema", device)
    at_once = args.n * (2 if ckpt.get("classes") else 1)  # guided: both halves in one batch
    launch.check_sample_args(args, cfg, UNet, device, at_once)
    out = args.out or os.path.join(os.path.dirname(path), f"sample_{args.sampler}.png")
    files.check_target(out, "--out")
    sched, g = Schedule.from_config(cfg).to(device), torch.Generator(device).manual_seed(args.seed)
    y, what = launch.sample_classes(args, ckpt.get("classes", []), device)  # --class, --guidance, checked
    net = guided(model, y, args.guidance) if y is not None else model
    how = f"{args.sampler} with {args.steps} steps" + (f", {args.grid} grid" if args.steps < cfg.T else "")
    t0, shape, how = time.time(), (args.n, 3, cfg.image_size, cfg.image_size), how + what
    bar = launch.progress(net, args.steps, how)  # the network, counting its calls on a progress bar
    with torch.inference_mode(), launch.autocast("auto", device), bar as net:
        x = draw(net, sched, shape, args.sampler, args.steps, args.eta, args.grid, g, device)
    checks.check_finite(x, "the samples", "--sampler, --steps, --eta" + (", --guidance" if what else ""))
    files.save_grid(x, out)
    if args.individual:
        files.save_images(x, args.individual)
    weights = f"{'raw' if args.raw else 'EMA'} weights of step {ckpt['step']}"
    print(f"wrote {out}: {args.n} samples, {how}, {weights}, in {time.time() - t0:.1f} s")


def main(argv=None):
    args = launch.parse_args(make_config("tiny"), __doc__.split("\n\n")[1], argv)  # --help: 2nd paragraph
    with checks.user_errors(launch.KEPT[args.command]):  # bad input: one paragraph, exit code 2, no traceback
        if args.command == "train":
            train(launch.resolve_config(Config, make_config, args.given, args.resume), args.resume)
        else:
            sample(args)


if __name__ == "__main__":
    main()
