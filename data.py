"""Datasets and augmentation for MlTr (Cheng et al., 2021), Section 4.1.

Every dataset item is a triple (image, target, sizes):
  image   float32 (3, H, W), ImageNet mean/std normalised
  target  float32 (K,): 1 present, 0 absent, -1 ignore (VOC difficult-only labels)
  sizes   int64 (K,): 0 absent/unknown, 1 small, 2 medium, 3 large (COCO area thresholds; a class
          seen at several sizes takes the LARGER one, the paper's "boil the label down").

Datasets, as they lie on disk (the split called "val" is the one the paper evaluates on):

  coco     MS-COCO 2014, https://cocodataset.org/#download (2014 Train and Val images, 2014
           Train/Val annotations):   ROOT/annotations/instances_{train,val}2014.json
                                     ROOT/{train,val}2014/COCO_{train,val}2014_*.jpg
           Images without any annotation are dropped: 82,081 train + 40,137 val = the paper's 122,218.
  voc      Pascal VOC 2007, http://host.robots.ox.ac.uk/pascal/VOC/voc2007/ (VOCtrainval_06-Nov-2007.tar
           and VOCtest_06-Nov-2007.tar both extract into VOCdevkit/VOC2007; ROOT is either folder):
             VOC2007/Annotations/<id>.xml, VOC2007/JPEGImages/<id>.jpg,
             VOC2007/ImageSets/Main/{trainval,test}.txt     train = trainval (5,011), val = test (4,952)
  nuswide  NUS-WIDE, 81 concepts, as ASL's release (the original's Flickr links are dead; every copy
           is a re-crawl): ROOT/nus_wid_data.csv, a header row, then rows filepath,label,split_name:
             images/0001_2124494179.jpg,"['clouds', 'sky']",train         images at ROOT/<filepath>
           split_name train or val (test is read as val); classes = the sorted set of all names;
           listed images missing on disk are skipped, with a warning.
  shapes   the built-in synthetic default (`Shapes`), generated on the fly; no files.

Runtime: torch, numpy, pillow, standard library. No torchvision: the transforms below work on PIL.
"""

import ast
import colorsys
import csv
import functools
import io
import json
import math
import os
import random
import warnings
import xml.etree.ElementTree as ET

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from torch.utils.data import Dataset, Subset


class InputError(Exception):
    """Bad input (a path, a file, a field, a flag): one line that names the thing, what was
    expected and what to do. train.py prints it and exits with status 2."""

    def __str__(self):  # re-raised from a DataLoader worker it carries the worker's traceback
        return super().__str__().rstrip().splitlines()[-1].removeprefix(f"{__name__}.InputError: ")


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def size_category(area, image_area=640 * 480):
    """1 small / 2 medium / 3 large for an object `area` in pixels: COCO's criterion, < 32^2 and
    < 96^2 of a ~640x480 image, scaled to an image of `image_area` pixels (0.33% and 3% of it)."""
    scale = image_area / (640 * 480)
    return 1 if area < 32**2 * scale else (2 if area < 96**2 * scale else 3)


# ----------------------------------------------------------------------------------------------
# Image decoding


