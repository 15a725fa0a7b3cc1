"""How a command starts: its device and precision, torchrun's ranks, the run folder taken and given back,
Ctrl-C, and the command line of ddpm.py with its help texts and the checks of the sampling flags.
"""

import argparse, datetime, os, signal, sys
from contextlib import contextmanager
from dataclasses import fields
from types import SimpleNamespace

import torch

from checks import MAX_INT, Parser, UserError, check_config, check_memory, check_schedule_on, first_line
from files import (IMAGE_FORMATS, check_target, config_from_checkpoint, load_checkpoint, lock_run_folder,
                   save_checkpoint, writable_dir)


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


def autocast(precision, device):
    """The context the network runs in: bf16 autocast where use_bf16 says it pays, else plain fp32. Losses
    and the samplers' arithmetic stay in fp32 (ddpm.py casts with .float())."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(precision, device))


def default_micro_batch(cfg, device, bf16):
    """Images per forward and backward pass when --micro-batch is 0: on a CPU, as many as keep one
    full-resolution activation (ch x H x W) within 8 MiB, so that a layer's output is still in the CPU's
    cache when the next layer reads it: paper32 at batch 128 trains 1.7x faster in chunks of 16 (fp32) or
    32 (bf16) (bench.py, docs/speed.md). tiny's batch of 64 fits whole. Elsewhere 0: the whole batch at once."""
    if device.type != "cpu":
        return 0
    return max(1, 8 * 2 ** 20 // (cfg.ch * cfg.image_size ** 2 * (2 if bf16 else 4)))


TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def ranks():
    """(ddp, rank, world size, local rank) from the variables torchrun sets; one process without them. Part of
    them, or values that do not fit together, are refused rather than guessed at."""
    given = {k: os.environ[k] for k in TORCHRUN if k in os.environ}
    if not {"RANK", "WORLD_SIZE", "LOCAL_RANK"} & set(given):
        return False, 0, 1, 0
    try:
        rank, world, local_rank = (int(given[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        ok = 0 <= rank < world and 0 <= local_rank < world and given.get("MASTER_ADDR") \
            and given.get("MASTER_PORT", "").isdigit()
    except (KeyError, ValueError):
        ok = False
    if not ok:
        raise UserError("the environment holds part of what torchrun sets, or values that do not fit together ("
                        + ", ".join(f"{k}={given[k]!r}" if k in given else f"{k} unset" for k in TORCHRUN)
                        + "). Start a data-parallel run with torchrun (torchrun --nproc_per_node=2 ddpm.py train "
                          "...), or unset these variables to train in one process.")
    return True, rank, world, local_rank


def start_run(cfg, resume, UNet):
    """Device, rank and world size, and the run folder, which from now on belongs to this run: a second
    run on it is refused. Under torchrun each process is one rank of a process group: NCCL between GPUs,
    Gloo between CPU processes. UNet: ddpm.UNet, built without memory to check that the run fits."""
    ddp, rank, world, local_rank = ranks()
    device = pick_device(cfg.device, local_rank)
    check_schedule_on(cfg, device)
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} does not split over {world} ranks; use a multiple of {world}.")
    check_memory(cfg, UNet, device, world, chunk=cfg.micro_batch or default_micro_batch(
        cfg, device, use_bf16(cfg.precision, device)))
    out_dir = cfg.out_dir or os.path.join("runs", cfg.preset)
    run = SimpleNamespace(device=device, rank=rank, world=world, ddp=ddp, master=rank == 0, out_dir=out_dir,
                          ckpt_path=os.path.join(out_dir, "ckpt.pt"))
    if run.master:
        writable_dir(out_dir, "--out-dir")
        run.lock = lock_run_folder(out_dir)
        found = sorted(f for f in os.listdir(out_dir) if f.startswith("ckpt") and f.endswith(".pt"))
        if found and not resume:
            raise UserError(f"{out_dir} already holds checkpoints ({', '.join(found)}). Add --resume to continue "
                            f"the run, pass another --out-dir for a new one, or delete the folder to start over.")
    if ddp:  # each rank waits here for all the others, at most JOIN_TIMEOUT seconds
        if rank > 0:
            wait_for_rank_0(rank, world)
        try:
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                                 timeout=datetime.timedelta(seconds=JOIN_TIMEOUT))
        except RuntimeError as e:  # the store's timeout or refusal: a rank alone, or a rank 0 that never came
            raise UserError(f"rank {rank} of {world}: the other ranks did not join within {JOIN_TIMEOUT} s at "
                            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({first_line(e)}). Start every "
                            f"rank with torchrun, or unset RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, "
                            f"left from another run, to train in one process.") from None
    return run


JOIN_TIMEOUT = 300  # seconds a rank waits for the others when a run starts


def wait_for_rank_0(rank, world):
    """Rank 0 serves the process group's store at MASTER_ADDR:MASTER_PORT. Wait for it with a plain socket, so
    that a rank alone (torchrun's variables left from another run) gets one message, not c10d's stack traces."""
    import socket, time
    address, deadline = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])), time.time() + JOIN_TIMEOUT
    while True:
        try:
            socket.create_connection(address, timeout=1).close()
            return
        except OSError as e:
            if time.time() > deadline:
                raise UserError(f"rank {rank} of {world}: rank 0 did not answer at {address[0]}:{address[1]} within "
                                f"{JOIN_TIMEOUT} s ({e.strerror or first_line(e)}). Start every rank with torchrun, or "
                                f"unset RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, left from another "
                                f"run, to train in one process.") from None
            time.sleep(0.5)


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


