"""The plumbing of ddpm.py: what a training run needs that is not DDPM.

ddpm.py is read beside the paper, so what a learner need not read lives here: checkpoint files and their
checks, the choice of device and precision, torchrun's process group and its random draws, the run folder,
Ctrl-C, the loss log, and the command line with its checks. Nothing here knows the math. This module imports
nothing of the project, so every other one may import it and none of them is imported back:

    plumbing.py  <-  images.py  <-  ddpm.py  <-  evaluate.py, plots.py, bench.py
"""

import argparse, csv, math, os, pickle, signal, sys, time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, fields
from types import SimpleNamespace

import torch
from PIL import Image


class UserError(Exception):
    """Bad input: the commands print the message, exit with code 2 and show no traceback."""


@contextmanager
def user_errors():
    """Around a command: bad input prints its one-paragraph message and exits 2, Ctrl-C exits 130."""
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted; the last checkpoint written is intact.", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------------------------
# Files: written to a temporary name, then renamed, so that a crash never leaves half a file.

def atomic_save(obj, path):
    """torch.save to path.tmp, then rename: a crash or Ctrl-C never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_grid(x, path, nrow=None):
    """x: (B, 3, H, W) in [-1, 1] -> one PNG grid, written atomically (its folder is made if need be)."""
    from torchvision.utils import make_grid
    grid = make_grid((x.float().clamp(-1, 1) + 1) / 2, nrow=nrow or math.ceil(math.sqrt(len(x))), padding=1)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).cpu().numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)


def save_images(x, folder):
    """Each image of x: (B, 3, H, W) in [-1, 1] as folder/00000.png, folder/00001.png, ..."""
    writable_dir(folder)
    for i, img in enumerate(x):
        save_grid(img[None], os.path.join(folder, f"{i:05d}.png"), nrow=1)


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
# Checkpoints: one file per run, loaded without running code.

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


def config_from_checkpoint(Config, ckpt, **overrides):
    """The Config a checkpoint was trained with (fields it does not know keep their defaults)."""
    known = {f.name: f.default for f in fields(Config)}
    saved = {k: tuple(v) if isinstance(known[k], tuple) else v for k, v in ckpt["config"].items() if k in known}
    return Config(**{**saved, **overrides})


def load_weights(module, state, path):
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"the weights in {path} do not fit the network its config describes; the checkpoint "
                        f"comes from another config or another version ({str(e).splitlines()[1].strip()}).") from None


def save_checkpoint(s, step, path, keep_copy=False):
    """Everything that resuming needs to continue exactly: weights, EMA, Adam, step, config, random states.
    s is ddpm.setup()'s namespace. keep_copy also keeps this one as ckpt_step<step>.pt beside it."""
    rng = {"torch": torch.get_rng_state(), "data": s.draw_data.generator.get_state(),
           "noise": s.draw_noise.generator.get_state()}
    state = {"model": s.model.state_dict(), "ema": s.ema.state_dict(), "opt": s.opt.state_dict(),
             "step": step, "config": asdict(s.cfg), "rng": rng}
    atomic_save(state, path)
    if keep_copy:
        atomic_save(state, os.path.join(os.path.dirname(path), f"ckpt_step{step}.pt"))


def restore(s, path):
    """Load the checkpoint at path into ddpm.setup()'s namespace s, random states included; returns its step."""
    ckpt = load_checkpoint(path)
    load_weights(s.model, ckpt["model"], path)
    load_weights(s.ema, ckpt["ema"], path)
    s.opt.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    s.draw_data.generator.set_state(ckpt["rng"]["data"])
    s.draw_noise.generator.set_state(ckpt["rng"]["noise"])
    return ckpt["step"]


def latest_checkpoint():
    found = [os.path.join("runs", d, "ckpt.pt") for d in (os.listdir("runs") if os.path.isdir("runs") else [])]
    found = [p for p in found if os.path.isfile(p)]
    if not found:
        raise UserError("no checkpoint found under runs/. Train one first (python ddpm.py train), or pass "
                        "--ckpt path/to/ckpt.pt.")
    return max(found, key=os.path.getmtime)


# ----------------------------------------------------------------------------------------------
# Device and precision.

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