def load_image(path, draft_size=None):
    """Open the JPEG or PNG at `path` as an upright 8-bit RGB PIL image, or raise InputError.
    JPEGs at least twice `draft_size` decode at a reduced DCT scale (Pillow's `draft`: 1/2, 1/4 or
    1/8, never below draft_size), most of the decode time saved. The pixels are loaded here, so a
    corrupt file fails here; images over Image.MAX_IMAGE_PIXELS (~89M: Pillow itself only warns
    up to twice that) are refused."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise InputError(
            f"{path} is a directory, not an image file; pass the path of a JPEG or PNG"
        )
    if not os.path.isfile(path):
        raise InputError(
            f"image file not found: {path}; check the path (dataset layouts: data.py's docstring)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=("JPEG", "PNG")) as img:  # an EPS named .jpg: refused
                if draft_size is not None:  # JPEG (and MPO) only; a no-op for PNG
                    img.draft(None, (int(draft_size), int(draft_size)))
                img.load()
                img = ImageOps.exif_transpose(img)  # a new, upright image
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise InputError(f"image {path} is too large ({e}); downscale it") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, ...
        msg = str(e).replace("\n", " ")
        raise InputError(
            f"cannot decode image {path}: {type(e).__name__}: {msg} (only JPEG and "
            "PNG are read; a corrupt or truncated file: re-download or delete it)"
        ) from None
    if img.mode.startswith("I"):  # 16-bit grey PNG: Pillow's convert clips at 255, so scale
        img = Image.fromarray(
            (np.asarray(img) / 257).round().astype(np.uint8)
        )  # (H, W) 0..65535 -> 0..255
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:  # alpha or a transparent key
        rgba, img = img.convert("RGBA"), Image.new("RGB", img.size, (255, 255, 255))
        img.paste(rgba, mask=rgba)  # over white, as a viewer shows it (not the hidden colours)
    return img.convert("RGB")  # L, 1, P, CMYK ... through Pillow's converters


# ----------------------------------------------------------------------------------------------
# Transforms on PIL
#
# Seeding: every random draw below comes from torch's default generator. A DataLoader seeds each
# worker's with base_seed + worker_id, base_seed drawn from the main process's generator when the
# iterator starts: torch.manual_seed(s) before iterating reproduces multi-worker loading, each
# epoch gets fresh augmentations, and no worker_init_fn is needed (numpy's and Python's global
# generators, which forked workers would share, are never used).


def cutout(img, p=0.5, factor=0.5):
    """ASL's CutoutPIL: with probability p, paint a rectangle of `factor` x the image's sides, centred
    at a uniform pixel (clipped at the border), in a uniform random colour, on img (returned)."""
    # Paper: "cutout [43]" (DeVries & Taylor), no parameters. Here: ASL's CutoutPIL (the recipe
    # the paper follows), factor 0.5; ASL cuts every image, we default to p = 0.5 (cutout=1.0: ASL).
    if float(torch.rand(())) >= p:
        return img
    (w, h), (xc, yc) = img.size, (int(torch.randint(n, ())) for n in img.size)
    cw, ch = int(factor * w + 0.5) // 2, int(factor * h + 0.5) // 2  # half the rectangle
    box = [max(0, xc - cw), max(0, yc - ch), min(w, xc + cw), min(h, yc + ch)]
    ImageDraw.Draw(img).rectangle(box, fill=tuple(torch.randint(256, (3,)).tolist()))
    return img


_FILL = (128, 128, 128)  # colour of pixels uncovered by geometric ops (TF / torchvision use 128)


def _affine(img, coeffs):
    return img.transform(
        img.size,
        Image.Transform.AFFINE,
        coeffs,
        resample=Image.Resampling.BILINEAR,
        fillcolor=_FILL,
    )


# RandAugment's 14 operations (Cubuk et al., 2020, Table/Appendix), each f(img, v) with v the
# signed strength in [-1, 1] (magnitude / 30, random sign for the symmetric ones). Maximum
# strengths (v = 1) are those of the TensorFlow reference, as in torchvision: shear 0.3, translate
# 150/331 of the image, rotate 30 degrees, enhance factors 1 +- 0.9, posterize 8 -> 4 bits,
# solarize threshold 255 -> 0.
RANDAUG_OPS = {
    "Identity": lambda img, v: img,
    "AutoContrast": lambda img, v: ImageOps.autocontrast(img),
    "Equalize": lambda img, v: ImageOps.equalize(img),
    "Rotate": lambda img, v: img.rotate(
        30.0 * v, resample=Image.Resampling.BILINEAR, fillcolor=_FILL
    ),
    "Solarize": lambda img, v: ImageOps.solarize(img, 255.0 * (1.0 - abs(v))),
    "Color": lambda img, v: ImageEnhance.Color(img).enhance(1.0 + 0.9 * v),
    "Posterize": lambda img, v: ImageOps.posterize(img, 8 - int(round(4 * abs(v)))),
    "Contrast": lambda img, v: ImageEnhance.Contrast(img).enhance(1.0 + 0.9 * v),
    "Brightness": lambda img, v: ImageEnhance.Brightness(img).enhance(1.0 + 0.9 * v),
    "Sharpness": lambda img, v: ImageEnhance.Sharpness(img).enhance(1.0 + 0.9 * v),
    # Shears about the image centre: output (x, y) reads input (x + s*(y - h/2), y).
    "ShearX": lambda img, v: _affine(img, (1, 0.3 * v, -0.3 * v * img.size[1] / 2, 0, 1, 0)),
    "ShearY": lambda img, v: _affine(img, (1, 0, 0, 0.3 * v, 1, -0.3 * v * img.size[0] / 2)),
    "TranslateX": lambda img, v: _affine(img, (1, 0, (150 / 331) * v * img.size[0], 0, 1, 0)),
    "TranslateY": lambda img, v: _affine(img, (1, 0, 0, 0, 1, (150 / 331) * v * img.size[1])),
}
_UNSIGNED_OPS = {"Identity", "AutoContrast", "Equalize", "Solarize", "Posterize"}


def rand_augment(img, n=2, m=9):
    """RandAugment: apply n operations drawn uniformly (with replacement) from the 14, each at
    magnitude m on the paper's 0..30 scale (31 levels, as torchvision; timm and the TF code use
    0..10, where the same strength is m/3)."""
    # Paper: "randaugment", no N or M. Here: N = 2, M = 9 of 30 (RandAugment's ImageNet ResNet-50
    # setting and torchvision's default), because neither the paper nor ASL's code fixes them.
    names = list(RANDAUG_OPS)
    for _ in range(n):
        name = names[int(torch.randint(len(names), ()))]
        sign = 1 if name in _UNSIGNED_OPS or float(torch.rand(())) >= 0.5 else -1
        img = RANDAUG_OPS[name](img, sign * m / 30.0)
    return img


def to_tensor(img, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """RGB PIL -> float32 (3, H, W), scaled to 0..1 then normalised with mean/std (the ImageNet
    statistics that pretrained Swin weights expect; ASL does not normalise)."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W, 3) uint8
    x = x.permute(2, 0, 1).contiguous().float().div_(255.0)  # (H, W, 3) -> (3, H, W)
    return x.sub_(torch.tensor(mean).view(3, 1, 1)).div_(torch.tensor(std).view(3, 1, 1))


