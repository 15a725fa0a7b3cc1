"""Speed of ddpm.py's own training step and samplers, against this machine's measured peak.

    python bench.py                                   # tiny and paper32, fp32 and bf16 where it pays
    python bench.py --preset paper32 --precision bf16 --compile --device cuda
    python bench.py --quick                           # a smoke run, seconds
    python bench.py --json                            # also one JSON line per row

Each row runs in a fresh process (so peak memory is that row's own): it builds the model with
ddpm.setup() and times ddpm.train_step(), the very code `ddpm.py train` runs, then one sampling step
(ddpm.p_sample) on the EMA model. Warm-up first, then the median of several timed runs and their
spread. FLOPs are counted by torch.utils.flop_counter on one forward pass; a training step is counted
as 3 forward passes (the backward pass costs about twice the forward). The peak is measured at start:
3x3 convolutions of U-Net shape (the fastest is the peak) and a large matmul, fp32 and bf16. On a CPU,
other processes' CPU use during a row is measured from /proc/stat; rows where it passed 10% are flagged.
"""

import argparse, json, os, resource, statistics, subprocess, sys, time

import torch
from torch.utils.flop_counter import FlopCounterMode

import ddpm
import images
import checks
import launch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup, repeats):
    """Seconds of each of `repeats` calls of fn, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


class CpuWatch:
    """Share of the machine's CPU time that other processes used while the block ran (Linux)."""

    def __enter__(self):
        self.start = self._read()
        return self

    def __exit__(self, *exc):
        (busy0, own0, t0), (busy1, own1, t1) = self.start, self._read()
        self.other = max(0.0, ((busy1 - busy0) - (own1 - own0)) / ((t1 - t0) * os.cpu_count())) if busy0 is not None else None

    @staticmethod
    def _read():
        r = resource.getrusage(resource.RUSAGE_SELF)
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            busy = (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        except OSError:
            busy = None
        return busy, r.ru_utime + r.ru_stime, time.perf_counter()


def peak(device, dtype, quick):
    """GFLOP/s of the fastest of paper32's 3x3 convolution shapes (batch 32: 128 channels at 32x32, 256 at
    16x16 and 8x8) and of a square matmul. The best shape, not the average, so fractions are conservative."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    best_conv = 0.0
    for c, hw in ((128, 32), (256, 16), (256, 8)):
        conv = torch.nn.Conv2d(c, c, 3, padding=1).to(device)
        x = torch.randn(8 if quick else 32, c, hw, hw, device=device)
        with torch.no_grad(), autocast:
            t = statistics.median(timed(lambda: conv(x), device, 2, 3 if quick else 10))
        best_conv = max(best_conv, 2 * x.numel() * c * 9 / t / 1e9)
    n = 512 if quick else (2048 if device.type == "cpu" else 8192)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    with torch.no_grad(), autocast:
        t_mm = statistics.median(timed(lambda: a @ b, device, 2, 3 if quick else 10))
    return best_conv, 2 * n ** 3 / t_mm / 1e9


def row(spec):
    """Measure one configuration; spec is a dict of bench flags. Runs in its own process."""
    device = launch.pick_device(spec["device"])
    overrides = {k: spec[k] for k in ("batch_size", "image_size", "micro_batch") if spec.get(k)}
    cfg = ddpm.make_config(spec["preset"], device=device.type, precision=spec["precision"], compile=spec["compile"], **overrides)
    bf16 = launch.use_bf16(cfg.precision, device)  # as ddpm.train() picks them
    micro_batch = cfg.micro_batch or launch.default_micro_batch(cfg, device, bf16)
    s = ddpm.setup(cfg, device, bf16=bf16, micro_batch=micro_batch)  # the memory layout too (channels_last for fp32)
    channels_last = s.model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    B, size = cfg.batch_size, cfg.image_size
    data = images.toycars(B, size).to(device)
    x0 = ddpm.get_batch(data, torch.arange(B, device=device), torch.zeros(B, dtype=torch.bool, device=device))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        s.model(x0[:1], torch.zeros(1, dtype=torch.long, device=device))
    fwd_flops = counter.get_total_flops()
    quick, step = spec["quick"], iter(range(1, 10 ** 9))
    t_compile = time.perf_counter()
    ddpm.train_step(s, x0, next(step))  # the first step pays for torch.compile, if on
    sync(device)
    t_compile = time.perf_counter() - t_compile
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with CpuWatch() as watch:
        train = timed(lambda: ddpm.train_step(s, x0, next(step)), device, 1 if quick else 3, 2 if quick else 7)
    s.ema.eval()
    with torch.inference_mode(), s.autocast, CpuWatch() as watch2:
        xt = torch.randn_like(x0)
        sample = timed(lambda: ddpm.p_sample(s.ema, s.sched, xt, 500 % cfg.T), device, 1, 2 if quick else 5)
    loops = {}
    if spec.get("loops"):  # whole samplers, batch 8: Algorithm 2 (T network calls) against DDIM (50)
        with torch.inference_mode(), s.autocast:
            for name, fn in (("ddpm_loop_s", lambda: ddpm.p_sample_loop(s.ema, s.sched, (8, 3, size, size), device=device)),
                             ("ddim50_loop_s", lambda: ddpm.ddim_sample(s.ema, s.sched, (8, 3, size, size), 50, 0.0, device=device))):
                loops[name] = round(statistics.median(timed(fn, device, 0, 1 if name == "ddpm_loop_s" else 3)), 2)
        loops["ddim50_speedup"] = round(loops["ddpm_loop_s"] / loops["ddim50_loop_s"], 1)
    med, ms = statistics.median(train), statistics.median(sample)
    mem = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    other = max(w for w in (watch.other, watch2.other) if w is not None) if watch.other is not None else None
    return dict(preset=cfg.preset, device=str(device), precision="bf16" if launch.use_bf16(cfg.precision, device) else "fp32",
                compile=cfg.compile, channels_last=channels_last, batch=B, micro_batch=min(s.micro_batch or B, B), image_size=size,
                params_M=round(sum(p.numel() for p in s.model.parameters()) / 1e6, 2),
                fwd_GFLOP_per_img=round(fwd_flops / 1e9, 3),
                train_img_s=round(B / med, 1), train_spread_pct=round(100 * (max(train) - min(train)) / med, 1),
                train_GFLOP_s=round(3 * fwd_flops * B / med / 1e9, 1),
                sample_img_steps_s=round(B / ms, 1), sample_spread_pct=round(100 * (max(sample) - min(sample)) / ms, 1),
                peak_mem_GB=round(mem / 2 ** 30, 2), first_step_s=round(t_compile, 1),
                other_cpu_pct=None if other is None else round(100 * other, 1), **loops)


def main():
    p = checks.Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["tiny", "paper32"], choices=list(ddpm.PRESETS))
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", nargs="+", default=None, choices=["fp32", "bf16"],
                   help="default: fp32, plus bf16 where the device has bf16 units")
    p.add_argument("--compile", action="store_true", help="also rows with torch.compile")
    p.add_argument("--batch-size", type=int, help="override the presets' batch size")
    p.add_argument("--image-size", type=int, help="override the presets' image size")
    p.add_argument("--micro-batch", type=int, nargs="+", default=[0],
                   help="images per forward/backward pass, one row for each value (0: ddpm.py's choice for the device)")
    p.add_argument("--loops", action="store_true", help="also time whole samplers: DDPM (T steps) vs DDIM (50 steps), batch 8")
    p.add_argument("--quick", action="store_true", help="few repeats, small batch: a smoke test")
    p.add_argument("--json", action="store_true", help="also print one JSON line per row")
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure one row, print its JSON
    args = p.parse_args()
    if args.row:
        print(json.dumps(row(json.loads(args.row))))
        return
    with checks.user_errors("Nothing was written: bench.py only prints its rows."):
        bench(args)


def bench(args):
    device = launch.pick_device(args.device)
    for preset in args.preset:  # every row's settings, checked before any is measured, as ddpm.py train checks them
        for micro in args.micro_batch:
            overrides = dict(batch_size=args.batch_size, image_size=args.image_size, micro_batch=micro)
            cfg = ddpm.make_config(preset, device=device.type, **{k: v for k, v in overrides.items() if v is not None})
            checks.check_config(cfg)
            chunk = micro or launch.default_micro_batch(cfg, device, launch.use_bf16(cfg.precision, device))
            checks.check_memory(cfg, ddpm.UNet, device, chunk=chunk, flags="a smaller --batch-size, --micro-batch or "
                                "--image-size, or another --preset")
    precisions = args.precision or (["fp32", "bf16"] if launch.use_bf16("auto", device) else ["fp32"])
    with CpuWatch() as watch:
        peaks = {prec: peak(device, torch.bfloat16 if prec == "bf16" else torch.float32, args.quick) for prec in precisions}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"# {name}, {torch.get_num_threads()} threads, torch {torch.__version__}"
          + (f"; other processes used {100 * watch.other:.0f}% of the CPU while measuring the peak" if watch.other is not None else ""))
    for prec, (conv, mm) in peaks.items():
        print(f"# measured peak {prec}: 3x3 conv {conv:.0f} GFLOP/s, matmul {mm:.0f} GFLOP/s")
    cols = ["preset", "precision", "compile", "channels_last", "batch", "micro_batch", "params_M", "fwd_GFLOP_per_img", "train_img_s",
            "train_spread_pct", "train_GFLOP_s", "pct_conv_peak", "sample_img_steps_s", "peak_mem_GB", "first_step_s", "other_cpu_pct"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    print(lines[0] + "\n" + lines[1], flush=True)
    rows = [(preset, prec, m, c) for preset in args.preset for prec in precisions for m in args.micro_batch
            for c in ([False, True] if args.compile else [False])]
    for preset, prec, micro, compile_ in rows:
        spec = dict(preset=preset, device=args.device, precision=prec, compile=compile_, quick=args.quick, loops=args.loops,
                    batch_size=args.batch_size or (8 if args.quick else None), image_size=args.image_size,
                    micro_batch=micro)
        r = subprocess.run([sys.executable, __file__, "--row", json.dumps(spec)], capture_output=True, text=True)
        if r.returncode:
            print(f"| {preset} | {prec} | {compile_} | failed: {(r.stderr.strip().splitlines() or ['?'])[-1]} |")
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        res["pct_conv_peak"] = round(100 * res["train_GFLOP_s"] / peaks[prec][0], 1)
        flag = " (contended)" if (res["other_cpu_pct"] or 0) > 10 else ""
        print("| " + " | ".join(str(res[c]) for c in cols) + f" |{flag}", flush=True)
        if args.loops:
            print(f"#   {preset} {prec}: DDPM {res['ddpm_loop_s']} s for T steps, DDIM {res['ddim50_loop_s']} s for 50 "
                  f"steps, batch 8: DDIM is {res['ddim50_speedup']}x faster", flush=True)
        if args.json:
            print(json.dumps({**res, "peak_conv_GFLOP_s": round(peaks[prec][0], 1), "machine": name}), flush=True)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{model} ({os.cpu_count()} CPUs)"


if __name__ == "__main__":
    main()
