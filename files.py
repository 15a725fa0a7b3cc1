"""Every file the project writes and reads back: checkpoints, pictures and grids, result files, caches, the
loss log and the run folder's lock.

Writing: whole, to a temporary name in the same folder, then renamed, so that a crash, kill -9 or full disk
leaves the old file or the new one, never half of one; a failed write stops with a message and the old file
untouched. The lock is the one exception: it stays the same file, opened without following symlinks.
Reading: every file is checked for what the project wrote there (type, shape, dtype, finite numbers); what
can be recomputed is recomputed with a note, what cannot is refused, naming the file and what remakes it.
"""

import csv, glob, json, math, os, pickle, re, socket, stat, sys, time
from contextlib import contextmanager
from dataclasses import asdict, fields

try:
    import fcntl  # the run folder's lock; POSIX only (on Windows runs go unlocked)
except ImportError:
    fcntl = None
import torch
from PIL import Image

from checks import UserError, check_config, first_line, summary


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
        fix = ("Move the folder of that name out of the way" if os.path.isdir(path) else
               "Free some disk space, fix the folder's permissions, or choose another folder")
        raise WriteError(f"could not write {path} ({first_line(e)}). Whatever was there before is untouched. "
                         f"{fix}.") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path):
    """torch.save, atomically (see atomic)."""
    with atomic(path) as tmp:
        torch.save(obj, tmp)


def write_json(obj, path):
    """A result file, atomically (see atomic); numbers that are not finite are refused, as JSON has none."""
    with atomic(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=False)


KINDS = {"number": lambda v: type(v) in (int, float) and math.isfinite(v), "int": lambda v: type(v) is int,
         "text": lambda v: isinstance(v, str), "number or null": lambda v: v is None or KINDS["number"](v),
         "list of numbers": lambda v: isinstance(v, list) and len(v) > 0 and all(KINDS["number"](x) for x in v),
         "object": lambda v: isinstance(v, dict)}


def mismatch(r, schema):
    """What in r does not fit schema ({key: "number", "int", "text", ... or a nested schema}), such as "fid is not
    a number"; "" when r fits. A key written "key?" may be absent."""
    if not isinstance(r, dict):
        return "it is not a JSON object"
    for key, kind in schema.items():
        name = key.rstrip("?")
        if name not in r:
            if key.endswith("?"):
                continue
            return f"{name} is missing"
        if isinstance(kind, dict):
            inner = mismatch(r[name], kind)
            if inner:
                return f"{name}: {inner}"
        elif not KINDS[kind](r[name]):
            return f"{name} is not {'an' if kind[0] in 'aeiou' else 'a'} {kind}"
    return ""


def read_json(path, schema, remake=None):
    """A result file the project wrote, checked against schema (see mismatch; a callable: schema(r) gives it).
    Unreadable (truncated, not JSON): with remake=None, a note, and None, so that the caller measures it again;
    else refused, naming the file and remake, the command that remakes it. Readable but not this command's
    result (another command's, or edited): the same, with a message that names the key and does not ask for
    the file to be deleted."""
    try:
        with open(path) as f:
            r = json.load(f, parse_constant=lambda c: float("nan"))
        wrong = mismatch(r, schema(r) if callable(schema) and isinstance(r, dict) else schema if not callable(schema) else {})
        if not wrong:
            return r
        why, damaged = wrong, False
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        why, damaged = first_line(e), True
    if remake is None:
        print(f"note: {path} is {'damaged' if damaged else 'not a result of this command'} ({why}); that point is "
              f"measured again", file=sys.stderr)
        return None
    if damaged:
        raise UserError(f"{path} is damaged ({why}). Delete it and run {remake} again, which measures only what is "
                        f"missing.")
    raise UserError(f"{path} is not a result of {remake} ({why}). Point the command at the folder of {remake}'s own "
                    f"results, or move that file out of this one.")


def save_figure(fig, path, **kw):
    """A matplotlib figure as a picture, atomically (see atomic): a full disk leaves the old picture whole."""
    import matplotlib.pyplot as plt
    with atomic(path) as tmp:
        fig.savefig(tmp, format=os.path.splitext(path)[1][1:].lower() or "png", **kw)
    plt.close(fig)


def read_cache(path, check):
    """A cache the project wrote with torch.save, loaded without running code and kept only if check(obj) holds;
    anything else (missing, damaged, foreign, NaN) gives None, with a note, and the caller recomputes it."""
    if not os.path.exists(path):
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if check(obj):
            return obj
        why = "it does not hold what was cached there"
    except Exception as e:  # empty, truncated, random bytes, pickled objects: a lost shortcut, never an error
        why = first_line(e).split(". ")[0]
    print(f"note: the cache {path} is damaged ({why}); it is computed again", file=sys.stderr)
    return None


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


def check_target(path, flag):
    """Before any work: a file can be written at path (its folder writable, no folder of that name in the way);
    flag names what chose the path, for the message."""
    writable_dir(os.path.dirname(path) or ".", flag)
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, so the file of that name cannot be written ({flag}). Move the folder "
                        f"out of the way, or choose another name.")
    return path


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
    tensors = lambda v: isinstance(v, dict) and all(isinstance(k, str) and is_weight(x) for k, x in v.items())
    if not (isinstance(ckpt, dict) and tensors(ckpt.get("model")) and tensors(ckpt.get("ema"))
            and isinstance(ckpt.get("config"), dict) and type(ckpt.get("step")) is int and ckpt["step"] >= 0
            and isinstance(ckpt.get("classes", []), list) and all(type(c) is str for c in ckpt.get("classes", []))):
        raise UserError(f"{path} is a torch file but not a ddpm.py checkpoint: it lacks the model and ema weights "
                        f"(name -> a dense tensor of floating-point numbers, as ddpm.py writes), the config (a dict) "
                        f"or the step (a whole number), or its class names are not a list of text.")
    return ckpt