class Transform:
    """Section 4.1's pipeline on RGB PIL: square resize (ASL's, no crop), in training CutoutPIL then
    RandAugment (ASL's order), tensor + ImageNet normalisation. img_size also bounds JPEG drafts."""

    def __init__(self, img_size, train, randaug=(2, 9), cutout=0.5):
        self.img_size, self.train, self.randaug, self.cutout = (
            int(img_size),
            bool(train),
            tuple(randaug),
            cutout,
        )

    def __call__(self, img):
        img = img.resize((self.img_size, self.img_size), Image.Resampling.BILINEAR)  # a new image
        return to_tensor(
            rand_augment(cutout(img, self.cutout), *self.randaug) if self.train else img
        )


def build_transform(img_size, train, randaug=(2, 9), cutout=0.5):
    """The training (train=True) or evaluation Transform at img_size x img_size: RandAugment
    randaug = (N, M) (N = 0: off) and Cutout with probability `cutout`, in training only."""
    return Transform(img_size, train, randaug, cutout)


# ----------------------------------------------------------------------------------------------
# Datasets on disk: one reader per format, returning (files, targets, sizes, classes)


class ImageFiles(Dataset):
    """Image i is the file files[i] (numpy strings: forked workers share them without
    copy-on-write), labelled targets[i] (K,) with sizes[i] (K,)."""

    def __init__(self, files, targets, sizes, classes, transform):
        self.files, self.targets, self.sizes = np.array(files), targets, sizes
        self.classes, self.transform = list(classes), transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        image = self.transform(load_image(str(self.files[i]), draft_size=self.transform.img_size))
        return image, torch.tensor(self.targets[i]).float(), torch.tensor(self.sizes[i]).long()


def verify_images(dataset):
    """Decode every image of a file-backed dataset (or a Subset of one) at JPEG draft scale 1/8,
    raising InputError on the first bad one; anything else (Shapes) passes at once."""
    subset = isinstance(dataset, Subset)
    base, indices = (dataset.dataset, list(dataset.indices)) if subset else (dataset, slice(None))
    for path in base.files[indices] if isinstance(base, ImageFiles) else ():
        load_image(path, draft_size=1)


LAYOUTS = {
    "coco": "ROOT/annotations/instances_{train,val}2014.json and ROOT/{train,val}2014/*.jpg from "
    "https://cocodataset.org/#download (2014 Train/Val images and annotations)",
    "voc": "VOCdevkit/VOC2007/{Annotations/<id>.xml, JPEGImages/<id>.jpg, ImageSets/Main/{trainval,test}.txt} "
    "from VOCtrainval_06-Nov-2007.tar + VOCtest_06-Nov-2007.tar (host.robots.ox.ac.uk/pascal/VOC/voc2007)",
    "nuswide": "ROOT/nus_wid_data.csv (ASL's: a header, then rows filepath,label,split_name like "
    "images/1.jpg,\"['clouds', 'sky']\",train) and the images at ROOT/<filepath>",
}


