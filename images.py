"""The training images of ddpm.py: toy cars drawn by code, folders of image files and their cache, Stanford Cars.

Kept out of ddpm.py because none of it is DDPM: the model only ever sees a uint8 tensor (N, 3, H, W), and
how that tensor is drawn or decoded is ordinary data handling. load(cfg) is the one function ddpm.py calls.
"""

import hashlib, os, random, sys

import torch
from PIL import Image, ImageDraw

from plumbing import UserError, WriteError, atomic_save


def draw_toycar(rng, size):
    """One procedurally drawn car: sky, ground, a body of random colour and size, a cabin with
    windows, two wheels; random position, facing left or right. Far easier than photographs."""
    S = 2 * size  # draw at twice the size, then shrink: cheap anti-aliasing
    sky = tuple(rng.randint(a, b) for a, b in ((90, 170), (150, 210), (200, 255)))
    img = Image.new("RGB", (S, S), sky)
    d = ImageDraw.Draw(img)
    ground_y = int(S * rng.uniform(0.68, 0.8))
    d.rectangle([0, ground_y, S, S], fill=tuple(rng.randint(60, 120) for _ in range(3)))
    w, h = S * rng.uniform(0.55, 0.8), S * rng.uniform(0.13, 0.2)  # the body
    x0 = rng.uniform(0.02 * S, S - w - 0.02 * S)
    r = h * rng.uniform(0.45, 0.6)  # wheel radius
    y1 = ground_y - r * 0.9
    y0 = y1 - h
    colour = tuple(rng.choice([rng.randint(0, 60), rng.randint(180, 255)]) for _ in range(3))
    d.rounded_rectangle([x0, y0, x0 + w, y1], radius=h * 0.3, fill=colour)
    # Cabin: a trapezoid set towards the back; the front is on the right, mirrored below.
    cx0, cx1, ch = x0 + w * rng.uniform(0.1, 0.2), x0 + w * rng.uniform(0.6, 0.72), h * rng.uniform(0.8, 1.1)
    d.polygon([(cx0, y0), (cx0 + ch * 0.5, y0 - ch), (cx1 - ch * 0.7, y0 - ch), (cx1, y0)], fill=colour)
    glass, m = (200, 225, 240), ch * 0.18
    mid = (cx0 + cx1) / 2 + ch * 0.05
    d.polygon([(cx0 + m * 1.6, y0 - m * 0.3), (cx0 + ch * 0.5 + m * 0.3, y0 - ch + m), (mid - m * 0.4, y0 - ch + m),
               (mid - m * 0.4, y0 - m * 0.3)], fill=glass)
    d.polygon([(mid + m * 0.4, y0 - m * 0.3), (mid + m * 0.4, y0 - ch + m), (cx1 - ch * 0.7 - m * 0.2, y0 - ch + m),
               (cx1 - m * 1.8, y0 - m * 0.3)], fill=glass)
    # The headlight is at least one pixel wide (from 16 pixels up, h / 4 > 1 always, so the cars stay as they were)
    d.rectangle([x0 + w - max(h * 0.25, 1), y0 + h * 0.2, x0 + w - 1, y0 + h * 0.45], fill=(255, 230, 120))
    for wx in (x0 + w * 0.2, x0 + w * 0.8):
        d.ellipse([wx - r, y1 - r, wx + r, y1 + r], fill=(25, 25, 25))
        d.ellipse([wx - r * 0.45, y1 - r * 0.45, wx + r * 0.45, y1 + r * 0.45], fill=(160, 160, 160))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img.resize((size, size), Image.BOX)


def toycars(n, size, seed=0):
    """n toy cars as a uint8 tensor (n, 3, size, size), the same for the same seed."""
    rng = random.Random(seed)
    pixels = b"".join(draw_toycar(rng, size).tobytes() for _ in range(n))
    return torch.frombuffer(bytearray(pixels), dtype=torch.uint8).view(n, size, size, 3).permute(0, 3, 1, 2).contiguous()


IMAGE_EXTS = (".jpg", ".jpeg", ".png")