def adam(params, lr, device):
    """Adam, fused into one kernel for all parameters where torch has it: 3.6x faster than the
    per-tensor loop on a CPU."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=device.type in ("cuda", "cpu"))
    except RuntimeError:  # torch < 2.4 has no fused Adam on the CPU
        return torch.optim.Adam(params, lr=lr)


def default_micro_batch(cfg, device, bf16):
    """Images per forward and backward pass when --micro-batch is 0: on a CPU, as many as keep one
    full-resolution activation (ch x H x W) within 8 MiB, so that a layer's output is still in the CPU's
    cache when the next layer reads it: paper32 at batch 128 trains 1.7x faster in chunks of 16 (fp32) or
    32 (bf16) (bench.py, README). tiny's batch of 64 fits whole. Elsewhere 0: the whole batch at once."""
    if device.type != "cpu":
        return 0
    return max(1, 8 * 2 ** 20 // (cfg.ch * cfg.image_size ** 2 * (2 if bf16 else 4)))


# ----------------------------------------------------------------------------------------------
# One step, exactly the same on any number of ranks and in any number of chunks.

class RankDraws:
    """Random draws for this rank's share of a global batch. Under torchrun each of `world` ranks takes
    B of the world * B images of every batch; it draws for all of them, in the same order as one
    process would, and keeps its own rows. So N ranks compute exactly what one process computes.
    Outside torchrun (rank 0 of 1) it is the generator itself."""

    def __init__(self, generator, rank=0, world=1):
        self.generator, self.rank, self.world = generator, rank, world

    def _mine(self, draw, shape):
        B = shape[0]
        whole = draw((self.world * B, *shape[1:]), generator=self.generator, device=self.generator.device)
        return whole[self.rank * B:(self.rank + 1) * B]

    def randint(self, low, high, shape):
        return self._mine(lambda *a, **k: torch.randint(low, high, *a, **k), shape)

    def randn(self, shape):
        return self._mine(torch.randn, shape)

    def rand(self, shape):
        return self._mine(torch.rand, shape)


def backward(loss_of, batch, chunk, ddp=None, autocast=nullcontext()):
    """loss_of(*batch).backward(), passing the batch (a tuple of tensors that share their first dimension)
    through the network `chunk` rows at a time, or all at once when chunk is 0. Each chunk's mean loss,
    weighted by its share of the batch, adds its part of the batch's gradient, so the gradient is the same,
    in less memory. Under DDP the ranks average their gradients after the last chunk only.
    Returns the batch's loss, detached."""
    n = len(batch[0])
    chunks = list(zip(*(b.split(chunk or n) for b in batch)))
    loss = 0
    for i, part in enumerate(chunks):
        with ddp.no_sync() if ddp and i < len(chunks) - 1 else nullcontext():
            with autocast:
                weighted = loss_of(*part) * (len(part[0]) / n)
            weighted.backward()
        loss += weighted.detach()
    return loss


# ----------------------------------------------------------------------------------------------
# A training run: its ranks, its folder, its log, Ctrl-C.

def start_run(cfg):
    """Device, rank and world size, and the run folder. Under torchrun each process is one rank of a
    process group: NCCL between GPUs, Gloo between CPU processes."""
    ddp = "RANK" in os.environ
    rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")) if ddp else (0, 1, 0)
    device = pick_device(cfg.device, local_rank)
    if ddp:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} does not split over {world} ranks; use a multiple of {world}.")
    out_dir = cfg.out_dir or os.path.join("runs", cfg.preset)
    if rank == 0:
        writable_dir(out_dir)
    return SimpleNamespace(device=device, rank=rank, world=world, ddp=ddp, master=rank == 0, out_dir=out_dir,
                           ckpt_path=os.path.join(out_dir, "ckpt.pt"))


def wrap_ddp(model, device):
    """DistributedDataParallel around the model under torchrun (it averages the gradients of the ranks);
    None otherwise."""
    if not torch.distributed.is_initialized():
        return None
    return torch.nn.parallel.DistributedDataParallel(model, [device.index] if device.type == "cuda" else None)


def end_run(run, model):
    """Under torchrun: check once that the ranks hold the same weights, then close the process group."""
    if not run.ddp:
        return
    # The check runs on a process group of its own that is deleted right after, which waits for Gloo's
    # worker threads: DDP keeps the main group alive until interpreter exit, and a worker still freeing
    # an all-reduce of Python tensors then aborts the process (SIGABRT after a good run).
    group = torch.distributed.new_group()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    hi, lo = flat.clone(), flat.clone()
    torch.distributed.all_reduce(hi, torch.distributed.ReduceOp.MAX, group=group)
    torch.distributed.all_reduce(lo, torch.distributed.ReduceOp.MIN, group=group)
    torch.distributed.destroy_process_group(group)
    del group
    if run.master:
        print(f"{run.world} ranks agree: largest weight difference between ranks {(hi - lo).max().item():.3g}")
    torch.distributed.destroy_process_group()