def _read_text(path, name):
    """The UTF-8 text of an annotation file of dataset `name`, or one InputError line."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeError) as e:
        raise _bad(
            name,
            path,
            "not found"
            if isinstance(e, FileNotFoundError)
            else f"unreadable ({type(e).__name__}: {e})",
        ) from None


def _bad(name, path, problem):
    return InputError(f"{name}: {path}: {problem}; expected {LAYOUTS[name]}")


def read_coco(root, split):
    """MS-COCO 2014, 80 classes in category-id order (ids 1..90 with gaps -> 0..79), named from the
    file. As in ASL (whose recipe Section 4.1 follows), only annotated images are kept and crowd
    annotations count like any other. sizes: COCO's criterion on each annotation's `area`."""
    path = os.path.join(root, "annotations", f"instances_{split}2014.json")
    try:
        d = json.loads(_read_text(path, "coco"))
        if not all(isinstance(d.get(k), list) for k in ("images", "annotations", "categories")):
            raise _bad("coco", path, '"images", "annotations" and "categories" must be lists')
        cats = sorted((c["id"], str(c["name"])) for c in d["categories"])
        cat_index = {cid: k for k, (cid, _) in enumerate(cats)}
        ids = [img["id"] for img in d["images"]]
        row = {image_id: i for i, image_id in enumerate(ids)}  # a repeated id keeps its last row
        if len(row) < len(ids):
            dup = next(x for i, x in enumerate(ids) if row[x] != i)
            raise _bad("coco", path, f"image id {dup} is listed twice")
        target = np.zeros((len(ids), len(cats)), np.int8)  # (N_all, K)
        sizes = np.zeros_like(target)
        for a in d["annotations"]:
            i, k = row.get(a["image_id"]), cat_index.get(a["category_id"])
            if i is None or k is None:
                what = f"image {a['image_id']}" if i is None else f"category {a['category_id']}"
                raise _bad("coco", path, f"annotation {a.get('id')} names an unlisted {what}")
            if a.get("area") is None and len(a.get("bbox") or ()) != 4:
                raise _bad("coco", path, f"annotation {a.get('id')} has neither an area nor a bbox")
            area = (
                a["area"] if a.get("area") is not None else a["bbox"][2] * a["bbox"][3]
            )  # the box's
            target[i, k] = 1
            sizes[i, k] = max(sizes[i, k], size_category(float(area)))  # the larger size wins
        files = [os.path.join(root, f"{split}2014", str(img["file_name"])) for img in d["images"]]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _bad("coco", path, f"malformed ({type(e).__name__}: {e})") from None
    keep = target.any(axis=1)  # drop images without annotations (ASL / the paper's counts)
    return np.array(files)[keep], target[keep], sizes[keep], [name for _, name in cats]


VOC_CLASSES = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]


def read_voc(root, split):
    """Pascal VOC 2007, 20 classes in the standard order; train = trainval, val = test; root is
    VOCdevkit or VOC2007. sizes: box areas (1-based inclusive pixels) by COCO's thresholds (VOC
    images are ~500x375, COCO's scale; boxes exceed COCO's segment areas: VOC sizes lean larger)."""
    base = (
        root if os.path.isdir(os.path.join(root, "Annotations")) else os.path.join(root, "VOC2007")
    )
    list_file = os.path.join(
        base, "ImageSets", "Main", ("trainval" if split == "train" else "test") + ".txt"
    )
    ids = _read_text(list_file, "voc").split()
    # Paper: silent on difficult objects. Here: ML-GCN's protocol (ML-GCN is a row of Table 3):
    # the devkit's <class>_<split>.txt marks a class 1 (a non-difficult object), 0 (difficult
    # objects only) or -1 (absent), and 0 is left out of evaluation. We derive the same three
    # states from the XML (1, -1 = ignore, 0); the losses skip -1 too, and difficult boxes do not
    # enter the size.
    k_of = {c: k for k, c in enumerate(VOC_CLASSES)}
    target = np.zeros((len(ids), len(VOC_CLASSES)), np.int8)  # (N, K)
    sizes = np.zeros_like(target)
    for i, image_id in enumerate(ids):
        path = os.path.join(base, "Annotations", f"{image_id}.xml")
        text = _read_text(path, "voc")
        if (
            "<!DOCTYPE" in text or "<!ENTITY" in text
        ):  # none in VOC; refuses entity expansion tricks
            raise _bad("voc", path, "DOCTYPE/ENTITY declarations are not accepted")
        try:
            objects = ET.fromstring(text).findall("object")
        except ET.ParseError as e:
            raise _bad("voc", path, f"not XML ({e})") from None
        for obj in objects:
            name = (obj.findtext("name") or "").strip()
            if name not in k_of:
                raise _bad(
                    "voc", path, f"unknown class {name!r} (not one of the 20 VOC2007 classes)"
                )
            try:
                x0, y0, x1, y1 = (
                    float(obj.find("bndbox").findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")
                )
            except (AttributeError, TypeError, ValueError):
                raise _bad(
                    "voc",
                    path,
                    f"a {name!r} object without a <bndbox> of numeric xmin, ymin, xmax, ymax",
                ) from None
            k = k_of[name]
            if (obj.findtext("difficult") or "0").strip() == "1":
                target[i, k] = target[i, k] or -1  # -1 unless a non-difficult one made it 1
            else:
                target[i, k] = 1
                sizes[i, k] = max(sizes[i, k], size_category((x1 - x0 + 1) * (y1 - y0 + 1)))
    files = [os.path.join(base, "JPEGImages", f"{image_id}.jpg") for image_id in ids]
    return files, target, sizes, VOC_CLASSES


def read_nuswide(root, split):
    """NUS-WIDE from ASL's CSV; one class list over both splits. sizes are all 0 (no boxes)."""
    path = os.path.join(root, "nus_wid_data.csv")
    reader = csv.reader(io.StringIO(_read_text(path, "nuswide"), newline=""))
    rows = []
    try:
        next(reader, None)  # the header
        for r in reader:
            if r:
                rel, label, part = r
                names = ast.literal_eval(label or "[]")
                if not (isinstance(names, list) and all(isinstance(c, str) for c in names)):
                    raise ValueError("not a list of names")
                rows.append((rel, names, part.strip().lower()))
    except (csv.Error, ValueError, SyntaxError, RecursionError, MemoryError) as e:
        msg = str(e).replace("\n", " ")[:100]
        raise _bad("nuswide", path, f"line {reader.line_num}: {type(e).__name__}: {msg}") from None
    classes = sorted({c for _, names, _ in rows for c in names})
    index = {c: k for k, c in enumerate(classes)}
    rows = [
        (os.path.join(root, rel), names)
        for rel, names, part in rows
        if part in {"train": ("train",), "val": ("val", "test")}[split]
    ]
    found = [(f, names) for f, names in rows if os.path.isfile(f)]
    if 0 < len(found) < len(rows):
        warnings.warn(
            f"NUS-WIDE {split}: {len(rows) - len(found)} of {len(rows)} listed images are "
            f"missing under {root} and were skipped",
            stacklevel=3,
        )
    target = np.zeros((len(found), len(classes)), np.int8)  # (N, K)
    for i, (_, names) in enumerate(found):
        target[i, [index[c] for c in names]] = 1
    return [f for f, _ in found], target, np.zeros_like(target), classes