CARS_HELP = """Stanford Cars cannot be downloaded automatically: its original URL is gone (torchvision's
StanfordCars(download=True) fails for this reason). Get it from the Kaggle mirror
(kaggle.com/datasets/jessicali9530/stanford-cars-dataset) or any copy, unpack it, and point
--data-dir at the folder. Accepted layouts: the torchvision one (cars_train/, cars_test/),
the Kaggle one (cars_train/cars_train/*.jpg, cars_test/cars_test/*.jpg), or class folders;
every .jpg/.jpeg/.png below the folder is used, no .mat files needed. Example:
    python ddpm.py train --data cars --data-dir ~/data/stanford_cars
To try the code without any download, use --data toycars."""


def find_images(root):
    """Every .jpg, .jpeg and .png below root, at any depth, sorted; a folder that cannot be read is an error."""
    unreadable = []
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root, onerror=unreadable.append)
                   for f in files if f.lower().endswith(IMAGE_EXTS))
    if unreadable:
        e = unreadable[0]
        raise UserError(f"cannot read the folder {e.filename} ({e.strerror}). Fix its permissions, or point --data "
                        f"at another folder.")
    return paths


def load_image(path, size):
    """Decode one image to RGB, size x size (squashed, as the seed did, so the whole car stays in
    view); transparency goes onto white. Raises OSError or ValueError for an unreadable file."""
    with Image.open(path) as img:
        img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.getchannel("A"))
        return img.convert("RGB").resize((size, size), Image.BICUBIC)


def image_folder(root, size, cache_dir):
    """Every image below root as uint8 (N, 3, size, size); decoded once, then cached."""
    paths = find_images(root)
    if not paths:
        raise UserError(f"no images (.jpg, .jpeg, .png) were found under {root}. Point --data at a "
                        f"folder that holds images, at any depth, or use --data toycars.")
    key = hashlib.sha1(repr([(os.path.relpath(p, root), os.path.getsize(p), os.path.getmtime(p)) for p in paths]
                            + [size]).encode())  # the same folder gives the same key, however it is named
    cache = os.path.join(cache_dir, f"{os.path.basename(os.path.abspath(root))}-{size}-{key.hexdigest()[:12]}.pt")
    if os.path.exists(cache):
        try:
            data = torch.load(cache, weights_only=True)
            if torch.is_tensor(data) and data.dtype == torch.uint8 and data.shape[1:] == (3, size, size) \
                    and 1 <= len(data) <= len(paths):
                return data
        except Exception:  # a damaged or foreign cache is only a lost shortcut: decode again and rewrite it
            pass
    from tqdm import tqdm
    images, bad = [], []
    for p in tqdm(paths, desc=f"decoding {len(paths)} images once", unit="img"):
        try:
            images.append(torch.frombuffer(bytearray(load_image(p, size).tobytes()), dtype=torch.uint8))
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
            bad.append(f"{p} ({e})")
    if bad:
        print(f"skipped {len(bad)} unreadable image(s) of {len(paths)}, e.g. {bad[0]}", file=sys.stderr)
    if not images:
        raise UserError(f"none of the {len(paths)} image files under {root} could be read; e.g. {bad[0]}.")
    data = torch.stack(images).view(-1, size, size, 3).permute(0, 3, 1, 2).contiguous()
    try:
        os.makedirs(cache_dir, exist_ok=True)
        atomic_save(data, cache)
    except (OSError, WriteError) as e:
        print(f"note: could not cache the decoded images in {cache_dir} ({e}); training goes on, and the next "
              f"run decodes them again", file=sys.stderr)
    return data


def load(cfg, cache_dir=os.path.join("data", "cache")):
    """The training images for cfg.data as uint8 (N, 3, H, W)."""
    if cfg.data == "toycars":
        return toycars(cfg.n_toycars, cfg.image_size, cfg.seed)
    if cfg.data == "cars":
        places = [p for p in (cfg.data_dir, os.environ.get("DDPM_DATA_DIR", ""), os.path.join("data", "stanford_cars")) if p]
        for place in places:
            if os.path.isdir(place) and find_images(place):
                return image_folder(place, cfg.image_size, cache_dir)  # train and test splits together
        raise UserError("no Stanford Cars images were found; looked in: " + ", ".join(places) + ".\n" + CARS_HELP)
    if os.path.isdir(cfg.data):
        return image_folder(cfg.data, cfg.image_size, cache_dir)
    raise UserError(f"--data {cfg.data!r} is neither toycars, cars, nor an existing folder of images.")
