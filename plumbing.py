"""The plumbing of ddpm.py: what a training run needs that is not DDPM.

ddpm.py is read beside the paper, so what a learner need not read lives here: checkpoint files and their
checks, the choice of device and precision, torchrun's process group, the run folder, Ctrl-C, the loss
log, and the command line with its help and checks. Nothing here knows the math. This module imports
nothing of the project, so every other one may import it and none of them is imported back:

    plumbing.py  <-  images.py  <-  ddpm.py  <-  evaluate.py, plots.py, bench.py, sweep.py, mistakes.py
                      solvers.py  <-
"""

import argparse, csv, glob, math, os, pickle, re, signal, socket, stat, sys, time
from contextlib import contextmanager
from dataclasses import asdict, fields
from types import SimpleNamespace

try:
    import fcntl  # the run folder's lock; POSIX only (on Windows runs go unlocked)
except ImportError:
    fcntl = None
import torch
from PIL import Image


class UserError(Exception):
    """Bad input: the commands print the message, exit with code 2 and show no traceback."""


@contextmanager
def user_errors():
    """Around a command: bad input prints its one-paragraph message and exits 2, Ctrl-C exits 130."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises KeyboardInterrupt again
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C (the loop saves at the first)
        print("\ninterrupted. A checkpoint is only ever written whole, so any that exists is intact.", file=sys.stderr)
        sys.exit(130)


def first_line(e):
    """The first line of an exception's message, or its type when the message is empty (EOFError)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # no terminal colour codes
    return text.splitlines()[0] if text else type(e).__name__


# ----------------------------------------------------------------------------------------------
# Files: written to a temporary name, then renamed, so that a crash never leaves half a file.

class WriteError(UserError):
    """A file could not be written (disk full, no permission, ...); what was there before is untouched."""


@contextmanager
def atomic(path):
    """Yields a temporary name beside path; after the body wrote it, renames it to path. A crash, Ctrl-C or
    failed write never leaves a half-written file at path: the old one, if any, stays whole."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        raise WriteError(f"could not write {path} ({first_line(e)}). Whatever was there before is untouched. "
                         f"Free some disk space, fix the folder's permissions, or choose another folder.") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path):
    """torch.save, atomically (see atomic)."""
    with atomic(path) as tmp:
        torch.save(obj, tmp)


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def save_grid(x, path, nrow=None):
    """x: (B, 3, H, W) in [-1, 1] -> one grid image, PNG or JPEG by path's suffix, written atomically (its
    folder is made if need be)."""
    from torchvision.utils import make_grid
    # [grid] [-1, 1] to [0, 1], the range make_grid and the PNG expect
    grid = make_grid((x.float().clamp(-1, 1) + 1) / 2, nrow=nrow or math.ceil(math.sqrt(len(x))), padding=1)

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic(path) as tmp:
        Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).cpu().numpy()).save(
            tmp, format=IMAGE_FORMATS[os.path.splitext(path)[1].lower()], quality=95)


def save_images(x, folder):
    """Each image of x: (B, 3, H, W) in [-1, 1] as folder/00000.png, folder/00001.png, ..."""
    writable_dir(folder, "--individual")
    for i, img in enumerate(x):
        save_grid(img[None], os.path.join(folder, f"{i:05d}.png"), nrow=1)


def writable_dir(path, flag):
    """Make the folder path if need be and check that files can be written there; flag names the option
    that chose it, for the message."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to the folder {path} ({e.strerror or first_line(e)}). Choose a writable "
                        f"one with {flag}, or fix its permissions.") from None
    return path


# ----------------------------------------------------------------------------------------------
# Checkpoints: one file per run, loaded without running code.