# ----------------------------------------------------------------------------------------------
# Shapes: the built-in synthetic dataset
#
# Twelve classes of coloured shapes on a noisy, cluttered background, built so that the three
# problems of the paper's Section 1 are present and measurable (sizes by COCO's thresholds scaled
# to the image, see size_category):
#   (1) small objects: "dot" is always ~3 px across (smaller than the tiny variant's 4x4 patch, a
#       COCO "sports ball"), 12% of the other instances are small too, and dim grey specks on the
#       background are the "suspicious dots" of the paper's tennis-court example.
#   (2) similar classes: circle vs ring and square vs dotted_square, the second with a round hole.
#   (3) co-occurrence: P(dot | bar) = 0.8 (the racket and its ball) and P(moon | star) = 0.8
#       (bus and car), while dot and moon also appear on their own (P ~ 0.17).
# Paper: Cutout + RandAugment on every training image. Here: train.py turns both off for Shapes,
# because its images are fresh, Cutout's random-colour rectangles look like the square class, and
# Solarize/Equalize/Color scramble the class hues (measured: mAP 80 without, 21 = chance with).

SHAPE_CLASSES = [
    "circle",
    "ring",
    "square",
    "dotted_square",
    "triangle",
    "hexagon",
    "star",
    "moon",
    "plus",
    "bar",
    "arrow",
    "dot",
]
# A hue per class, as real categories have typical colours (+-0.03, random saturation and value);
# a similar pair shares its hue. dot is near-white, like a ball, brighter than the grey specks.
SHAPE_HUES = {
    "circle": 0.0,
    "ring": 0.0,
    "square": 0.62,
    "dotted_square": 0.62,
    "triangle": 0.33,
    "hexagon": 0.08,
    "star": 0.15,
    "moon": 0.5,
    "plus": 0.83,
    "bar": 0.74,
    "arrow": 0.25,
    "dot": None,
}
SIMILAR_PAIRS = [("circle", "ring"), ("square", "dotted_square")]
COOCCURRENCE = [("bar", "dot", 0.8), ("star", "moon", 0.8)]  # (A, B, P(B | A))
_RULED = {c for a, b, _ in COOCCURRENCE for c in (a, b)}
SHAPES_VAL_OFFSET = 10**9  # index_offset of the "val" split: never overlaps "train"

