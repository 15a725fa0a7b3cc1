"""The pictures of the README and docs/ (walkthrough, gallery, samplers, guidance), drawn from real runs and measured results.

    python plots.py                                  # from the newest runs/*/ckpt.pt, into assets/
    python plots.py --ckpt runs/tiny/ckpt.pt --out pictures/
    python plots.py --only sweep,samplers,guidance   # FID against calls (results/sweep/), the samplers side by
                                                     # side, guidance (from --cond-ckpt, runs/tiny-cond/ckpt.pt)

Kept out of ddpm.py, which holds the model and its math; this file only calls into it.
"""

import argparse, math, os, signal, sys

if __name__ == "__main__":  # Ctrl-C while torch loads: a word and exit 130 (print gives None)
    signal.signal(signal.SIGINT, lambda *_: sys.exit(print("\ninterrupted", file=sys.stderr) or 130))

try:
    import matplotlib
except ImportError as e:
    print(f"error: plots.py draws with matplotlib, which is not installed ({e}). pip install matplotlib",
          file=sys.stderr)
    sys.exit(2)

matplotlib.use("Agg")  # files only, no screen needed
import matplotlib.pyplot as plt
from matplotlib.ticker import ScalarFormatter
import torch
from PIL import Image

import ddpm
import images
import checks
import files
import launch