def load_checkpoint(path, flag="--ckpt"):
    """A checkpoint dict, loaded with weights_only=True so that a stranger's file cannot run code, and
    checked to hold what ddpm.py writes. flag: the option that names the file, for the messages."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}. Train one first (python ddpm.py train), or name one with {flag}.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's safe loader met something it will not build
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = (f"it holds pickled Python objects besides tensors and plain values ({found.group(1)})" if found else
                f"it is either not a file written by torch.save ({os.path.getsize(path)} bytes) or holds pickled "
                f"Python objects besides tensors and plain values")
        raise UserError(f"refused to load {path}: {what}, and loading those could run code on this machine. Only "
                        f"load checkpoints written by ddpm.py.") from None
    except Exception:  # empty, truncated, random bytes, not a torch file at all, ...
        raise UserError(f"could not read {path} as a checkpoint: it is not a complete file written by torch.save "
                        f"({os.path.getsize(path)} bytes; empty, truncated, or another kind of file). Use another "
                        f"checkpoint, or retrain.") from None
    tensors = lambda v: isinstance(v, dict) and all(isinstance(k, str) and torch.is_tensor(x) for k, x in v.items())
    if not (isinstance(ckpt, dict) and tensors(ckpt.get("model")) and tensors(ckpt.get("ema"))
            and isinstance(ckpt.get("config"), dict) and type(ckpt.get("step")) is int and ckpt["step"] >= 0
            and isinstance(ckpt.get("classes", []), list) and all(type(c) is str for c in ckpt.get("classes", []))):
        raise UserError(f"{path} is a torch file but not a ddpm.py checkpoint: it lacks the model and ema weights "
                        f"(name -> tensor), the config (a dict) or the step (a whole number), or its class names are not a list of text.")
    return ckpt


def config_from_checkpoint(Config, ckpt, path, **overrides):
    """The Config a checkpoint was trained with (fields it does not know keep their defaults), checked as
    the command line's is; overrides are flags given now."""
    known = {f.name: f.default for f in fields(Config)}
    saved = {k: tuple(v) if isinstance(known[k], tuple) and isinstance(v, (list, tuple)) else v
             for k, v in ckpt["config"].items() if k in known}
    check_config(Config(**saved), f"the config saved in {path}")
    return Config(**{**saved, **overrides})


def load_weights(module, state, path):
    """Load a state dict, refusing weights that do not fit the network or are not finite numbers."""
    if any(v.is_floating_point() and not torch.isfinite(v).all() for v in state.values()):
        raise UserError(f"the weights in {path} hold NaN or infinite values: the run that wrote it diverged. Use "
                        f"an earlier checkpoint (train keeps one per --ckpt-every with --keep-ckpts), or retrain.")
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"the weights in {path} do not fit the network its config describes; the checkpoint "
                        f"comes from another config or another version ({str(e).splitlines()[1].strip()}).") from None


def save_checkpoint(s, step, path, keep_copy=False):
    """Everything that resuming needs to continue exactly: weights, EMA, Adam, step, config, random states.
    s is ddpm.setup()'s namespace. keep_copy also keeps this one as ckpt_step<step>.pt beside it. Weights
    that are no longer finite stop the run instead, and the last good checkpoint stays."""
    for name, module in (("weights", s.model), ("EMA weights", s.ema)):
        if not all(torch.isfinite(p).all() for p in module.parameters()):
            raise UserError(f"the {name} became NaN or infinite by step {step}, so they were not saved; the last "
                            f"good checkpoint, if any, is still {path}. Try a lower --lr (now {s.cfg.lr:g})"
                            + (" or clipping with --grad-clip 1." if not s.cfg.grad_clip else "."))
    rng = {"torch": torch.get_rng_state(), "data": s.data_generator.get_state(),
           "noise": s.noise_generator.get_state()}
    if s.device.type == "cuda":  # dropout's masks on a GPU come from the GPU's own generator
        rng["cuda"] = torch.cuda.get_rng_state(s.device)
    state = {"model": s.model.state_dict(), "ema": s.ema.state_dict(), "opt": s.optimizer.state_dict(),
             "step": step, "config": asdict(s.cfg), "rng": rng}
    if s.classes:  # a class-conditional model: its class names, in the order of its label embedding
        state["classes"] = list(s.classes)
    atomic_save(state, path)
    if keep_copy:
        atomic_save(state, os.path.join(os.path.dirname(path), f"ckpt_step{step}.pt"))