# Instance sizes for everything but "dot": probability, area range as a fraction of the image
# (COCO's thresholds are 0.0033 and 0.030); the number of independently drawn classes.
_SIZE_MIX = ((0.12, 0.0012, 0.0030), (0.46, 0.0050, 0.0250), (0.42, 0.0380, 0.1100))
_NUM_BASE = (0.30, 0.42, 0.28)  # P(1, 2, 3 classes)
_SS = 4  # supersampling of the shape masks (anti-aliased edges)


def _ngon(n, inner=None, dy=0.0):
    """Unit-radius regular n-gon pointing up, or an n-pointed star with inner radius `inner`."""
    k = 2 * n if inner else n
    rad = [inner if inner and i % 2 else 1.0 for i in range(k)]
    return [
        (r * math.sin(2 * math.pi * i / k), dy - r * math.cos(2 * math.pi * i / k))
        for i, r in enumerate(rad)
    ]


_SQUARE = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
_T = 0.33  # half-width of the plus's arms
# Outlines in units of the radius (y down) and how strongly each turns with the drawn angle
# (bar and arrow take any direction). Shapes absent here are discs.
_OUTLINES = {
    "square": (_SQUARE, 1),
    "dotted_square": (_SQUARE, 1),
    "triangle": (_ngon(3, dy=0.15), 1),
    "hexagon": (_ngon(6), 1),
    "star": (_ngon(5, inner=0.45), 1),
    "plus": (
        [
            (-_T, -1),
            (_T, -1),
            (_T, -_T),
            (1, -_T),
            (1, _T),
            (_T, _T),
            (_T, 1),
            (-_T, 1),
            (-_T, _T),
            (-1, _T),
            (-1, -_T),
            (-_T, -_T),
        ],
        1,
    ),
    "bar": ([(-1, -0.28), (1, -0.28), (1, 0.28), (-1, 0.28)], 8),
    "arrow": (
        [(-1, -0.2), (0.1, -0.2), (0.1, -0.55), (1, 0), (0.1, 0.55), (0.1, 0.2), (-1, 0.2)],
        8,
    ),
}
_HOLES = {"ring": (0.6, 0.0), "dotted_square": (0.42, 0.0), "moon": (0.85, 0.5)}  # radius, offset


def _shape_mask(name, d, rot):
    """Anti-aliased L mask of shape `name`, d pixels across, turned by rot radians, ceil(d) + 2 square."""
    m = math.ceil(d) + 2
    c, r = m * _SS / 2, d * _SS / 2  # centre and radius on the supersampled canvas
    mask = Image.new("L", (m * _SS, m * _SS), 0)
    g = ImageDraw.Draw(mask)
    if name in _OUTLINES:
        pts, spin = _OUTLINES[name]
        cs, sn = math.cos(spin * rot), math.sin(spin * rot)
        g.polygon(
            [(c + r * (x * cs - y * sn), c + r * (x * sn + y * cs)) for x, y in pts], fill=255
        )
    else:
        g.ellipse([c - r, c - r, c + r, c + r], fill=255)
    if name in _HOLES:  # the moon's bite comes from any side
        h, off = _HOLES[name][0] * r, _HOLES[name][1] * r
        x, y = c + off * math.cos(6 * rot), c + off * math.sin(6 * rot)
        g.ellipse([x - h, y - h, x + h, y + h], fill=0)
    return mask.resize((m, m), Image.Resampling.BOX)