def int_tuple(text):
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,2, not {text!r}") from None


HELP = {  # what each Config field of ddpm.py means, for `python ddpm.py train --help`
    "preset": "starting point: tiny (CPU minutes), cars64 (the seed notebook, GPU), paper32 (the paper's CIFAR-10 net)",
    "data": "toycars (drawn in memory, no download), cars (Stanford Cars on disk) or a folder of images",
    "data_dir": "where Stanford Cars lies; else $DDPM_DATA_DIR, else ./data/stanford_cars",
    "cond": "class-conditional, for classifier-free guidance: classes from class folders, --labels, or toy cars' colours",
    "labels": "with --cond, for a folder without class folders: a CSV file of rows path,class",
    "cond_drop": "with --cond: the probability that a training image's class is replaced by 'no class'",
    "image_size": "images are H = W = image_size; must be divisible by 2 ** (len(ch_mult) - 1)",
    "n_toycars": "how many toy cars to draw",
    "T": "diffusion steps",
    "schedule": "beta schedule: linear (the paper) or cosine (Nichol and Dhariwal 2021)",
    "beta_1": "linear schedule: beta at t = 1",
    "beta_T": "linear schedule: beta at t = T",
    "ch": "U-Net base channels",
    "ch_mult": "channels of each resolution level, as multiples of ch",
    "num_res_blocks": "residual blocks per level on the way down (one more on the way up)",
    "attn_res": "resolutions that get self-attention",
    "dropout": "dropout inside residual blocks",
    "batch_size": "images per step, over all ranks together",
    "micro_batch": "images per forward and backward pass: each rank's batch goes through in chunks this size, "
                   "whose gradients add up to the whole batch's: the same step, in less memory. 0: on a "
                   "CPU, chunks whose activations stay in its caches (faster); elsewhere the whole batch",
    "lr": "peak learning rate of Adam",
    "lr_schedule": "after warm-up: cosine (decay towards 0 at the last step) or constant",
    "warmup": "steps of linear learning-rate warm-up",
    "steps": "training steps in all (a resumed run continues up to this)",
    "grad_clip": "clip the gradient's global norm to this (0: off)",
    "ema_decay": "decay of the exponential moving average of the weights",
    "min_snr": "beyond the paper: Min-SNR-gamma loss weights min(SNR_t, gamma) / SNR_t (Hang et al. 2023 use 5; "
               "0: off, the paper's L_simple). See docs/recipe.md",
    "input_perturbation": "beyond the paper: DDPM-IP's gamma, x_t made with eps + gamma eps' while the target stays "
                          "eps (Ning et al. 2023 use 0.1; 0: off). See docs/recipe.md",
    "seed": "seed for data, noise and weights",
    "out_dir": "run folder for checkpoints, samples and the loss log; default runs/<preset>",
    "device": "auto (cuda, then mps, then cpu), cuda, mps or cpu",
    "precision": "fp32 or bf16 autocast; auto: bf16 on CUDA and on CPUs with native bf16, else fp32",
    "compile": "torch.compile the U-Net (slow to start, faster after)",
    "log_every": "steps between loss log rows (and non-finite checks)",
    "sample_every": "steps between preview grids (DDIM, 50 steps, EMA weights)",
    "ckpt_every": "steps between checkpoints (one is always written at the end)",
    "keep_ckpts": "also keep a copy of every checkpoint as ckpt_step<N>.pt (to evaluate over training)",
}