def restore(s, path):
    """Load the checkpoint at path into ddpm.setup()'s namespace s, random states included; returns its step."""
    ckpt = load_checkpoint(path, "--out-dir")
    rng = ckpt.get("rng")
    if not isinstance(ckpt.get("opt"), dict) or not isinstance(rng, dict) \
            or not all(torch.is_tensor(rng.get(k)) for k in ("torch", "data", "noise")):
        raise UserError(f"{path} cannot be resumed: it lacks Adam's state or the random states (opt and rng). It can "
                        f"still sample (python ddpm.py sample --ckpt {path}); to train on, start a new run.")
    if ckpt.get("classes", []) != s.classes:
        raise UserError(f"{path} was trained on the classes {summary(ckpt.get('classes', []))}, but the data now has "
                        f"{summary(s.classes)}: resuming would mix up the labels. Train on the same data, or start a new run.")
    load_weights(s.model, ckpt["model"], path)
    load_weights(s.ema, ckpt["ema"], path)
    check_adam_state(ckpt["opt"], s.model, path)
    try:
        s.optimizer.load_state_dict(ckpt["opt"])
        torch.set_rng_state(rng["torch"])
        s.data_generator.set_state(rng["data"])
        s.noise_generator.set_state(rng["noise"])
        if s.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], s.device)
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"{path} cannot be resumed: its Adam or random state does not fit this run "
                        f"({first_line(e)}).") from None
    return ckpt["step"]


def check_adam_state(opt, model, path):
    """Adam's moments must fit the parameters and be finite numbers before the first step: fused Adam does not
    check shapes, and a mismatch crashed the process (a segmentation fault) instead of saying why."""
    state, params = opt.get("state"), list(model.parameters())
    ok = isinstance(state, dict) and all(isinstance(v, dict) for v in state.values())
    for i, moments in (state.items() if ok else []):
        p = params[i] if isinstance(i, int) and 0 <= i < len(params) else None
        for key in ("exp_avg", "exp_avg_sq"):
            m = moments.get(key)
            ok = ok and p is not None and torch.is_tensor(m) and m.shape == p.shape and m.is_floating_point() \
                and bool(torch.isfinite(m).all())
    if not ok:
        raise UserError(f"{path} cannot be resumed: its Adam state does not fit the network's parameters (shapes, "
                        f"dtypes), or holds NaN or infinite moments. It can still sample (python ddpm.py sample "
                        f"--ckpt {path}); to train on, start a new run with another --out-dir.")


def summary(classes, most=8):
    """Class names for a message: how many, and the first few."""
    if not classes:
        return "none (an unconditional model)"
    return f"{len(classes)} ({', '.join(classes[:most])}{', ...' if len(classes) > most else ''})"


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


# ----------------------------------------------------------------------------------------------
# A training run: its ranks, its folder, its log, Ctrl-C.

def start_run(cfg, resume, UNet):
    """Device, rank and world size, and the run folder, which from now on belongs to this run: a second
    run on it is refused. Under torchrun each process is one rank of a process group: NCCL between GPUs,
    Gloo between CPU processes. UNet: ddpm.UNet, built without memory to check that the run fits."""
    ddp = "RANK" in os.environ
    rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")) if ddp else (0, 1, 0)
    device = pick_device(cfg.device, local_rank)
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} does not split over {world} ranks; use a multiple of {world}.")
    check_memory(cfg, UNet, device, world)
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
    if ddp:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return run