@functools.lru_cache(maxsize=None)
def _fill(name):
    """Drawn area of a shape / d^2, measured once at d = 200."""
    return float(np.asarray(_shape_mask(name, 200.0, 0.0), np.float64).sum()) / 255.0 / 200.0**2


def _rgb(h, s, v):
    return tuple(round(255 * x) for x in colorsys.hsv_to_rgb(h, s, v))


class Shapes(Dataset):
    """Synthetic multi-label images, generated on the fly. Item i is image index_offset + i of
    the stream `seed`, and depends on nothing else (not the order of access, process or worker).
    `layout(i)` gives its objects, `image(i)` the untransformed PIL image; transform=None only
    converts to a normalised tensor."""

    def __init__(self, num_images, img_size=96, seed=0, transform=None, index_offset=0):
        self.num_images, self.img_size, self.seed = int(num_images), int(img_size), int(seed)
        self.transform, self.index_offset = transform or to_tensor, int(index_offset)
        self.classes = list(SHAPE_CLASSES)
        self._u = np.linspace(-0.5, 0.5, self.img_size, dtype=np.float32)  # (s,) pixel coordinates

    def __len__(self):
        return self.num_images

    def _rng(self, i):
        if not 0 <= i < self.num_images:
            raise IndexError(f"Shapes index {i} out of range [0, {self.num_images})")
        # str seeding hashes with SHA-512: the same stream in every process, every Python run.
        return random.Random(f"shapes/{self.seed}/{self.index_offset + i}")

    def _labels(self, rng):
        """Classes present: 1-3 drawn uniformly, then the co-occurrence rules."""
        present = rng.sample(self.classes, rng.choices((1, 2, 3), _NUM_BASE)[0])
        for a, b, p in COOCCURRENCE:  # P(B | A) = p exactly, whatever the base draw gave B
            if a in present:
                present = [c for c in present if c != b] + [b] * (rng.random() < p)
        if len(present) > 4:  # at most 4; 3 drawn + 2 by the rules: drop one the rules left alone
            present.remove(next(c for c in present if c not in _RULED))
        return present

    def layout(self, i, rng=None):
        """Objects of image i, nothing drawn: dicts name, k, box (x0, y0, x1, y1), area (pixels),
        size (1/2/3), colour and mask."""
        rng, s = rng or self._rng(i), self.img_size
        names = self._labels(rng)
        if len(names) < 4 and rng.random() < 0.2:  # a second instance of some class
            names.append(names[int(rng.random() * len(names))])
        plans = []
        for name in names:
            if name == "dot":
                d = rng.uniform(2.5, 3.5) * s / 96  # ~3 px at 96: below a 4x4 patch
            else:
                _, lo, hi = rng.choices(_SIZE_MIX, [p for p, _, _ in _SIZE_MIX])[0]
                frac = math.exp(rng.uniform(math.log(lo), math.log(hi)))  # log-uniform area
                d = min(math.sqrt(frac * s * s / _fill(name)), 0.45 * s)
            plans.append((d, name, rng.uniform(-0.2, 0.2)))
        objects = []
        for d, name, rot in sorted(plans, key=lambda t: -t[0]):  # place large objects first
            box = None
            for t in range(90):  # crowded: shrink by 0.75 after 30 and 60 tries (never the dot)
                d *= 0.75 if t in (30, 60) and name != "dot" else 1.0
                m = math.ceil(d) + 2
                x, y = int(rng.random() * (s - m + 1)), int(rng.random() * (s - m + 1))
                if all(
                    x + m < b[0] or b[2] < x or y + m < b[1] or b[3] < y
                    for b in (o["box"] for o in objects)
                ):
                    box = (x, y, x + m, y + m)
                    break
            if box is None:
                continue  # not drawn, so not labelled
            mask = _shape_mask(name, d, rot)
            area = float(np.asarray(mask, np.float32).sum() / 255.0)
            hue = SHAPE_HUES[name]
            colour = (
                _rgb(rng.random(), rng.uniform(0.0, 0.15), rng.uniform(0.93, 1.0))
                if hue is None
                else _rgb(
                    (hue + rng.uniform(-0.03, 0.03)) % 1.0,
                    rng.uniform(0.55, 1.0),
                    rng.uniform(0.7, 1.0),
                )
            )
            objects.append(
                dict(
                    name=name,
                    k=self.classes.index(name),
                    box=box,
                    area=area,
                    size=size_category(area, s * s),
                    colour=colour,
                    mask=mask,
                )
            )
        return objects

    def _render(self, objects, rng):
        s = self.img_size
        noise = np.random.default_rng(rng.getrandbits(64)).standard_normal(
            (s, s, 3), dtype=np.float32
        )
        # background: a linear gradient between two dull colours, plus pixel noise
        c0, c1 = (
            np.array(_rgb(rng.random(), rng.uniform(0, 0.35), rng.uniform(0.15, 0.5)), np.float32)
            for _ in range(2)
        )
        a, u = rng.uniform(0, 2 * math.pi), self._u
        t = np.clip(0.5 + math.cos(a) * u[None, :] + math.sin(a) * u[:, None], 0, 1)[
            :, :, None
        ]  # (s, s, 1)
        img = Image.fromarray(
            np.clip(c0 * (1 - t) + c1 * t + 8.0 * noise, 0, 255).astype(np.uint8)
        )  # (s, s, 3)
        g = ImageDraw.Draw(img)
        for _ in range(rng.randint(3, 7)):  # clutter: thin low-contrast lines
            col = _rgb(rng.random(), rng.uniform(0, 0.3), rng.uniform(0.3, 0.65))
            g.line(
                [(rng.random() * s, rng.random() * s), (rng.random() * s, rng.random() * s)],
                fill=col,
                width=max(1, round(s / 96)),
            )
        for _ in range(rng.randint(0, 2)):  # "suspicious dots": dim grey specks, not the class dot
            col, r = _rgb(0, 0, rng.uniform(0.45, 0.7)), rng.uniform(1.0, 1.6) * s / 96
            x, y = rng.random() * s, rng.random() * s
            g.ellipse([x - r, y - r, x + r, y + r], fill=col)
        for o in objects:
            img.paste(o["colour"], o["box"], o["mask"])
        return img

    def image(self, i):
        """Untransformed PIL image i."""
        rng = self._rng(i)
        return self._render(self.layout(i, rng), rng)

    def __getitem__(self, i):
        rng = self._rng(i)
        objects = self.layout(i, rng)
        sizes = np.zeros(len(self.classes), np.int64)
        for o in objects:
            sizes[o["k"]] = max(sizes[o["k"]], o["size"])  # the larger size wins
        image = self.transform(self._render(objects, rng))
        return image, torch.from_numpy(sizes > 0).float(), torch.from_numpy(sizes)


