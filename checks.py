"""Checks and estimates: what every setting may be, whether a command's work fits in memory, and how bad
input is reported.

Every command runs inside user_errors(): a UserError prints its one-paragraph message and exits with code 2,
no traceback. Nothing here knows the math, and this module imports nothing of the project; the modules beside
ddpm.py import one way only:

    checks.py  <-  files.py  <-  launch.py  <-  images.py  <-  ddpm.py  <-  evaluate.py, plots.py, bench.py,
                                                  solvers.py  <-              sweep.py, mistakes.py
"""

import argparse, math, re, signal, sys
from contextlib import contextmanager
from dataclasses import fields

import torch


class UserError(Exception):
    """Bad input: the commands print the message, exit with code 2 and show no traceback."""


@contextmanager
def user_errors(kept="Every file is written whole, so any that exists is intact."):
    """Around a command: bad input prints its one-paragraph message and exits 2, Ctrl-C exits 130 and says
    what the command keeps (kept)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises KeyboardInterrupt again
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\ninterrupted. {kept}", file=sys.stderr)
        sys.exit(130)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors in the form of every other bad input: one paragraph, error: first, exit code 2."""

    def error(self, message):
        print(f"error: {message}. {self.prog} --help lists every flag.", file=sys.stderr)
        sys.exit(2)


def first_line(e):
    """The first line of an exception's message, or its type when the message is empty (EOFError)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # no terminal colour codes
    return text.splitlines()[0] if text else type(e).__name__


def summary(classes, most=8):
    """Class names for a message: how many, and the first few."""
    if not classes:
        return "none (an unconditional model)"
    return f"{len(classes)} ({', '.join(classes[:most])}{', ...' if len(classes) > most else ''})"


def check_finite(x, what, suspects="the sampler's settings (--sampler, --steps, --eta)"):
    """Stop with a message, rather than save black images, when a sampler produced NaN or infinite values.
    suspects: the settings of this command that could have caused it."""
    if not torch.isfinite(x).all():
        raise UserError(f"{what} came out NaN or infinite; nothing was written. The weights are finite (they are "
                        f"checked when loaded), so look at {suspects}.")


def check_range(flag, value, lo, hi, what=""):
    """A flag's number within [lo, hi] (nan fails too), or a message that names the flag."""
    if not (isinstance(value, (int, float)) and lo <= value <= hi):
        shown = f"{hi:,}" if isinstance(hi, int) else f"{hi:g}"
        raise UserError(f"{flag} {value}: must be {what or 'a number'} from {lo:g} to {shown}.")
    return value