def lock_run_folder(out_dir):
    """Take the run folder for this process: an exclusive flock on out_dir/.lock, which the kernel releases
    when the process ends, even by kill -9 (a PID file alone is fooled by PID reuse). The holder writes its
    PID and host into the file for the message another run gets. Then leftovers of dead runs go: temporary
    checkpoint files (only the lock's holder writes them) and temporary pictures of processes gone."""
    if fcntl is None:
        return None
    path = os.path.join(out_dir, ".lock")
    try:  # never through a symlink, and only a regular file: the lock is our own bookkeeping
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError("not a regular file")
    except OSError as e:
        raise UserError(f"cannot use {path} as the run folder's lock ({e.strerror or first_line(e)}; a symlink, a "
                        f"folder or an unreadable file). Remove it, or pass another --out-dir.") from None
    f = os.fdopen(fd, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        raise UserError(f"{out_dir} is in use by another run ({holder}). Wait for it to finish or stop it, or "
                        f"pass another --out-dir. One run per folder keeps checkpoints and log.csv whole.") from None
    f.seek(0)
    f.truncate()
    f.write(f"PID {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    folder = glob.escape(out_dir)
    for tmp in glob.glob(os.path.join(folder, "*.tmp*")) + glob.glob(os.path.join(folder, "samples", "*.tmp*")):
        pid = tmp.rsplit(".tmp", 1)[1]
        if ".pt.tmp" in tmp or (pid.isdigit() and not pid_alive(int(pid))):
            os.remove(tmp)
    return f  # kept open for as long as the run lasts


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, but someone else's
        return True
    return True


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
        path, rows, fields = os.path.join(run.out_dir, "log.csv"), [], ["step", "loss", "lr", "img_per_s", "seconds"]
        if step > 0 and os.path.isfile(path):  # keep the rows up to the checkpoint's step
            try:
                with open(path, newline="") as f:
                    rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= step]
            except (OSError, UnicodeDecodeError, csv.Error):  # unreadable: start the log afresh
                rows = []
        # Written whole under a temporary name and renamed, then appended to: a kill at any moment leaves
        # either the old log or the new one with the kept rows, never an empty file.
        with atomic(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fields)
            w.writeheader()
            w.writerows({k: r.get(k) for k in fields} for r in rows)
        try:
            self.f = open(path, "a", newline="")
        except OSError as e:
            raise WriteError(f"could not open {path} to append the loss ({first_line(e)}). Free some disk space, "
                             f"fix the folder's permissions, or choose another --out-dir.") from None
        self.w = csv.DictWriter(self.f, fields)
        try:
            self.t0 = time.time() - float(rows[-1]["seconds"])
        except (IndexError, KeyError, TypeError, ValueError):  # a new log, or a damaged last row
            self.t0 = time.time()

    def add(self, loss):
        self.loss_sum += loss
        self.n += 1
        self.bar.update(1)

    def write(self, step, lr):
        if torch.distributed.is_initialized():  # the whole batch's loss, not rank 0's share
            torch.distributed.all_reduce(self.loss_sum)
            self.loss_sum /= torch.distributed.get_world_size()
        mean_loss = self.loss_sum.item() / self.n  # the one host sync, every log_every steps
        if not math.isfinite(mean_loss):
            raise UserError(f"the loss became {mean_loss} by step {step}; training stopped. The last good "
                            f"checkpoint, if any, is still in {self.out_dir}. Try a lower --lr (now {self.cfg.lr:g})"
                            + (" or clipping with --grad-clip 1." if not self.cfg.grad_clip else "."))
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
        args.given = {f.name: getattr(args, f.name) for f in fields(Config) if hasattr(args, f.name)}
    return args


def add_sampler_args(p):
    """The flags that choose a sampler, for sample and evaluate.py."""
    p.add_argument("--sampler", choices=("ddpm", "ddim", "dpm++", "sde-dpm++"), default="ddpm",
                   help="ddpm: Algorithm 2 (respaced when --steps < T); ddim: DDIM; dpm++: DPM-Solver++(2M); "
                        "sde-dpm++: SDE-DPM-Solver++(2M), with noise, for few steps on a briefly trained model")
    p.add_argument("--steps", type=int, help="network calls (default: T for ddpm, 50 for the others, at most T)")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM noise: 1 like DDPM, forgiving of short training; 0 deterministic")
    p.add_argument("--grid", choices=("uniform", "lambda"),
                   help="where the steps fall: evenly in t, or in log-SNR (default: lambda for dpm++ and sde-dpm++, uniform for the others)")


def check_sample_args(args, cfg, UNet, device, at_once):
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
    out = getattr(args, "out", None)
    if out is not None and (os.path.isdir(out) or os.path.splitext(out)[1].lower() not in IMAGE_FORMATS):
        raise UserError(f"--out {out} must name an image file to write, ending in .png, .jpg or .jpeg"
                        + (" (it is a folder)" if os.path.isdir(out) else "") + ".")
    check_memory(cfg, UNet, device, images=at_once, training=False)


def sample_classes(args, classes, device):
    """sample's --class and --guidance against the checkpoint's classes (none: an unconditional model). Fills in
    the default guidance; returns the class of each of the --n images ((n,) long, or None) and a few words."""
    if not classes:
        if args.cls is not None or args.guidance is not None:
            raise UserError(f"--{'class' if args.cls is not None else 'guidance'} needs a class-conditional model "
                            f"(trained with --cond), and this checkpoint has no classes. Leave the flag out.")
        return None, ""
    args.guidance = 1.0 if args.guidance is None else args.guidance
    if not 0 <= args.guidance < math.inf:  # also refuses nan
        raise UserError(f"--guidance {args.guidance}: the guidance weight w must be a finite number, at least 0 "
                        f"(0: the conditional model alone; 1 to 7 are usual).")
    if args.cls is None:  # rows of classes: all of them when --n allows, else --n of them spread over the list
        y = torch.arange(args.n) * len(classes) // args.n
        return y.to(device), f", {len(set(y.tolist()))} classes in rows, guidance w = {args.guidance:g}"
    if args.cls not in classes:
        raise UserError(f"--class {args.cls!r}: the checkpoint has no such class. Its {len(classes)} classes: "
                        f"{', '.join(classes)}.")
    return torch.full((args.n,), classes.index(args.cls), device=device), f", class {args.cls}, guidance w = {args.guidance:g}"


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


def check_finite(x, what):
    """Stop with a message, rather than save black images, when a sampler produced NaN or infinite values."""
    if not torch.isfinite(x).all():
        raise UserError(f"{what} came out NaN or infinite; nothing was written. The checkpoint's weights are finite "
                        f"(they are checked when loaded), so look at the sampler's settings (--eta, --steps) and at "
                        f"the schedule it was trained with (--beta-1, --beta-T).")


# ----------------------------------------------------------------------------------------------
# What every setting may be, checked before any work starts; a checkpoint's config goes through the same.

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


def available_memory(device):
    """Bytes that can still be allocated: free GPU memory, or MemAvailable on Linux; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        return None


def check_memory(cfg, UNet, device, world=1, images=None, training=True):
    """Refuse a run that cannot fit, before allocating: an allocation the machine over-commits ends in a
    kill that no handler can catch. The U-Net is built on the meta device (shapes, no memory) and run on
    one image, counting what autograd keeps for the backward pass; parameters count five times (weights,
    EMA, gradient, Adam's two moments). paper32 at batch 128 in one pass: 7.4 GB estimated, 7.6 GB peak
    measured by bench.py. Sampling keeps no activations: at least five image-sized tensors per image."""
    with torch.device("meta"):
        model = UNet(cfg)
        x, t = torch.zeros(1, 3, cfg.image_size, cfg.image_size), torch.zeros(1, dtype=torch.long)
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
        per_pass = min(cfg.batch_size // world, cfg.micro_batch
                       or default_micro_batch(cfg, device, use_bf16(cfg.precision, device)) or cfg.batch_size)
        parts = {"images": (cfg.n_toycars if cfg.data == "toycars" else 0) * pixels,
                 f"batch of {cfg.batch_size // world}": 3 * 4 * pixels * (cfg.batch_size // world),  # x_0, eps, x_t
                 "weights, EMA, gradients and Adam": 5 * 4 * n_params,
                 f"activations of {per_pass} images at once": per_pass * sum(kept),
                 "schedule": 3 * 8 * cfg.T}
    else:
        parts = {"weights": 4 * n_params,
                 f"{images} images being sampled": images * 4 * (5 * pixels + cfg.ch * cfg.image_size ** 2)}
    need, have = sum(parts.values()), available_memory(device)
    if have is not None and need > have:
        gb = lambda b: f"{b / 1e9:.3g} GB" if math.isfinite(b) else "more than any machine holds"
        raise UserError(f"this would need at least about {gb(need)} of memory on {device.type} ("
                        + ", ".join(f"{k} {gb(v)}" for k, v in parts.items() if v >= 0.01 * need)
                        + f"), and {gb(have)} is available. Use a smaller --batch-size or --micro-batch, --image-size, "
                          f"--n, --T or network (--ch, --ch-mult).")


ARCH_FIELDS = ("image_size", "T", "schedule", "beta_1", "beta_T", "ch", "ch_mult", "num_res_blocks", "attn_res", "data", "cond")


def resolve_config(Config, make_config, given, resume):
    """Config from defaults < preset < (the checkpoint, when resuming) < flags given on the command line,
    checked before any work starts."""
    given = dict(given)
    cfg = make_config(given.pop("preset", "tiny"), **given)
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
        if changed:
            raise UserError(f"cannot resume {ckpt_path} with a different " + ", ".join(
                f"--{k.replace('_', '-')} (it was trained with {getattr(saved, k)!r})" for k in changed)
                + ". Drop those flags to continue it, or start a new run with --out-dir.")
    return cfg