def stop_on_ctrl_c(master):
    """A list that becomes non-empty at the first Ctrl-C, so that the loop stops between two steps and a step
    is never cut in half; a second Ctrl-C stops at once (the last checkpoint, written atomically, is whole)."""
    stop = []
    if master and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, lambda *_: (stop.append(1), signal.signal(signal.SIGINT, signal.default_int_handler)))
    return stop


def interrupted(s, step, run):
    """After Ctrl-C: save the step reached and say how to go on."""
    save_checkpoint(s, step, run.ckpt_path)
    print(f"\ninterrupted: saved step {step} to {run.ckpt_path}; continue with the same command and --resume",
          file=sys.stderr)
    sys.exit(130)


class LossLog:
    """The progress bar and log.csv (step, loss, lr, images/s, seconds since start) of rank 0. add() takes
    each step's loss as a tensor; write() reads their mean, one host sync per log row, and stops the run
    if it is not finite. A resumed run keeps the rows up to its step and drops the rest."""

    def __init__(self, run, step, cfg):
        from tqdm import tqdm
        self.cfg, self.out_dir, self.f = cfg, run.out_dir, None
        self.bar = tqdm(total=cfg.steps, initial=step, disable=not run.master, unit="step", dynamic_ncols=True)
        self.loss_sum, self.n, self.tic = torch.zeros((), device=run.device), 0, time.time()
        if not run.master:
            return
        path, rows = os.path.join(run.out_dir, "log.csv"), []
        if step > 0 and os.path.exists(path):
            with open(path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        self.f = open(path, "w", newline="")
        self.w = csv.DictWriter(self.f, ["step", "loss", "lr", "img_per_s", "seconds"])
        self.w.writeheader()
        self.w.writerows(rows)
        self.t0 = time.time() - (float(rows[-1]["seconds"]) if rows else 0.0)

    def add(self, loss):
        self.loss_sum += loss
        self.n += 1
        self.bar.update(1)

    def write(self, step, lr):
        mean_loss = self.loss_sum.item() / self.n  # the one host sync, every log_every steps
        if not math.isfinite(mean_loss):
            raise UserError(f"the loss became {mean_loss} by step {step}; training stopped. The last good "
                            f"checkpoint, if any, is still in {self.out_dir}. Try a lower --lr or --grad-clip 1.")
        speed = self.n * self.cfg.batch_size / (time.time() - self.tic)
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{speed:.0f}")
        if self.f:
            self.w.writerow(dict(step=step, loss=f"{mean_loss:.5f}", lr=f"{lr:.3g}", img_per_s=f"{speed:.1f}",
                                 seconds=f"{time.time() - self.t0:.1f}"))
            self.f.flush()
        self.loss_sum, self.n, self.tic = torch.zeros_like(self.loss_sum), 0, time.time()

    @contextmanager
    def paused(self):
        """Time spent inside does not count towards images/s (previews, checkpoints)."""
        paused = time.time()
        yield
        self.tic += time.time() - paused

    def close(self):
        self.bar.close()
        if self.f:
            self.f.close()


# ----------------------------------------------------------------------------------------------
# The command line of ddpm.py: every Config field is a flag of train.

def int_tuple(text):
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,2, not {text!r}") from None


def parse_args(Config, description, argv=None):
    """The arguments of `python ddpm.py train|sample`; train's flags are built from the Config dataclass."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="python ddpm.py train --help and python ddpm.py sample --help list every flag. "
                                       "Evaluation and the pictures of the docs are commands of their own: "
                                       "python evaluate.py --help, python plots.py --help.")
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
    args = p.parse_args(argv)
    if args.command == "train":
        args.given = {f.name: getattr(args, f.name) for f in fields(Config) if hasattr(args, f.name)}
    return args


def check_sample_args(args):
    if args.n < 1 or args.steps < 1:
        raise UserError("--n and --steps must be at least 1.")


ARCH_FIELDS = ("image_size", "T", "schedule", "beta_1", "beta_T", "ch", "ch_mult", "num_res_blocks", "attn_res")


def resolve_config(Config, make_config, given, resume):
    """Config from defaults < preset < (the checkpoint, when resuming) < flags given on the command line,
    checked before any work starts."""
    given = dict(given)
    cfg = make_config(given.pop("preset", "tiny"), **given)
    ckpt_path = os.path.join(cfg.out_dir or os.path.join("runs", cfg.preset), "ckpt.pt")
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        cfg = config_from_checkpoint(Config, ckpt, **given)
        saved = config_from_checkpoint(Config, ckpt)
        changed = [k for k in ARCH_FIELDS if getattr(cfg, k) != getattr(saved, k)]
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