def numbers(text, flag, kind=int, lo=0, hi=None, hi_is=""):
    """A flag of comma-separated numbers, such as --calls 5,10,20, each within [lo, hi]; hi_is says what hi is."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(lo <= v <= (MAX_INT if hi is None else hi) for v in values):
        raise UserError(f"{flag} {text}: give {'whole ' if kind is int else ''}numbers from {lo:g} to "
                        f"{MAX_INT if hi is None else hi:g}{hi_is}, separated by commas, such as {flag} "
                        f"{','.join(str(kind(v)) for v in (max(lo, 1), max(lo, 1) * 2))}.")
    return values


MAX_INT = 2 ** 31 - 1  # far beyond any sensible value; keeps every count within torch's and the OS's integers


RULES = {  # field: (test, what it must be)
    "image_size": (lambda v: 1 <= v <= MAX_INT, "a whole number of pixels, at least 1"),
    "n_toycars": (lambda v: 1 <= v <= MAX_INT, "at least 1"),
    "T": (lambda v: 1 <= v <= 100_000, "a number of diffusion steps from 1 to 100,000 (the paper: 1000)"),
    "schedule": (lambda v: v in ("linear", "cosine"), "linear or cosine"),
    "beta_1": (lambda v: 0 < v < 1, "a variance in (0, 1) (the paper: 1e-4)"),
    "beta_T": (lambda v: 0 < v < 1, "a variance in (0, 1) (the paper: 0.02)"),
    "ch": (lambda v: 4 <= v <= 65536 and v % 4 == 0, "a multiple of 4, at least 4 (group norm works in groups of c / 4 "
                                                     "channels at most, and the time embedding needs an even width)"),
    "ch_mult": (lambda v: 1 <= len(v) <= 16 and all(1 <= m <= 64 for m in v), "one to 16 whole multipliers, each from 1 to 64"),
    "num_res_blocks": (lambda v: 1 <= v <= 64, "from 1 to 64"),
    "attn_res": (lambda v: all(1 <= r <= MAX_INT for r in v), "resolutions in pixels"),
    "dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "cond_drop": (lambda v: 0 <= v <= 1, "a probability in [0, 1] (0.1 in Ho and Salimans' experiments; 0: no unconditional model to guide with)"),
    "batch_size": (lambda v: 1 <= v <= MAX_INT, "at least 1"),
    "micro_batch": (lambda v: 0 <= v <= MAX_INT, "at least 0 (0: chosen for the device)"),
    "lr": (lambda v: 0 < v < math.inf, "a positive learning rate"),
    "lr_schedule": (lambda v: v in ("cosine", "constant"), "cosine or constant"),
    "warmup": (lambda v: 0 <= v <= MAX_INT, "at least 0 (0: no warm-up)"),
    "steps": (lambda v: 1 <= v <= MAX_INT, "at least 1"),
    "grad_clip": (lambda v: 0 <= v < math.inf, "a norm, at least 0 (0: no clipping)"),
    "ema_decay": (lambda v: 0 <= v < 1, "a decay in [0, 1) (the paper: 0.9999)"),
    "min_snr": (lambda v: 0 <= v < math.inf, "a gamma, at least 0 (0: off, the paper's L_simple; Hang et al.: 5)"),
    "input_perturbation": (lambda v: 0 <= v <= 10, "a gamma from 0 to 10 (0: off, the paper's; Ning et al.: 0.1)"),
    "seed": (lambda v: 0 <= v < 2 ** 63, "a whole number from 0 to 2**63 - 1"),
    "precision": (lambda v: v in ("auto", "fp32", "bf16"), "auto, fp32 or bf16"),
    "log_every": (lambda v: 1 <= v <= MAX_INT, "at least 1"),
    "sample_every": (lambda v: 1 <= v <= MAX_INT, "at least 1"),
    "ckpt_every": (lambda v: 1 <= v <= MAX_INT, "at least 1"),
}


def check_config(cfg, source=""):
    """Refuse a config that cannot train or would train on nonsense, naming the flag and what it must be.
    source: where the config came from when not the command line (a checkpoint)."""
    def refuse(name, why):
        value = getattr(cfg, name)
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        where = f" in {source}" if source else ""
        raise UserError(f"--{name.replace('_', '-')} {shown}{where}: {why}.")
    for f in fields(cfg):  # first the types, as a checkpoint's config may hold anything
        value, kind = getattr(cfg, f.name), type(f.default)
        ok = isinstance(value, bool) if kind is bool else isinstance(value, str) if kind is str else \
            isinstance(value, tuple) and all(type(v) is int for v in value) if kind is tuple else \
            type(value) is int if kind is int else type(value) in (int, float) and math.isfinite(value)
        if not ok:
            kind_name = "a finite number" if kind is float else "whole numbers" if kind is tuple else "a " + kind.__name__
            refuse(f.name, f"must be {kind_name}" + (f", {RULES[f.name][1]}" if f.name in RULES else ""))
    for name, (test, what) in RULES.items():
        if not test(getattr(cfg, name)):
            refuse(name, f"must be {what}")
    if cfg.beta_1 > cfg.beta_T:
        refuse("beta_1", f"must not exceed --beta-T {cfg.beta_T}: the noise added per step grows with t")
    if cfg.schedule == "linear" and 1 - cfg.beta_1 == 1:  # the schedule is float64 (float32 on MPS)
        refuse("beta_1", "is so small that 1 - beta rounds to 1 in the schedule's float64: the first step would "
                         "add no noise at all and its samples come out NaN (the paper: 1e-4)")
    if cfg.labels and not cfg.cond:
        refuse("labels", "gives classes, which only a class-conditional run uses: add --cond, or drop --labels")
    if cfg.labels and cfg.data == "toycars":
        refuse("labels", "is for a folder of images; the toy cars' classes are their colours. Drop --labels")
    levels = len(cfg.ch_mult)
    if cfg.image_size % 2 ** (levels - 1):
        refuse("image_size", f"cannot go through {levels} levels of the U-Net: it must be divisible by 2 ** {levels - 1} = "
                             f"{2 ** (levels - 1)}. Pick another --image-size, or fewer levels with --ch-mult")
    if cfg.data == "toycars" and cfg.image_size < 8:
        refuse("image_size", "is too small for the toy cars, which are drawn from 8 pixels up")
    reached = [cfg.image_size // 2 ** i for i in range(levels)]
    if not set(cfg.attn_res) <= set(reached):
        refuse("attn_res", f"names resolutions the U-Net never reaches at --image-size {cfg.image_size} with "
                           f"{levels} levels; it reaches {', '.join(map(str, reached))}")


def check_schedule_on(cfg, device):
    """The schedule is float32 on MPS (it has no float64): there a smaller beta_1 than on other devices rounds
    1 - beta to 1, which check_config (float64) cannot see."""
    if device.type == "mps" and cfg.schedule == "linear" and 1 - torch.tensor(cfg.beta_1, dtype=torch.float32) == 1:
        raise UserError(f"--beta-1 {cfg.beta_1}: on MPS the schedule is float32, where 1 - beta rounds to 1 for so "
                        f"small a beta: the first step would add no noise and the samples come out NaN. Use a larger "
                        f"--beta-1 (the paper: 1e-4), or --device cpu.")


def available_memory(device):
    """Bytes that can still be allocated: free GPU memory, or MemAvailable on Linux; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        return None


