"""The training images of ddpm.py: toy cars drawn by code, folders of image files and their cache, Stanford Cars.

Kept out of ddpm.py because none of it is DDPM: the model only ever sees a uint8 tensor (N, 3, H, W), and
how that tensor is drawn or decoded is ordinary data handling. load(cfg) is the one function ddpm.py calls.
"""

import csv, hashlib, os, random, re, sys

import torch
from PIL import Image, ImageDraw

from checks import UserError
from files import WriteError, atomic_save, read_cache


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
    family = sum(4 >> i for i, c in enumerate(colour) if c >= 180)  # the class: which of R, G, B are bright
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
    return img.resize((size, size), Image.BOX), family


# The toy cars' classes: the colour family of the body, from which of its red, green and blue are bright.
TOYCAR_CLASSES = ("black", "blue", "green", "cyan", "red", "magenta", "yellow", "white")


def toycars(n, size, seed=0, labels=False):
    """n toy cars as a uint8 tensor (n, 3, size, size), the same for the same seed; with labels=True also
    their classes, (n,) long indices into TOYCAR_CLASSES."""
    rng = random.Random(seed)
    cars = [draw_toycar(rng, size) for _ in range(n)]
    pixels = b"".join(img.tobytes() for img, _ in cars)
    x = torch.frombuffer(bytearray(pixels), dtype=torch.uint8).view(n, size, size, 3).permute(0, 3, 1, 2).contiguous()
    return (x, torch.tensor([family for _, family in cars])) if labels else x


def toycar_family(images):
    """The judge of the toy cars' classes, independent of any network: uint8 (N, 3, H, W) -> (N,) indices
    into TOYCAR_CLASSES. Only the body, the wheels and the windows have pixels whose three channels are each
    dark (< 70) or bright (> 175); sky, ground, hubs and headlight have a middle channel. Each such pixel votes
    for its combination of bright channels, and the most votes win, all-dark votes counting half, since the
    dark grey wheels cast some. On drawn cars it is right 99.6% of the time at 32x32 and 98% at 16x16."""
    x = images.long()
    extreme, bright = ((x < 70) | (x > 175)).all(1), x > 175
    family = (bright[:, 0] * 4 + bright[:, 1] * 2 + bright[:, 2]).flatten(1)
    votes = torch.zeros(len(x), 8).scatter_add_(1, family, extreme.flatten(1).float())
    votes[:, 0] *= 0.5
    return votes.argmax(1)


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
    """Every .jpg, .jpeg and .png below root, at any depth, sorted; a folder that cannot be read is an error. A
    name that is no file (a broken symlink, a folder named x.jpg) is left out, with a note."""
    unreadable = []
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root, onerror=unreadable.append)
                   for f in files if f.lower().endswith(IMAGE_EXTS))
    if unreadable:
        e = unreadable[0]
        raise UserError(f"cannot read the folder {e.filename} ({e.strerror}). Fix its permissions, or point --data "
                        f"at another folder.")
    broken = [p for p in paths if not os.path.isfile(p)]
    if broken:
        print(f"note: left out {len(broken)} name(s) that are not image files (e.g. {broken[0]}, a broken link?)",
              file=sys.stderr)
    return [p for p in paths if os.path.isfile(p)]


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
    """Every image below root as uint8 (N, 3, size, size), decoded once, then cached, and the paths (relative
    to root) of those N images: the ones that could be read, so that labels follow the images they belong to."""
    paths = find_images(root)
    if not paths:
        raise UserError(f"no images (.jpg, .jpeg, .png) were found under {root}. Point --data at a "
                        f"folder that holds images, at any depth, or use --data toycars.")
    rel = [os.path.relpath(p, root) for p in paths]
    key = hashlib.sha1(repr([(r, os.path.getsize(p), os.path.getmtime(p)) for r, p in zip(rel, paths)]
                            + [size]).encode())  # the same folder gives the same key, however it is named
    cache = os.path.join(cache_dir, f"{os.path.basename(os.path.abspath(root))}-{size}-{key.hexdigest()[:12]}.pt")
    def whole(c):  # every image of the folder, in order: decoded, or listed as unreadable
        return isinstance(c, dict) and torch.is_tensor(c.get("images")) and c["images"].dtype == torch.uint8 \
            and c["images"].layout == torch.strided and c["images"].shape[1:] == (3, size, size) \
            and isinstance(c.get("paths"), list) and isinstance(c.get("skipped"), list) \
            and 1 <= len(c["images"]) == len(c["paths"]) and sorted(c["paths"] + c["skipped"]) == sorted(rel) \
            and [r for r in rel if r in set(c["paths"])] == c["paths"]
    c = read_cache(cache, whole)  # a damaged, partial or foreign cache is a lost shortcut: decoded again, with a note
    if c is not None:
        return c["images"], c["paths"]
    from tqdm import tqdm
    images, kept, bad, skipped = [], [], [], []
    for p, r in zip(tqdm(paths, desc=f"decoding {len(paths)} images once", unit="img"), rel):
        try:
            images.append(torch.frombuffer(bytearray(load_image(p, size).tobytes()), dtype=torch.uint8))
            kept.append(r)
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
            bad.append(f"{p} ({e})")
            skipped.append(r)
    if bad:
        print(f"skipped {len(bad)} unreadable image(s) of {len(paths)}, e.g. {bad[0]}", file=sys.stderr)
    if not images:
        raise UserError(f"none of the {len(paths)} image files under {root} could be read; e.g. {bad[0]}.")
    data = torch.stack(images).view(-1, size, size, 3).permute(0, 3, 1, 2).contiguous()
    try:
        os.makedirs(cache_dir, exist_ok=True)
        atomic_save({"images": data, "paths": kept, "skipped": skipped}, cache)
    except (OSError, WriteError) as e:
        print(f"note: could not cache the decoded images in {cache_dir} ({e}); training goes on, and the next "
              f"run decodes them again", file=sys.stderr)
    return data, kept