def parse_args(tiny, description, argv=None):
    """The arguments of `python ddpm.py train|sample`; train's flags are built from the fields of tiny, the tiny
    preset's Config, whose values --help shows as the defaults."""
    p = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="python ddpm.py train --help and python ddpm.py sample --help list every flag. "
                                       "Evaluation and the pictures of the docs are commands of their own: "
                                       "python evaluate.py --help, python plots.py --help.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model (Algorithm 1); writes runs/<preset>/",
                       description="Train eps_theta on --data. Flags override the --preset; defaults shown are the tiny preset's.",
                       argument_default=argparse.SUPPRESS)
    for f in fields(tiny):
        value = getattr(tiny, f.name)
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        flag, kw = "--" + f.name.replace("_", "-"), dict(help=f"{HELP[f.name]} (default: {shown})")
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
    add_sampler_args(s)
    s.add_argument("--class", dest="cls", metavar="NAME", help="a class-conditional model: draw this class (default: rows of its classes)")
    s.add_argument("--guidance", type=float, metavar="W", help="classifier-free guidance weight w >= 0: eps = (1 + w) eps(class) "
                   "- w eps(no class); w = 0 is the conditional model, and w here is s - 1 for a guidance scale s "
                   "(diffusers' guidance_scale; default 1, the best trade measured on toy cars)")
    s.add_argument("--seed", type=int, default=0, help="seed of the starting noise")
    s.add_argument("--out", help="PNG grid to write; default: sample_<sampler>.png beside the checkpoint")
    s.add_argument("--individual", metavar="DIR", help="also write each image as DIR/00000.png, ...")
    s.add_argument("--raw", action="store_true", help="use the raw weights instead of their EMA")
    s.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    args = p.parse_args(argv)
    if args.command == "train":
        args.given = {f.name: getattr(args, f.name) for f in fields(tiny) if hasattr(args, f.name)}
    return args


KEPT = {  # what each command keeps when Ctrl-C stops it before its end
    "train": "Checkpoints are only ever written whole: any that exists is intact, and --resume continues it.",
    "sample": "Nothing was written: the grid is written whole when all its images are drawn.",
}


def add_sampler_args(p):
    """The flags that choose a sampler, for sample and evaluate.py."""
    p.add_argument("--sampler", choices=("ddpm", "ddim", "dpm++", "sde-dpm++"), default="ddpm",
                   help="ddpm: Algorithm 2 (respaced when --steps < T); ddim: DDIM; dpm++: DPM-Solver++(2M); "
                        "sde-dpm++: SDE-DPM-Solver++(2M), with noise, for few steps on a briefly trained model")
    p.add_argument("--steps", type=int, help="network calls (default: T for ddpm, 50 for the others, at most T)")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM noise: 1 like DDPM, forgiving of short training; 0 deterministic")
    p.add_argument("--grid", choices=("uniform", "lambda"),
                   help="where the steps fall: evenly in t, or in log-SNR (default: lambda for dpm++ and sde-dpm++, uniform for the others)")


def check_sample_args(args, cfg, UNet, device, at_once, extra=None, flags="a smaller --n"):
    """sample's and evaluate.py's flags, against the checkpoint's config cfg; at_once: how many images are
    sampled together. Fills in the default --steps and --grid, which depend on the model's T and the sampler."""
    args.steps = (cfg.T if args.sampler == "ddpm" else min(50, cfg.T)) if args.steps is None else args.steps
    args.grid = args.grid or ("lambda" if "dpm++" in args.sampler else "uniform")
    if not 1 <= args.n <= MAX_INT:
        raise UserError(f"--n {args.n}: the number of images must be at least 1.")
    if not 1 <= args.steps <= cfg.T:
        raise UserError(f"--steps {args.steps}: the model has T = {cfg.T} steps, so a sampler can take from 1 to {cfg.T}.")
    if not 0 <= args.eta <= 1:  # also refuses nan
        raise UserError(f"--eta {args.eta}: DDIM's eta must lie in [0, 1] (0: deterministic, 1: the noise of DDPM); "
                        f"above 1 its variance exceeds what the step leaves, and the samples come out NaN.")
    if not 0 <= args.seed < 2 ** 63:
        raise UserError(f"--seed {args.seed} must be a whole number from 0 to 2**63 - 1.")
    if getattr(args, "individual", None):  # before the sampling, not after it
        writable_dir(args.individual, "--individual")
        for i in range(min(args.n, 10 ** 6)):
            check_target(os.path.join(args.individual, f"{i:05d}.png"), "--individual")
    out = getattr(args, "out", None)
    if out is not None and (os.path.isdir(out) or os.path.splitext(out)[1].lower() not in IMAGE_FORMATS):
        raise UserError(f"--out {out} must name an image file to write, ending in .png, .jpg or .jpeg"
                        + (" (it is a folder)" if os.path.isdir(out) else "") + ".")
    check_memory(cfg, UNet, device, images=at_once, training=False, flags=flags, extra=extra)