def is_weight(x):
    """What ddpm.py saves as a weight: a dense tensor of real floating-point numbers in memory; not integers,
    booleans or complex numbers (which the finite checks would not see), not sparse, not meta."""
    return torch.is_tensor(x) and x.layout == torch.strided and not x.is_meta and x.dtype in (
        torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_shapes(build, state, path):
    """Compare a checkpoint's weights with the network its config describes, built on the meta device (shapes,
    no memory): a config whose network does not fit its weights is refused before anything is allocated."""
    with torch.device("meta"):
        try:
            shapes = {k: tuple(v.shape) for k, v in build().state_dict().items()}
        except (RuntimeError, ValueError, OverflowError) as e:
            raise UserError(f"the config saved in {path} describes a network that cannot be built ({first_line(e)}).") from None
    theirs = {k: tuple(v.shape) for k, v in state.items()}
    if shapes != theirs:
        wrong = sorted(set(shapes) ^ set(theirs)) or [k for k in shapes if shapes[k] != theirs[k]]
        raise UserError(f"the weights in {path} do not fit the network its config describes (e.g. {wrong[0]}); the "
                        f"checkpoint comes from another config or another version, or was altered.")


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
        step = moments.get("step")
        ok = ok and torch.is_tensor(step) and step.numel() == 1 and bool(torch.isfinite(step).all() and step >= 0)
    groups = opt.get("param_groups")  # Adam's settings: betas in [0, 1), eps > 0, finite rates
    number = lambda v, lo=0.0: type(v) in (int, float) and lo <= v < math.inf
    settings = isinstance(groups, list) and all(
        isinstance(g, dict) and isinstance(g.get("betas"), (list, tuple)) and len(g["betas"]) == 2
        and all(number(b) and b < 1 for b in g["betas"]) and number(g.get("eps")) and g["eps"] > 0
        and number(g.get("lr")) and number(g.get("weight_decay", 0)) for g in groups)
    if not ok or not settings:
        raise UserError(f"{path} cannot be resumed: its Adam state does not fit the network's parameters (shapes, "
                        f"dtypes), holds NaN or infinite moments or steps, or settings out of range (betas in [0, 1), "
                        f"eps > 0). It can still sample (python ddpm.py sample --ckpt {path}); to train on, start a new "
                        f"run with another --out-dir.")


def latest_checkpoint():
    found = [os.path.join("runs", d, "ckpt.pt") for d in (os.listdir("runs") if os.path.isdir("runs") else [])]
    found = [p for p in found if os.path.isfile(p)]
    if not found:
        raise UserError("no checkpoint found under runs/. Train one first (python ddpm.py train), or pass "
                        "--ckpt path/to/ckpt.pt.")
    return max(found, key=os.path.getmtime)


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
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"{out_dir} is in use by another run ({holder}). Wait for it to finish or stop it, or "
                        f"pass another --out-dir. One run per folder keeps checkpoints and log.csv whole.") from None
    try:  # who holds it, for another run's message; on a full disk the lock holds all the same without it
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on host {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    except OSError:
        pass
    f = os.fdopen(fd, "rb")  # kept open, and so locked, for as long as the run lasts
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
        path, rows, fields = os.path.join(run.out_dir, "log.csv"), [], LOG_FIELDS
        self.path = path
        if os.path.islink(path) or (os.path.exists(path) and not os.path.isfile(path)):
            raise UserError(f"{path} is a symlink or a folder, not the run's loss log. Move it away, or pass another "
                            f"--out-dir.")
        if step > 0 and os.path.isfile(path):  # keep the rows up to the checkpoint's step
            rows = [r for r in read_loss_log(path) if int(r["step"]) <= step]
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
            try:
                self.w.writerow(dict(step=step, loss=f"{mean_loss:.5f}", lr=f"{lr:.3g}", img_per_s=f"{speed:.1f}",
                                     seconds=f"{time.time() - self.t0:.1f}"))
                self.f.flush()
            except OSError as e:
                f, self.f = self.f, None
                try:  # what could not be written goes; the rows on disk stay
                    f.close()
                except OSError:
                    pass
                raise WriteError(f"could not append the loss at step {step} to {self.path} ({first_line(e)}); its "
                                 f"rows before are kept, and so is the last checkpoint. Free some disk space and go on "
                                 f"with --resume.") from None
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


LOG_FIELDS = ["step", "loss", "lr", "img_per_s", "seconds"]


def read_loss_log(path):
    """The rows of a run's log.csv whose five values are all finite numbers (the step a whole one), as dicts of
    LOG_FIELDS; the others (a damaged byte, a cut line, an edited header, an edit) are left out, with a note, so
    that one bad row never costs the good ones. A file that cannot be opened gives no rows, with a note."""
    try:
        with open(path, newline="", errors="replace") as f:
            rows = list(csv.reader(f))
    except (OSError, csv.Error) as e:
        print(f"note: could not read {path} ({first_line(e)}); its rows are left out", file=sys.stderr)
        return []

    def number(v):
        try:
            return math.isfinite(float(v))
        except ValueError:
            return False
    data = rows[1:] if rows and not all(map(number, rows[0])) else rows  # the header, whatever it says
    good = [r for r in data if len(r) == len(LOG_FIELDS) and r[0].strip().isdigit() and all(map(number, r))]
    if len(good) < len(data):
        print(f"note: {len(data) - len(good)} of the {len(data)} rows of {path} are not numbers and are left out",
              file=sys.stderr)
    return [dict(zip(LOG_FIELDS, (v.strip() for v in r))) for r in good]