# ----------------------------------------------------------------------------------------------

DATASETS = ("shapes", "coco", "voc", "nuswide")
_READERS = {"coco": read_coco, "voc": read_voc, "nuswide": read_nuswide}


def build_dataset(name, root, split, img_size, train, randaug=(2, 9), cutout=0.5, num_images=None):
    """Dataset `name` (one of DATASETS), split "train" or "val" (the paper's evaluation split: COCO
    val2014, VOC test, NUS-WIDE val), through build_transform(img_size, train, randaug, cutout).
    num_images: Shapes only (default 20000 train / 2000 val, seed 0, the two splits disjoint)."""
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in ("train", "val"):
        raise InputError(
            f"{name}: unknown split {split!r}; use 'train' or 'val' (val = the split the "
            "paper evaluates on)"
        )
    transform = build_transform(img_size, train, randaug, cutout)
    if name == "shapes":
        n = num_images or (20000 if split == "train" else 2000)
        return Shapes(
            n, img_size, 0, transform, index_offset=0 if split == "train" else SHAPES_VAL_OFFSET
        )
    if not root or not os.path.isdir(root):
        raise InputError(
            f"{name}: data folder {root!r} not found (--data-dir); expected {LAYOUTS[name]}"
        )
    files, targets, sizes, classes = _READERS[name](os.fspath(root), split)
    if not classes or not len(files):
        raise InputError(
            f"{name}: {root} gives {len(classes)} classes and {len(files)} {split} images "
            f"on disk, so nothing to train on; expected {LAYOUTS[name]}"
        )
    return ImageFiles(files, targets, sizes, classes, transform)