def sample_classes(args, classes, device):
    """sample's --class and --guidance against the checkpoint's classes (none: an unconditional model). Fills in
    the default guidance; returns the class of each of the --n images ((n,) long, or None) and a few words."""
    if not classes:
        if args.cls is not None or args.guidance is not None:
            raise UserError(f"--{'class' if args.cls is not None else 'guidance'} needs a class-conditional model "
                            f"(trained with --cond), and this checkpoint has no classes. Leave the flag out.")
        return None, ""
    args.guidance = 1.0 if args.guidance is None else args.guidance
    check_guidance(args.guidance)
    if args.cls is None:  # rows of classes: all of them when --n allows, else --n of them spread over the list
        y = torch.arange(args.n) * len(classes) // args.n
        return y.to(device), f", {len(set(y.tolist()))} classes in rows, guidance w = {args.guidance:g}"
    if args.cls not in classes:
        raise UserError(f"--class {args.cls!r}: the checkpoint has no such class. Its {len(classes)} classes: "
                        f"{', '.join(classes)}.")
    return torch.full((args.n,), classes.index(args.cls), device=device), f", class {args.cls}, guidance w = {args.guidance:g}"


def check_guidance(w, flag="--guidance"):
    """A guidance weight: from 0 to 1000. 1 to 7 are usual; weights near float's limit overflow the step's
    arithmetic (eps = (1 + w) eps(class) - w eps(no class)) and the samples come out NaN."""
    if not 0 <= w <= 1000:  # also refuses nan
        raise UserError(f"{flag} {w:g}: the guidance weight w must be a number from 0 to 1000 (0: the conditional "
                        f"model alone; 1 to 7 are usual; far larger weights overflow and the samples come out NaN).")
    return w


@contextmanager
def progress(model, calls, desc):
    """The network, counting its calls on a progress bar (on stderr) while a sampler runs: samplers stay as
    they are, and every one of them gets the bar."""
    from tqdm import tqdm
    with tqdm(total=calls, desc=desc, unit="step", leave=False, dynamic_ncols=True) as bar:
        def counted(*args):
            out = model(*args)
            bar.update()
            return out
        yield counted


# What a resumed run cannot change: the network, the schedule, and the data (the toy cars drawn depend on the seed).
ARCH_FIELDS = ("image_size", "T", "schedule", "beta_1", "beta_T", "ch", "ch_mult", "num_res_blocks", "attn_res", "data",
               "cond", "n_toycars", "seed")


def resolve_config(Config, make_config, given, resume):
    """Config from defaults < preset < (the checkpoint, when resuming) < flags given on the command line,
    checked before any work starts."""
    given = dict(given)
    preset = given.pop("preset", None)
    cfg = make_config(preset or "tiny", **given)
    check_config(cfg)
    if resume:
        ckpt_path = os.path.join(cfg.out_dir or os.path.join("runs", cfg.preset), "ckpt.pt")
        if not os.path.isfile(ckpt_path):
            raise UserError(f"--resume: there is no checkpoint to continue at {ckpt_path}. Name the run's folder with "
                            f"--out-dir (and its --preset), or drop --resume to start a new run.")
        ckpt = load_checkpoint(ckpt_path, "--out-dir")
        saved = config_from_checkpoint(Config, ckpt, ckpt_path)
        cfg = config_from_checkpoint(Config, ckpt, ckpt_path, **given)
        check_config(cfg)
        changed = [k for k in ARCH_FIELDS if getattr(cfg, k) != getattr(saved, k)]
        changed += ["preset"] if preset is not None and preset != saved.preset else []
        if changed:
            raise UserError(f"cannot resume {ckpt_path} with a different " + ", ".join(
                f"--{k.replace('_', '-')} (it was trained with {getattr(saved, k)!r})" for k in changed)
                + ". Drop those flags to continue it, or start a new run with --out-dir.")
    return cfg