def check_memory(cfg, UNet, device, world=1, images=None, training=True, chunk=0, flags=None, extra=None):
    """Refuse a run that cannot fit, before allocating: an allocation the machine over-commits ends in a
    kill that no handler can catch. The U-Net is built on the meta device (shapes, no memory) and run on
    one image, counting what autograd keeps for the backward pass; parameters count five times (weights,
    EMA, gradient, Adam's two moments). paper32 at batch 128 in one pass: 7.4 GB estimated, 7.6 GB peak
    measured by bench.py. Sampling keeps no activations: at least five image-sized tensors per image.
    chunk: images per forward and backward pass (0: cfg.micro_batch, or else the whole batch). extra: more of
    the command's working set, {what: bytes} (held-out images, features); flags: what to change, in its flags."""
    flags = flags or ("a smaller --batch-size or --micro-batch, --image-size, --T or network (--ch, --ch-mult)"
                      if training else "a smaller --n")
    try:
        with torch.device("meta"):
            model = UNet(cfg)
            x, t = torch.zeros(1, 3, cfg.image_size, cfg.image_size), torch.zeros(1, dtype=torch.long)
    except (RuntimeError, ValueError, OverflowError):  # sizes beyond what torch can even describe
        fits({"the network": math.inf}, device, flags)
    params, kept, seen = {id(p) for p in model.parameters()}, [], set()

    def count(tensor):  # each tensor autograd keeps, once: a view counts as the tensor it views
        base = tensor if tensor._base is None else tensor._base
        if id(base) not in params and id(base) not in seen:
            seen.add(id(base))
            kept.append(base.numel() * base.element_size())
        return tensor
    n_params = sum(p.numel() for p in model.parameters())
    pixels = 3 * cfg.image_size ** 2
    if training:
        try:
            with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
                model(x, t)
        except RuntimeError:  # sizes beyond what torch can even describe ("Storage size calculation overflowed")
            kept.append(math.inf)
        per_pass = min(cfg.batch_size // world, chunk or cfg.micro_batch or cfg.batch_size)
        parts = {"images": (cfg.n_toycars if cfg.data == "toycars" else 0) * pixels,
                 f"batch of {cfg.batch_size // world}": 3 * 4 * pixels * (cfg.batch_size // world),  # x_0, eps, x_t
                 "weights, EMA, gradients and Adam": 5 * 4 * n_params,
                 f"activations of {per_pass} images at once": per_pass * sum(kept),
                 "schedule": 3 * 8 * cfg.T}
    else:
        parts = {"weights": 4 * n_params,
                 f"{images} images being sampled": images * 4 * (5 * pixels + cfg.ch * cfg.image_size ** 2)}
    parts.update(extra or {})
    fits(parts, device, flags)
    return parts


def fits(parts, device, flags):
    """Refuse work whose memory, {what: bytes}, exceeds what the device has free, before any of it is allocated:
    an allocation the machine over-commits ends in a kill that no handler can catch. flags: what to change,
    in the command's own flags."""
    need, have = sum(parts.values()), available_memory(device)
    if not math.isfinite(need) or (have is not None and need > have):
        gb = lambda b: f"{b / 1e9:.3g} GB" if math.isfinite(b) else "more than any machine holds"
        raise UserError(f"this would need at least about {gb(need)} of memory on {device.type} ("
                        + ", ".join(f"{k} {gb(v)}" for k, v in parts.items() if v >= 0.01 * need)
                        + f"), and {'an unknown amount' if have is None else gb(have)} is available. Use {flags}.")