def schedule_plot(T, path):
    """Top: alpha_bar, sqrt(alpha_bar) and sqrt(1 - alpha_bar) over t; bottom: beta and the posterior
    variance beta_tilde, log scale. The paper's linear schedule on the left, the cosine one on the right."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 6), sharex=True)
    for j, (name, beta) in enumerate([("linear (Ho et al.)", ddpm.linear_beta(T)), ("cosine (Nichol & Dhariwal)", ddpm.cosine_beta(T))]):
        sched, t = ddpm.Schedule(beta), torch.arange(T)
        ab, ab_prev = sched.alpha_bar, sched.alpha_bar_prev
        for values, label in [(ab, "alpha_bar_t"), (ab.sqrt(), "sqrt(alpha_bar_t): how much signal"),
                              ((1 - ab).sqrt(), "sqrt(1 - alpha_bar_t): how much noise")]:
            axes[0, j].plot(t + 1, values, label=label)
        axes[1, j].plot(t + 1, sched.beta, label="beta_t")
        axes[1, j].plot(t[1:] + 1, ((1 - ab_prev) / (1 - ab) * sched.beta)[1:], "--", label="beta_tilde_t (eq. 7)")
        axes[0, j].set_title(f"{name}, T = {T}")
        axes[1, j].set(yscale="log", xlabel="t")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    files.save_figure(fig, path, dpi=110)


def unet_plot(cfg, path):
    """The U-Net's wiring, read from the network that ddpm.UNet(cfg) builds: one box per layer, at the height
    of its resolution, with its output channels; attention in orange; a line for every skip connection,
    from the output it keeps on the way down to the block that takes it on the way up."""
    net, res = ddpm.UNet(cfg), cfg.image_size
    boxes, skips = [("conv_in", cfg.ch, res, False)], [0]  # (label, channels, resolution, attention)
    for layer in net.down:
        if isinstance(layer, ddpm.Downsample):
            res //= 2
            boxes.append(("down", layer.conv.out_channels, res, False))
        else:
            boxes.append(("block", layer.res.conv2.out_channels, res, not isinstance(layer.attn, torch.nn.Identity)))
        skips.append(len(boxes) - 1)
    for layer in net.mid:
        boxes.append(("mid", layer.res.conv2.out_channels, res, not isinstance(layer.attn, torch.nn.Identity)))
    links = []
    for layer in net.up:
        if isinstance(layer, ddpm.Upsample):
            res *= 2
            boxes.append(("up", layer.conv.out_channels, res, False))
        else:
            boxes.append(("block", layer.res.conv2.out_channels, res, not isinstance(layer.attn, torch.nn.Identity)))
            links.append((skips.pop(), len(boxes) - 1))
    boxes.append(("out", 3, res, False))
    level = lambda r: -math.log2(cfg.image_size // r)
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(boxes)), 4.2))
    for i, j in links:  # skips first, so that the boxes cover their ends
        yi, yj = level(boxes[i][2]), level(boxes[j][2])
        ax.annotate("", (j, yj + 0.28), (i, yi + 0.28), arrowprops=dict(arrowstyle="->", color="#7a9cc6", lw=0.9,
                                                                          connectionstyle=f"arc3,rad={-0.25 * min(1, 8 / (j - i))}"))
    for k, (label, c, r, attn) in enumerate(boxes):
        ax.add_patch(plt.Rectangle((k - 0.4, level(r) - 0.22), 0.8, 0.44, color="#f4a261" if attn else "#dde6f0", ec="#555"))
        ax.text(k, level(r), f"{label}\n{c}", ha="center", va="center", fontsize=6.5)
    for k in range(len(boxes) - 1):
        ax.plot([k + 0.4, k + 0.6], [level(boxes[k][2]), level(boxes[k + 1][2])], color="#555", lw=0.8)
    ys = sorted({level(b[2]) for b in boxes})
    ax.set_yticks(ys, [f"{cfg.image_size // 2 ** round(-y)}x{cfg.image_size // 2 ** round(-y)}" for y in ys])
    ax.set(xlim=(-0.7, len(boxes) - 0.3), ylim=(min(ys) - 0.5, max(ys) + 1.3), xticks=[])
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    n = sum(p.numel() for p in net.parameters()) / 1e6
    ax.set_title(f"U-Net of the {cfg.preset} preset ({n:.1f}M parameters): channels per layer, orange = self-attention, "
                 f"blue = skip connections", fontsize=9)
    fig.tight_layout()
    files.save_figure(fig, path, dpi=120)


def perfect_plot(path, T=1000, n=20_000):
    """What ddpm.py's samplers draw with a perfect network (perfect_denoiser.py), one value per image. Left:
    Gaussian data N(0, 0.04), each sampler's histogram against the data's density and the exact density the
    float64 recursion predicts for it. Right: a mixture of two narrow modes, weights 0.3 and 0.7."""
    import numpy as np
    from perfect_denoiser import MixtureDenoiser, exact_moments
    sched = ddpm.Schedule(ddpm.linear_beta(T))
    runs = [("Algorithm 2, 1000 calls", dict(sampler="ddpm"), lambda m, g: ddpm.p_sample_loop(m, sched, (n, 1, 1, 1), g)),
            ("DDIM eta 0, 50 calls", dict(sampler="ddim", steps=50, eta=0.0),
             lambda m, g: ddpm.ddim_sample(m, sched, (n, 1, 1, 1), 50, 0.0, g)),
            ("DDIM eta 1, 50 calls", dict(sampler="ddim", steps=50, eta=1.0),
             lambda m, g: ddpm.ddim_sample(m, sched, (n, 1, 1, 1), 50, 1.0, g))]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    grid = np.linspace(-0.8, 0.8, 400)
    density = lambda v: np.exp(-grid ** 2 / (2 * v)) / np.sqrt(2 * np.pi * v)
    axes[0].plot(grid, density(0.04), "k", lw=2, label="the data, N(0, 0.04)")
    mixture = MixtureDenoiser(T, [-0.5, 0.5], [0.05, 0.05], [0.3, 0.7])
    with torch.no_grad():
        for (label, kw, run), color in zip(runs, ("#1f77b4", "#d62728", "#2ca02c")):
            x = run(MixtureDenoiser(T, [0.0], [0.2]), torch.Generator().manual_seed(0))[0].flatten().numpy()
            v = exact_moments(T=T, mu=0.0, s2=0.04, **kw)[1]
            axes[0].hist(x, bins=80, range=(-0.8, 0.8), density=True, histtype="step", color=color,
                         label=f"{label}: sampled, variance {x.var():.4f}")
            axes[0].plot(grid, density(v), "--", color=color, lw=1, label=f"  exact recursion, {v:.4f}")
            y = run(mixture, torch.Generator().manual_seed(1))[0].flatten().numpy()
            axes[1].hist(y, bins=120, range=(-0.8, 0.8), density=True, histtype="step", color=color,
                         label=f"{label}: {100 * (y > 0).mean():.1f}% in the right mode")
    axes[0].set_title("Gaussian data: fewer steps, narrower samples", fontsize=10)
    axes[1].set_title("two modes, weights 0.3 and 0.7: both kept, in proportion", fontsize=10)
    for ax in axes:
        ax.legend(fontsize=7)
        ax.set(xlabel="value", yticks=[])
    fig.suptitle(f"ddpm.py's samplers with the perfect denoiser (no training), {n} samples each", fontsize=10)
    fig.tight_layout()
    files.save_figure(fig, path, dpi=110)


def forward_plot(sched, data, path, steps=(0, 49, 99, 199, 399, 599, 799, 999)):
    """Rows: training images (uint8); columns: x_t = q_sample(x_0, t) at several t (index 0 is one step of noise)."""
    x0 = ddpm.get_batch(data, torch.arange(len(data)), torch.zeros(len(data), dtype=torch.bool))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    steps = [s for s in steps if s < sched.T]
    cols = [x0] + [ddpm.q_sample(sched, x0, torch.full((len(x0),), s), eps) for s in steps]
    strip_plot(cols, ["x_0"] + [f"t = {s + 1}" for s in steps], path, "forward process q(x_t | x_0) [eq. 4]")


def strip_plot(columns, titles, path, title):
    """columns: list of (N, 3, H, W) tensors in [-1, 1], drawn as an N-row grid with titled columns."""
    n = len(columns[0])
    fig, axes = plt.subplots(n, len(columns), figsize=(1.2 * len(columns), 1.2 * n + 0.4), squeeze=False)
    for j, col in enumerate(columns):
        for i in range(n):
            axes[i, j].imshow(to_uint8(col[i]))
            axes[i, j].axis("off")
        axes[0, j].set_title(titles[j], fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    files.save_figure(fig, path, dpi=110)


def to_uint8(x):
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def loss_plot(log_path, path, title):
    rows = files.read_loss_log(log_path)  # the rows that are numbers; a damaged file's others left out, with a note
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows])
    ax.set(yscale="log", xlabel="training step", ylabel="L_simple (mean over the log interval)", title=title)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    files.save_figure(fig, path, dpi=110)


def gif(frames, path, scale=3):
    """frames: list of (N, 3, H, W) in [-1, 1] -> an animated GIF of their grids, the last frame held."""
    from torchvision.utils import make_grid
    pictures = []
    for x in frames:
        grid = make_grid((x.float().clamp(-1, 1) + 1) / 2, nrow=int(len(x) ** 0.5), padding=1)
        img = Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy())
        pictures.append(img.resize((img.width * scale, img.height * scale), Image.NEAREST))
    with files.atomic(path) as tmp:
        pictures[0].save(tmp, format="GIF", save_all=True, append_images=pictures[1:] + [pictures[-1]] * 15, duration=60,
                         loop=0)


def sweep_plot(results, path, title):
    """FID against network calls, one line per sampler (mean over seeds, bars from the lowest to the highest
    seed), Algorithm 2 with all T steps as a dashed reference; log scale in calls."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    reference = [r for r in results if r["sampler"] == "ddpm" and r["calls"] > 100]
    for name, label in [("ddpm", "Algorithm 2, respaced"), ("ddim-eta0", "DDIM, eta = 0"), ("ddim-eta1", "DDIM, eta = 1"),
                        ("dpm++", "DPM-Solver++(2M), grid even in log-SNR"), ("dpm++-uniform", "DPM-Solver++(2M), grid even in t"),
                        ("sde-dpm++", "SDE-DPM-Solver++(2M), grid even in log-SNR")]:
        rs = [r for r in results if r["sampler"] == name and r["calls"] <= 100]
        calls = sorted({r["calls"] for r in rs})
        if not calls:
            continue
        fids = [[r["fid"] for r in rs if r["calls"] == c] for c in calls]
        mean = [sum(f) / len(f) for f in fids]
        ax.errorbar(calls, mean, yerr=[[m - min(f) for m, f in zip(mean, fids)], [max(f) - m for m, f in zip(mean, fids)]],
                    marker="o", capsize=3, label=label)
    for r in reference:
        ax.axhline(r["fid"], color="black", ls="--", lw=1, label=f"Algorithm 2, all {r['calls']} steps: {r['fid']:.1f}")
    ax.set(xscale="log", yscale="log", xlabel="network calls per image", ylabel=f"FID (N = {results[0]['n']})")
    ax.set_title(title, fontsize=10)
    ax.set_xticks(sorted({r["calls"] for r in results if r["calls"] <= 100}))
    ax.get_xaxis().set_major_formatter(ScalarFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.save_figure(fig, path, dpi=110)


def samplers_plot(model, cfg, path, title, calls=(10, 20), n=8, seed=0):
    """The samplers side by side: one row per sampler and number of calls, the same starting noise in each
    column (for the stochastic ones, the same seed of their noise too)."""
    sched, rows, labels = ddpm.Schedule.from_config(cfg), [], []
    for c in calls:
        for sampler, eta, label in [("ddpm", 1.0, "Algorithm 2 respaced"), ("ddim", 0.0, "DDIM eta 0"), ("ddim", 1.0, "DDIM eta 1"),
                                    ("dpm++", 1.0, "DPM-Solver++"), ("sde-dpm++", 1.0, "SDE-DPM-Solver++")]:
            with torch.inference_mode():
                rows.append(ddpm.draw(model, sched, (n, 3, cfg.image_size, cfg.image_size), sampler, c, eta, None,
                                      torch.Generator().manual_seed(seed)))
            labels.append(f"{label}, {c} calls")
    with torch.inference_mode():
        rows.append(ddpm.draw(model, sched, (n, 3, cfg.image_size, cfg.image_size), "ddpm", None, 1.0, None, torch.Generator().manual_seed(seed)))
    labels.append(f"Algorithm 2, all {cfg.T} steps")
    grid_plot(rows, labels, path, title)


def grid_plot(rows, labels, path, title, column_titles=None):
    """Rows of images (each (n, 3, H, W) in [-1, 1]) with a label on the left of each."""
    fig, axes = plt.subplots(len(rows), 1, figsize=(1.1 * len(rows[0]) + 2.4, 1.1 * len(rows) + 0.6))
    for ax, row, label in zip(axes, rows, labels):
        ax.imshow(to_uint8(torch.cat(list(row), 2)))
        ax.set_yticks([])
        ax.set_xticks([] if column_titles is None or ax is not axes[0] else
                      [(i + 0.5) * row.shape[3] for i in range(len(row))])
        if column_titles is not None and ax is axes[0]:
            ax.set_xticklabels(column_titles, fontsize=8)
            ax.xaxis.tick_top()
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
        for side in ax.spines.values():
            side.set_visible(False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    files.save_figure(fig, path, dpi=110)


def pairs_plot(rows, labels, path, title, halves=("right", "broken")):
    """Rows of two strips side by side (each a (3, H, W) uint8 image: the right version's images, then the broken
    version's), a label on the left of each row: the gallery of mistakes.py."""
    h, w = rows[0][0].shape[1], sum(r.shape[2] for r in rows[0]) + 12
    width, height = w / 40 + 3.4, len(rows) * (h / 40 + 0.3) + 1.0  # inches: 40 pixels of image to an inch, labels 3.2
    fig, axes = plt.subplots(len(rows), 1, figsize=(width, height), squeeze=False)
    fig.subplots_adjust(left=3.2 / width, right=1 - 0.1 / width, top=1 - 0.85 / height, bottom=0.1 / height, hspace=0.3)
    for ax, (left, right), label in zip(axes[:, 0], rows, labels):
        gap = torch.full((3, h, 12), 255, dtype=torch.uint8)
        ax.imshow(torch.cat([left, gap, right], 2).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
        for side in ax.spines.values():
            side.set_visible(False)
    for x, text in zip((left.shape[2] / 2, left.shape[2] + 12 + right.shape[2] / 2), halves):
        axes[0, 0].text(x, -4, text, ha="center", va="bottom", fontsize=10, weight="bold")
    fig.suptitle(title, fontsize=9)
    files.save_figure(fig, path, dpi=110)


def guidance_plot(ckpt_path, path, weights=(0, 1, 3, 7), seed=0):
    """One row per guidance weight, one column per class (at most 12), the same starting noise in each column:
    DDIM, 50 steps, eta = 1, from the EMA weights of a class-conditional run."""
    model, cfg, ckpt = ddpm.load_model(ckpt_path)
    classes = ckpt.get("classes", [])
    if not classes:
        raise checks.UserError(f"--cond-ckpt {ckpt_path} has no classes: train one with --cond.")
    y = torch.arange(min(len(classes), 12))
    sched, rows = ddpm.Schedule.from_config(cfg), []
    for w in weights:
        with torch.inference_mode(), launch.autocast("auto", torch.device("cpu")):
            rows.append(ddpm.draw(ddpm.guided(model, y, float(w)), sched, (len(y), 3, cfg.image_size, cfg.image_size),
                                  "ddim", 50, 1.0, None, torch.Generator().manual_seed(seed)))
    grid_plot(rows, [f"w = {w}" for w in weights], path,
              f"classifier-free guidance, eps = (1 + w) eps(class) - w eps(no class); DDIM 50 steps, eta 1, same noise per column\n"
              f"{cfg.data}, {cfg.image_size}x{cfg.image_size}, preset {cfg.preset}, step {ckpt['step']}", [classes[i] for i in y])


def visualize(ckpt_path, out_dir, seed=0, n=36):
    """Every picture of the docs, from the run whose checkpoint is ckpt_path."""
    models = {key: ddpm.load_model(ckpt_path, key) for key in ("ema", "model")}  # (model, cfg, ckpt) each
    _, cfg, ckpt = models["ema"]
    run_dir, step = os.path.dirname(ckpt_path), ckpt["step"]
    what = f"{cfg.data}, {cfg.image_size}x{cfg.image_size}, preset {cfg.preset}, step {step}"
    files.writable_dir(out_dir, "--out")
    out = lambda name: os.path.join(out_dir, name)
    schedule_plot(cfg.T, out("schedule.png"))
    for preset in ("tiny", "paper32"):
        unet_plot(ddpm.make_config(preset), out(f"unet_{preset}.png"))
    perfect_plot(out("perfect_denoiser.png"))
    sched = ddpm.Schedule.from_config(cfg)
    data = images.load(cfg)
    forward_plot(sched, data[torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:4]], out("forward.png"))
    if os.path.isfile(os.path.join(run_dir, "log.csv")):
        loss_plot(os.path.join(run_dir, "log.csv"), out("loss.png"), f"training loss: {what}")
    models = {key: model for key, (model, _, _) in models.items()}
    autocast = launch.autocast("auto", torch.device("cpu"))
    with torch.inference_mode(), autocast:
        # The reverse process, x_T -> x_0, kept every T/50 steps for the GIF and at 8 steps for the strip.
        keep = sorted(set(range(0, cfg.T + 1, max(1, cfg.T // 40))) | {cfg.T})
        shown = [cfg.T] + [round(cfg.T * f) for f in (0.8, 0.6, 0.4, 0.3, 0.2, 0.1, 0.05)] + [0]
        x, traj = ddpm.p_sample_loop(models["ema"], sched, (16, 3, cfg.image_size, cfg.image_size),
                                     torch.Generator().manual_seed(seed), keep=set(keep) | set(shown))
        strip_plot([traj[s][:4] for s in shown], [f"x_{s}" for s in shown], out("reverse.png"),
                   f"reverse process p_theta, Algorithm 2 ({what})")
        gif([traj[s][:9] for s in sorted(keep, reverse=True)], out("reverse.gif"))
        grids = {}
        for key, model in models.items():  # the same starting noise for both
            grids[key], _ = ddpm.p_sample_loop(model, sched, (n, 3, cfg.image_size, cfg.image_size),
                                               torch.Generator().manual_seed(seed + 1))
    strip = lambda g: to_uint8(torch.cat([torch.cat(list(g[r * 6:(r + 1) * 6]), 2) for r in range(len(g) // 6)], 1))
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.9))
    for ax, (key, label) in zip(axes, [("ema", f"EMA weights (decay {cfg.ema_decay})"), ("model", "raw weights")]):
        ax.imshow(strip(grids[key]))
        ax.set_title(label, fontsize=10)
        ax.axis("off")
    fig.suptitle(f"Algorithm 2, {cfg.T} steps, same noise; {what}", fontsize=10)
    fig.tight_layout()
    files.save_figure(fig, out("ema_vs_raw.png"), dpi=110)
    files.save_grid(grids["ema"], out("samples.png"), nrow=6)
    print(f"wrote schedule.png, unet_tiny.png, unet_paper32.png, perfect_denoiser.png, forward.png, reverse.png, reverse.gif, loss.png, ema_vs_raw.png and "
          f"samples.png to {out_dir} ({what})")


PICTURES = ("run", "sweep", "samplers", "guidance")


def main(argv=None):
    p = checks.Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint file; default: the newest runs/*/ckpt.pt")
    p.add_argument("--out", default="assets", help="folder for the pictures")
    p.add_argument("--seed", type=int, default=0, help="seed of the images and the starting noise")
    p.add_argument("--only", help="some of the pictures, comma-separated: run (the run's pictures), sweep (FID against "
                   "calls, from --sweep), samplers (the samplers side by side), guidance (from --cond-ckpt); default: all "
                   "whose inputs exist")
    p.add_argument("--sweep", default=os.path.join("results", "sweep"), help="folder of python sweep.py's results")
    p.add_argument("--cond-ckpt", default=os.path.join("runs", "tiny-cond", "ckpt.pt"), help="a class-conditional checkpoint")
    args = p.parse_args(argv)
    with checks.user_errors(f"Each picture is written whole: those finished are in {args.out}, the others as they were."):
        checks.check_range("--seed", args.seed, 0, 2 ** 63 - 1, "a whole number")
        only = args.only.split(",") if args.only else [k for k in PICTURES if k != "guidance" or os.path.exists(args.cond_ckpt)]
        if set(only) - set(PICTURES):
            raise checks.UserError(f"--only {args.only}: the pictures are {', '.join(PICTURES)}.")
        files.writable_dir(args.out, "--out")
        ckpt = args.ckpt or files.latest_checkpoint() if {"run", "samplers"} & set(only) else None
        if "run" in only:
            visualize(ckpt, args.out, args.seed)
        if "samplers" in only:
            model, cfg, saved = ddpm.load_model(ckpt)
            samplers_plot(model, cfg, os.path.join(args.out, "samplers.png"),
                          f"same noise per column; {cfg.data}, {cfg.image_size}x{cfg.image_size}, preset {cfg.preset}, step {saved['step']}")
            print(f"wrote samplers.png to {args.out}")
        if "sweep" in only:
            import sweep
            results = [r for r in sweep.load_results(args.sweep) if "guidance" not in r]  # the samplers' results
            if results:
                r = results[0]
                sweep_plot(results, os.path.join(args.out, "fid_vs_calls.png"),
                           f"FID against network calls: {os.path.relpath(r['ckpt'])}, step {r['step']}\n"
                           f"N = {r['n']} samples against {r['n_ref']} training images")
                print(f"wrote fid_vs_calls.png to {args.out} (from {len(results)} results in {args.sweep})")
            elif args.only:
                raise checks.UserError(f"--sweep {args.sweep} holds no results of python sweep.py's samplers yet.")
        if "guidance" in only:
            guidance_plot(args.cond_ckpt, os.path.join(args.out, "guidance.png"), seed=args.seed)
            print(f"wrote guidance.png to {args.out} (from {args.cond_ckpt})")


if __name__ == "__main__":
    main()