# Folders that split a data set, not classes: Stanford Cars' cars_train/ and cars_test/ (twice over in the
# Kaggle copy), and the usual train/, test/, val/.
SPLIT_FOLDER = re.compile(r"(cars_)?(train|test|val|valid|validation)", re.IGNORECASE)


def class_of(relpath):
    """An image's class from the folders between the data folder and the file, split folders left out:
    "Audi S4 2012" for cars_train/Audi S4 2012/00001.jpg, "" for cars_train/cars_train/00001.jpg."""
    return "/".join(p for p in os.path.dirname(relpath).split(os.sep) if p and not SPLIT_FOLDER.fullmatch(p))


def read_label_csv(path, kept):
    """The class of each of the images `kept` (paths relative to the data folder) from a CSV file of rows
    path,class (a header row path,class may come first); every image needs a row."""
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"--labels {path}: cannot read it as a CSV file ({e}).")
    table = {}
    for n, r in enumerate(rows, 1):
        if len(r) < 2 or r[:2] == ["path", "class"]:
            continue
        key, name = os.path.normpath(r[0].strip()), r[1].strip()
        if table.get(key, name) != name:  # one image, two classes: which one was meant cannot be guessed
            raise UserError(f"--labels {path} gives {r[0].strip()} two classes, {table[key]!r} and {name!r} (row {n} "
                            f"and one before it). Keep one row per image.")
        table[key] = name
    missing = [p for p in kept if not table.get(os.path.normpath(p))]
    if missing:
        raise UserError(f"--labels {path} gives no class for {len(missing)} of the {len(kept)} images, e.g. {missing[0]}. "
                        f"It needs one row path,class per image, the path relative to the data folder.")
    return [table[os.path.normpath(p)] for p in kept]


def labels_of(root, kept, labels_csv=""):
    """(labels (N,) long, class names sorted) for the images `kept` below root: from labels_csv when given,
    else from their class folders. Every image needs a class, and every class folder an image."""
    if labels_csv:
        names = read_label_csv(labels_csv, kept)
    else:
        names = [class_of(p) for p in kept]
        unlabelled = [p for p, c in zip(kept, names) if not c]
        if unlabelled:
            raise UserError(f"--cond needs the class of every image, but {len(unlabelled)} of the {len(kept)} images under "
                            f"{root} sit in no class folder (e.g. {unlabelled[0]}). Put each class's images in a folder "
                            f"of its own (split folders such as train/ and test/ do not count as classes), or give "
                            f"--labels a CSV file of rows path,class.")
        classes = set(names)
        for d, _, _ in os.walk(root):
            c = class_of(os.path.join(os.path.relpath(d, root), "x")) if d != root else ""
            if c and c not in classes and not any(k.startswith(c + "/") for k in classes):
                raise UserError(f"the class folder {d} holds no images. Remove it, or put its class's images in it.")
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[c] for c in names]), classes


def describe_classes(labels, classes, most=12):
    """One line for the training log: how many classes, and each one's image count (the first `most`)."""
    counts = torch.bincount(labels, minlength=len(classes)).tolist()
    shown = ", ".join(f"{c} {k:,}" for c, k in list(zip(classes, counts))[:most])
    return f"{len(classes)} classes, {len(labels):,} images: {shown}" + (", ..." if len(classes) > most else "")


def find_data(cfg):
    """The folder of images that cfg.data names ("cars": Stanford Cars, looked for in a few places)."""
    if cfg.data == "cars":
        places = [p for p in (cfg.data_dir, os.environ.get("DDPM_DATA_DIR", ""), os.path.join("data", "stanford_cars")) if p]
        for place in places:
            if os.path.isdir(place) and find_images(place):
                return place  # train and test splits together
        raise UserError("no Stanford Cars images were found; looked in: " + ", ".join(places) + ".\n" + CARS_HELP)
    if os.path.isdir(cfg.data):
        return cfg.data
    raise UserError(f"--data {cfg.data!r} is neither toycars, cars, nor an existing folder of images.")


def load(cfg, cache_dir=os.path.join("data", "cache"), labels=False):
    """The training images for cfg.data as uint8 (N, 3, H, W); with labels=True, (images, labels (N,) long,
    class names), the labels from toy cars' colours, class folders or the CSV file cfg.labels."""
    if cfg.data == "toycars" and not labels:
        return toycars(cfg.n_toycars, cfg.image_size, cfg.seed)
    if cfg.data == "toycars":
        data, y = toycars(cfg.n_toycars, cfg.image_size, cfg.seed, labels=True)
        classes = list(TOYCAR_CLASSES)
    else:
        root = find_data(cfg)
        data, kept = image_folder(root, cfg.image_size, cache_dir)
        if not labels:
            return data
        y, classes = labels_of(root, kept, cfg.labels)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        print(describe_classes(y, classes))
    return data, y, classes
