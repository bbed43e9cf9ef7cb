"""Datasets and augmentation for MlTr (Cheng et al., 2021), Section 4.1.

Every dataset item is a triple (image, target, sizes):
  image   float32 (3, H, W), ImageNet mean/std normalised
  target  float32 (K,): 1 present, 0 absent, -1 ignore (VOC difficult-only labels)
  sizes   int64 (K,): 0 absent/unknown, 1 small, 2 medium, 3 large (COCO area thresholds; a class
          seen at several sizes takes the LARGER one, the paper's "boil the label down").

`load_splits` reads a dataset's two splits. The class list comes from the training split; the val
split must name the same classes and maps to them by name. The split called "val" is the one the
paper evaluates on. Datasets, as they lie on disk:

  coco     MS-COCO 2014, https://cocodataset.org/#download (2014 Train and Val images, 2014
           Train/Val annotations):   ROOT/annotations/instances_{train,val}2014.json
                                     ROOT/{train,val}2014/COCO_{train,val}2014_*.jpg
           Images without any annotation are dropped: 82,081 train + 40,137 val, the paper's
           122,218 (ASL's protocol).
  coco     your own COCO-format set (`CocoFiles`): per split a json as CVAT, Label Studio or
           Roboflow export it and the folder its "file_name"s are relative to (subfolders allowed).
           Classes in category-id order (any ids); images without annotations are KEPT, as
           all-negative examples (Interpretation 30).
  csv      your own set as in Kaggle's multi-label competitions: ROOT/train.csv and ROOT/val.csv,
           a header row, then rows image,labels, the image path relative to ROOT and its labels
           separated by spaces (an empty field: no label):
             photos/0001.jpg,cat dog
           classes = the sorted names found in train.csv (Interpretation 30).
  voc      Pascal VOC 2007, http://host.robots.ox.ac.uk/pascal/VOC/voc2007/
           (VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar both extract into
           VOCdevkit/VOC2007; ROOT is either folder):
             VOC2007/Annotations/<id>.xml, VOC2007/JPEGImages/<id>.jpg,
             VOC2007/ImageSets/Main/{trainval,test}.txt
           train = trainval (5,011), val = test (4,952)
  nuswide  NUS-WIDE, 81 concepts, as ASL's release (the original's Flickr links are dead; every copy
           is a re-crawl): ROOT/nus_wid_data.csv, a header row, then rows filepath,label,split_name:
             images/0001_2124494179.jpg,"['clouds', 'sky']",train         images at ROOT/<filepath>
           split_name train or val (ASL's two names; any other is refused); classes = the sorted
           names of the train rows; listed images missing on disk are skipped, with a warning.
  shapes   the built-in synthetic default (`Shapes`), generated on the fly; no files.

Every file is checked before it is opened (a regular file, not a fifo or a device), annotation
files are read up to MAX_ANNOTATION_BYTES, image paths must stay inside the dataset's folder, each
image is listed once, in one split, and every value is checked where it is read: bad input is one
InputError line naming the file and the entry.

Runtime: torch, numpy, pillow, standard library. No torchvision: the transforms below work on PIL.
"""

import ast
import colorsys
import csv
import functools
import hashlib
import io
import json
import math
import os
import random
import stat
import warnings
import xml.etree.ElementTree as ET
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from torch.utils.data import Dataset


class InputError(Exception):
    """Bad input (a path, a file, a field, a flag): one line that names the thing, what was
    expected and what to do. train.py prints it and exits with status 2."""

    def __str__(self):
        # Re-raised from a DataLoader worker, the message carries the worker's traceback, whose
        # last "data.InputError: " is this line. A newline inside a path is shown as \n.
        text = super().__str__().rsplit(f"{__name__}.InputError: ", 1)[-1]
        return text.strip().replace("\n", "\\n")


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Annotation files are read whole. 1 GiB is twice COCO 2017's largest (instances_train2017.json,
# under 0.5 GB); above it, a file is refused before anything is read.
MAX_ANNOTATION_BYTES = 2**30


def size_category(area, image_area=640 * 480):
    """1 small / 2 medium / 3 large for an object `area` in pixels: COCO's criterion, < 32^2 and
    < 96^2 of a ~640x480 image, scaled to an image of `image_area` pixels (0.33% and 3% of it)."""
    scale = image_area / (640 * 480)
    if area < 32**2 * scale:
        return 1
    if area < 96**2 * scale:
        return 2
    return 3


# ----------------------------------------------------------------------------------------------
# Files: regular files only, bounded reads, paths that stay inside the dataset

_FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a fifo (named pipe)",
    stat.S_IFCHR: "a device",
    stat.S_IFBLK: "a device",
    stat.S_IFSOCK: "a socket",
}


def check_regular_file(path, what):
    """os.stat of `path` (a symlink is followed), or InputError unless it is an existing regular
    file. Nothing is opened: opening a fifo waits for a writer, and a device never ends."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL character in the path
        raise InputError(f"{what} {path} cannot be read ({type(e).__name__}: {e})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(st.st_mode), "a special file")
        raise InputError(f"{what} {path} is {kind}, not a regular file; pass a file")
    return st


def _read_text(path, what, layout):
    """The text (UTF-8, an optional BOM) of an annotation file, or one InputError line."""
    if not os.path.exists(path):
        raise InputError(f"{what} not found: {path}; expected {layout}")
    size = check_regular_file(path, what).st_size
    if size > MAX_ANNOTATION_BYTES:
        raise InputError(
            f"{what} {path} has {size} bytes, over the {MAX_ANNOTATION_BYTES} that are read "
            "(data.MAX_ANNOTATION_BYTES)"
        )
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_ANNOTATION_BYTES + 1)  # a regular file: its size was checked
    except OSError as e:
        raise InputError(f"{what} {path} cannot be read ({type(e).__name__}: {e})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise InputError(
            f"{path}: line {line}: byte 0x{raw[e.start]:02x} is not UTF-8 "
            f"(UnicodeDecodeError); save the file as UTF-8"
        ) from None


def _read_json(path, what, layout):
    """The parsed JSON of an annotation file, or one InputError line (RecursionError included)."""
    text = _read_text(path, what, layout)
    try:
        return json.loads(text)
    except RecursionError:
        raise InputError(f"{path}: nested too deeply to read (RecursionError)") from None
    except ValueError as e:  # JSONDecodeError; an integer of over 4300 digits
        raise InputError(f"{path}: not JSON ({type(e).__name__}: {e})") from None


def _inside(root, rel, where):
    """root/rel, or InputError unless `rel` is a relative path that stays inside root (checked on
    the path's text: a symlink inside root may point anywhere)."""
    if not isinstance(rel, str) or not rel:
        raise InputError(f"{where}: image path {rel!r} is not a file path")
    if os.path.isabs(rel) or os.path.normpath(rel).split(os.sep)[0] == "..":
        raise InputError(f"{where}: image path {rel!r} leaves {root}; give it relative to that")
    return os.path.join(root, rel)


def _number(value, where):
    """value if it is a finite number >= 0 (not a string, not a bool), else InputError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise InputError(f"{where} is {value!r:.40}, not a finite number >= 0; fix that entry")
    return value


# ----------------------------------------------------------------------------------------------
# Image decoding


def load_image(path, draft_size=None):
    """Open the JPEG or PNG at `path` as an upright 8-bit RGB PIL image, or raise InputError.
    JPEGs at least twice `draft_size` decode at a reduced DCT scale (Pillow's `draft`: 1/2, 1/4 or
    1/8, never below draft_size), most of the decode time saved. The pixels are loaded here, so a
    corrupt file fails here; images over Image.MAX_IMAGE_PIXELS (~89M: Pillow itself only warns
    up to twice that) are refused."""
    path = os.fspath(path)
    check_regular_file(path, "image file")
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
        raise InputError(
            f"cannot decode image {path}: {type(e).__name__}: {e} (only JPEG and PNG are read; "
            "a corrupt or truncated file: re-download or delete it)"
        ) from None
    if img.mode.startswith("I"):  # 16-bit grey PNG: Pillow's convert clips at 255, so scale
        grey = (np.asarray(img) / 257).round().astype(np.uint8)  # (H, W) 0..65535 -> 0..255
        img = Image.fromarray(grey)
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:  # alpha or a transparent key
        rgba = img.convert("RGBA")
        img = Image.new("RGB", img.size, (255, 255, 255))
        img.paste(rgba, mask=rgba)  # over white, as a viewer shows it (not the hidden colours)
    return img.convert("RGB")  # L, 1, P, CMYK ... through Pillow's converters


# ----------------------------------------------------------------------------------------------
# Transforms on PIL
#
# Seeding: a training sample's augmentation draws only from augmentation_generator(seed, epoch,
# index), never from a global generator (Python's, numpy's or torch's). The result depends on
# nothing else: not the DataLoader's worker count, the worker that reads it, or the access order.


def augmentation_generator(seed, epoch, index):
    """The torch.Generator of one sample's augmentation in one epoch, seeded by a hash of
    (seed, epoch, index)."""
    key = hashlib.blake2b(f"augment/{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(key, "little"))


def cutout(img, generator, p=0.5, factor=0.5):
    """ASL's CutoutPIL: with probability p, paint a rectangle of `factor` x the image's sides,
    centred at a uniform pixel (clipped at the border), in a uniform random colour, on img
    (returned)."""
    # Paper: "cutout [43]" (DeVries & Taylor), no parameters. Here: ASL's CutoutPIL (the recipe
    # the paper follows), factor 0.5; ASL cuts every image, we default to p = 0.5 (cutout=1.0: ASL).
    if float(torch.rand((), generator=generator)) >= p:
        return img
    w, h = img.size
    x_centre = int(torch.randint(w, (), generator=generator))
    y_centre = int(torch.randint(h, (), generator=generator))
    half_w = int(factor * w + 0.5) // 2
    half_h = int(factor * h + 0.5) // 2
    box = [
        max(0, x_centre - half_w),
        max(0, y_centre - half_h),
        min(w, x_centre + half_w),
        min(h, y_centre + half_h),
    ]
    colour = tuple(torch.randint(256, (3,), generator=generator).tolist())
    ImageDraw.Draw(img).rectangle(box, fill=colour)
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


def rand_augment(img, generator, n=2, m=9):
    """RandAugment: apply n operations drawn uniformly (with replacement) from the 14, each at
    magnitude m on the paper's 0..30 scale (31 levels, as torchvision; timm and the TF code use
    0..10, where the same strength is m/3)."""
    # Paper: "randaugment", no N or M. Here: N = 2, M = 9 of 30 (RandAugment's ImageNet ResNet-50
    # setting and torchvision's default), because neither the paper nor ASL's code fixes them.
    names = list(RANDAUG_OPS)
    for _ in range(n):
        name = names[int(torch.randint(len(names), (), generator=generator))]
        sign = 1
        if name not in _UNSIGNED_OPS and float(torch.rand((), generator=generator)) < 0.5:
            sign = -1
        img = RANDAUG_OPS[name](img, sign * m / 30.0)
    return img


def to_tensor(img, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """RGB PIL -> float32 (3, H, W), scaled to 0..1 then normalised with mean/std (the ImageNet
    statistics that pretrained Swin weights expect; ASL does not normalise)."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W, 3) uint8
    x = x.permute(2, 0, 1).contiguous().float().div_(255.0)  # (H, W, 3) -> (3, H, W)
    mean = torch.tensor(mean).view(3, 1, 1)
    std = torch.tensor(std).view(3, 1, 1)
    return x.sub_(mean).div_(std)


class Transform:
    """Section 4.1's pipeline on RGB PIL: square resize (ASL's, no crop), in training CutoutPIL then
    RandAugment (ASL's order) drawn from augmentation_generator(seed, epoch, index), tensor +
    ImageNet normalisation. img_size also bounds JPEG drafts."""

    def __init__(self, img_size, train, randaug=(2, 9), cutout=0.5, seed=0):
        self.img_size = int(img_size)
        self.train = bool(train)
        self.randaug = tuple(randaug)
        self.cutout = cutout
        self.seed = int(seed)

    def __call__(self, img, epoch=0, index=0):
        img = img.resize((self.img_size, self.img_size), Image.Resampling.BILINEAR)  # a new image
        if self.train:
            generator = augmentation_generator(self.seed, epoch, index)
            img = cutout(img, generator, self.cutout)
            img = rand_augment(img, generator, *self.randaug)
        return to_tensor(img)


def build_transform(img_size, train, randaug=(2, 9), cutout=0.5, seed=0):
    """The training (train=True) or evaluation Transform at img_size x img_size: RandAugment
    randaug = (N, M) (N = 0: off) and Cutout with probability `cutout`, in training only, drawn
    from generators seeded by (seed, epoch, index)."""
    return Transform(img_size, train, randaug, cutout, seed)


# ----------------------------------------------------------------------------------------------
# Datasets on disk: one reader per format, each returning the Labels of a split


class Labels(NamedTuple):
    """One split as read from disk: image i is files[i], labelled targets[i] with sizes[i]."""

    files: list  # image paths
    targets: np.ndarray  # int8 (N, K): 1 present, 0 absent, -1 ignore
    sizes: np.ndarray  # int8 (N, K): 0 unknown, 1 small, 2 medium, 3 large
    classes: list  # the K names
    source: str  # the annotation file, for messages


class Splits(NamedTuple):
    """A dataset's training and validation splits (datasets, or their Labels) and its classes."""

    train: object
    val: object
    classes: list


class CocoFiles(NamedTuple):
    """Your own COCO-format set: each split's json and the folder its file_names start from."""

    train_json: str
    train_images: str
    val_json: str
    val_images: str


LAYOUTS = {
    "coco": "ROOT/annotations/instances_{train,val}2014.json and ROOT/{train,val}2014/*.jpg from "
    "https://cocodataset.org/#download (2014 Train/Val images and annotations)",
    "coco-files": 'a COCO-format json per split (--train-json, --val-json: "images", '
    '"annotations" and "categories", as CVAT, Label Studio or Roboflow export them) and the '
    'folder its "file_name"s are relative to (--train-images, --val-images)',
    "csv": "ROOT/train.csv and ROOT/val.csv, a header row, then rows image,labels: the image path "
    "relative to ROOT and its labels separated by spaces (photos/1.jpg,cat dog)",
    "voc": "VOCdevkit/VOC2007/{Annotations/<id>.xml, JPEGImages/<id>.jpg, "
    "ImageSets/Main/{trainval,test}.txt} from VOCtrainval_06-Nov-2007.tar + "
    "VOCtest_06-Nov-2007.tar (host.robots.ox.ac.uk/pascal/VOC/voc2007)",
    "nuswide": "ROOT/nus_wid_data.csv (ASL's: a header, then rows filepath,label,split_name like "
    "images/1.jpg,\"['clouds', 'sky']\",train) and the images at ROOT/<filepath>",
}


def _coco_categories(d, path):
    """{category id: name} in id order, each id and each name once. Left out: a category named as
    another's supercategory that no annotation uses (Roboflow's exports add one such root)."""
    names = {}
    for c in d["categories"]:
        if isinstance(c["id"], bool) or not isinstance(c["id"], int):
            raise InputError(f"{path}: category {c['id']!r:.40}: the id must be an integer")
        if not isinstance(c["name"], str):
            raise InputError(f"{path}: category {c['id']}: the name must be a string")
        if c["id"] in names:
            raise InputError(
                f"{path}: category id {c['id']} is listed twice ({names[c['id']]!r} and "
                f"{c['name']!r}); give each category its own id"
            )
        if c["name"] in set(names.values()):
            raise InputError(f"{path}: category name {c['name']!r} is listed twice; merge them")
        names[c["id"]] = c["name"]
    used = {a["category_id"] for a in d["annotations"]}
    parents = {
        c.get("supercategory") for c in d["categories"] if c.get("supercategory") != c["name"]
    }
    return {k: names[k] for k in sorted(names) if names[k] not in parents or k in used}


def _coco_columns(categories, train, path):
    """Target column of each category id: in id order for the training split; by name, onto the
    training split's classes, for val (labelling tools number categories per project)."""
    if train is None:
        return {cid: k for k, cid in enumerate(categories)}
    column = {name: k for k, name in enumerate(train.classes)}
    for cid, name in categories.items():
        if name not in column:
            raise InputError(
                f"{path}: category {name!r} (id {cid}) is not a category of {train.source}; "
                "both splits must name the same categories"
            )
    missing = sorted(set(train.classes) - set(categories.values()))
    if missing:
        raise InputError(
            f"{path}: lacks category {missing[0]!r} of {train.source}; both splits must name the "
            "same categories"
        )
    return {cid: column[name] for cid, name in categories.items()}


def _coco_area(a, where):
    """An annotation's area: its "area", else its bbox's width x height; each value read a finite
    number >= 0."""
    if a.get("area") is not None:
        return _number(a["area"], f"{where}: area")
    box = a.get("bbox")
    if not isinstance(box, list) or len(box) != 4:
        raise InputError(f"{where}: has neither an area nor a bbox [x, y, width, height]")
    for value in box:
        _number(value, f"{where}: bbox {box!r:.60}")
    return box[2] * box[3]


def read_coco(json_path, image_dir, train=None, keep_unannotated=False, layout="coco"):
    """One split of a COCO-format set: classes from `train` (the training split's Labels), or for
    the training split itself its categories in id order (COCO 2014: ids 1..90 with gaps ->
    0..79), named from the file. Crowd annotations count like any other (ASL). sizes: COCO's
    criterion on each annotation's area. keep_unannotated=False is ASL's (the paper's) protocol."""
    d = _read_json(json_path, "COCO annotation file", LAYOUTS[layout])
    if not isinstance(d, dict) or not all(
        isinstance(d.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise InputError(f'{json_path}: "images", "annotations" and "categories" must be lists')
    try:
        categories = _coco_categories(d, json_path)
        column = _coco_columns(categories, train, json_path)
        row = {}
        files = []
        for img in d["images"]:
            where = f"{json_path}: image {img['id']!r:.40}"
            if img["id"] in row:
                raise InputError(f"{where} is listed twice; give each image its own id")
            row[img["id"]] = len(files)
            files.append(_inside(image_dir, img["file_name"], where))
        target = np.zeros((len(files), len(categories)), np.int8)  # (N_all, K)
        sizes = np.zeros_like(target)
        for a in d["annotations"]:
            where = f"{json_path}: annotation {a.get('id')!r:.40}"
            i = row.get(a["image_id"])
            k = column.get(a["category_id"])
            if i is None:
                raise InputError(f"{where} names an unlisted image {a['image_id']!r:.40}")
            if k is None:
                raise InputError(f"{where} names an unlisted category {a['category_id']!r:.40}")
            target[i, k] = 1
            sizes[i, k] = max(sizes[i, k], size_category(_coco_area(a, where)))  # the larger wins
    except (KeyError, TypeError, AttributeError) as e:  # a field missing, or of the wrong kind
        raise InputError(f"{json_path}: malformed ({type(e).__name__}: {e})") from None
    classes = list(categories.values()) if train is None else train.classes
    # Paper: COCO 2014's annotated images (122,218). Here: your own sets also keep the others, as
    # all-negative examples (Interpretation 30).
    keep = np.ones(len(files), bool) if keep_unannotated else target.any(axis=1)
    files = [f for f, kept in zip(files, keep, strict=True) if kept]
    return Labels(files, target[keep], sizes[keep], classes, json_path)


VOC_CLASSES = (
    "aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike "
    "person pottedplant sheep sofa train tvmonitor"
).split()


class VocObject(NamedTuple):
    name: str
    difficult: bool
    area: float  # of the box, in 1-based inclusive pixels


def _voc_objects(path):
    """The objects of one VOC annotation XML."""
    text = _read_text(path, "VOC annotation file", LAYOUTS["voc"])
    if "<!DOCTYPE" in text or "<!ENTITY" in text:  # none in VOC; refuses entity expansion tricks
        raise InputError(f"{path}: DOCTYPE/ENTITY declarations are not accepted")
    try:
        elements = ET.fromstring(text).findall("object")
    except ET.ParseError as e:
        raise InputError(f"{path}: not XML ({e})") from None
    objects = []
    for obj in elements:
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise InputError(f"{path}: unknown class {name!r} (not one of the 20 VOC2007 classes)")
        try:
            x0, y0, x1, y1 = (
                float(obj.find("bndbox").findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")
            )
        except (AttributeError, TypeError, ValueError):
            raise InputError(
                f"{path}: a {name!r} object without a <bndbox> of numeric xmin, ymin, xmax, ymax"
            ) from None
        width = _number(x1 - x0 + 1, f"{path}: the {name!r} box's width")
        height = _number(y1 - y0 + 1, f"{path}: the {name!r} box's height")
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        objects.append(VocObject(name, difficult, width * height))
    return objects


def read_voc(root, split):
    """Pascal VOC 2007, 20 classes in the standard order; train = trainval, val = test; root is
    VOCdevkit or VOC2007. sizes: box areas (1-based inclusive pixels) by COCO's thresholds (VOC
    images are ~500x375, COCO's scale; boxes exceed COCO's segment areas: VOC sizes lean larger)."""
    base = os.path.join(root, "VOC2007")
    if os.path.isdir(os.path.join(root, "Annotations")):
        base = root
    list_name = {"train": "trainval.txt", "val": "test.txt"}[split]
    list_file = os.path.join(base, "ImageSets", "Main", list_name)
    ids = _read_text(list_file, "VOC image list", LAYOUTS["voc"]).split()
    # Paper: silent on difficult objects. Here: ML-GCN's protocol (ML-GCN is a row of Table 3):
    # the devkit's <class>_<split>.txt marks a class 1 (a non-difficult object), 0 (difficult
    # objects only) or -1 (absent), and 0 is left out of evaluation. We derive the same three
    # states from the XML (1, -1 = ignore, 0); the losses skip -1 too, and difficult boxes do not
    # enter the size.
    k_of = {c: k for k, c in enumerate(VOC_CLASSES)}
    target = np.zeros((len(ids), len(VOC_CLASSES)), np.int8)  # (N, K)
    sizes = np.zeros_like(target)
    files = []
    for i, image_id in enumerate(ids):
        where = f"{list_file}: id {image_id!r}"
        files.append(_inside(os.path.join(base, "JPEGImages"), f"{image_id}.jpg", where))
        xml = _inside(os.path.join(base, "Annotations"), f"{image_id}.xml", where)
        for obj in _voc_objects(xml):
            k = k_of[obj.name]
            if obj.difficult:
                target[i, k] = target[i, k] or -1  # -1 unless a non-difficult one made it 1
            else:
                target[i, k] = 1
                sizes[i, k] = max(sizes[i, k], size_category(obj.area))
    return Labels(files, target, sizes, list(VOC_CLASSES), list_file)


class NusRow(NamedTuple):
    line: int
    file: str
    names: list
    split: str


def _nus_rows(root, path):
    """The rows of ASL's nus_wid_data.csv: filepath, a Python-list string of names, split."""
    reader = csv.reader(
        io.StringIO(_read_text(path, "NUS-WIDE file", LAYOUTS["nuswide"]), newline="")
    )
    rows = []
    try:
        next(reader, None)  # the header
        for r in reader:
            where = f"{path}: line {reader.line_num}"
            if not r:
                continue
            if len(r) != 3:
                raise InputError(f"{where}: {len(r)} columns, expected filepath,label,split_name")
            names = ast.literal_eval(r[1] or "[]")
            if not (isinstance(names, list) and all(isinstance(c, str) for c in names)):
                raise InputError(f"{where}: label {r[1]!r:.60} is not a list of names")
            if r[2].strip() not in ("train", "val"):
                raise InputError(
                    f"{where}: split_name {r[2]!r:.40} is neither train nor val (ASL's names); "
                    "rename it"
                )
            rows.append(NusRow(reader.line_num, _inside(root, r[0], where), names, r[2].strip()))
    except (csv.Error, ValueError, SyntaxError, RecursionError, MemoryError) as e:
        msg = str(e).replace("\n", " ")[:100]
        raise InputError(f"{path}: line {reader.line_num}: {type(e).__name__}: {msg}") from None
    return rows


def read_nuswide(root):
    """NUS-WIDE from ASL's CSV: Splits of Labels, the classes the sorted names of the training
    rows. sizes are all 0 (no boxes). Images missing on disk are skipped, with a warning."""
    path = os.path.join(root, "nus_wid_data.csv")
    rows = _nus_rows(root, path)
    classes = sorted({c for r in rows if r.split == "train" for c in r.names})
    column = {c: k for k, c in enumerate(classes)}
    parts = []
    for split in ("train", "val"):
        listed = [r for r in rows if r.split == split]
        found = [r for r in listed if os.path.isfile(r.file)]
        if 0 < len(found) < len(listed):
            warnings.warn(
                f"NUS-WIDE {split}: {len(listed) - len(found)} of {len(listed)} listed images are "
                f"missing under {root} and were skipped",
                stacklevel=3,
            )
        target = np.zeros((len(found), len(classes)), np.int8)  # (N, K)
        for i, r in enumerate(found):
            for name in r.names:
                if name not in column:
                    raise InputError(
                        f"{path}: line {r.line}: label {name!r} is not among the train rows' labels"
                    )
                target[i, column[name]] = 1
        parts.append(Labels([r.file for r in found], target, np.zeros_like(target), classes, path))
    return Splits(parts[0], parts[1], classes)


def read_csv(root, name, train=None):
    """ROOT/<name> of the csv layout: a header, then rows image,labels. classes: the sorted names
    found here (the training file), or those of `train`, which every label must be among."""
    path = os.path.join(root, name)
    reader = csv.reader(io.StringIO(_read_text(path, "CSV file", LAYOUTS["csv"]), newline=""))
    files = []
    names = []
    try:
        header = next(reader, None)
        if header and os.path.isfile(os.path.join(root, header[0].strip())):
            raise InputError(f"{path}: line 1 names an image; the first line is a header")
        for r in reader:
            where = f"{path}: line {reader.line_num}"
            if not r:
                continue
            if len(r) != 2:
                raise InputError(f"{where}: {len(r)} columns, expected 2 (image path, labels)")
            file = _inside(root, r[0].strip(), where)
            try:
                check_regular_file(file, "image file")
            except InputError as e:
                raise InputError(f"{where}: {e}") from None
            files.append(file)
            names.append((reader.line_num, r[1].split()))
    except csv.Error as e:
        raise InputError(f"{path}: line {reader.line_num}: {e}") from None
    classes = sorted({c for _, labels in names for c in labels}) if train is None else train.classes
    column = {c: k for k, c in enumerate(classes)}
    target = np.zeros((len(files), len(classes)), np.int8)  # (N, K)
    for i, (line, labels) in enumerate(names):
        for label in labels:
            if label not in column:
                raise InputError(
                    f"{path}: line {line}: label {label!r} is not among the labels of "
                    f"{train.source}, where the classes come from"
                )
            target[i, column[label]] = 1
    return Labels(files, target, np.zeros_like(target), classes, path)


def verify_images(files):
    """Decode every image of `files` at JPEG draft scale 1/8, raising InputError on the first bad
    one (before training, so a bad val image is not found after an epoch)."""
    for path in files:
        load_image(path, draft_size=1)


class EpochDataset(Dataset):
    """A dataset whose training augmentation draws from (seed, epoch, index): call set_epoch(epoch)
    before each epoch (before the DataLoader's iterator starts, which copies it to the workers)."""

    epoch = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)


class ImageFiles(EpochDataset):
    """Image i is the file files[i] (numpy strings: forked workers share them without
    copy-on-write), labelled targets[i] (K,) with sizes[i] (K,)."""

    def __init__(self, labels, transform):
        self.files = np.array(labels.files)
        self.targets = labels.targets
        self.sizes = labels.sizes
        self.classes = list(labels.classes)
        self.transform = transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        img = load_image(str(self.files[i]), draft_size=self.transform.img_size)
        image = self.transform(img, self.epoch, i)
        targets = torch.tensor(self.targets[i]).float()  # (K,) 1, 0 or -1
        sizes = torch.tensor(self.sizes[i]).long()  # (K,) 0 unknown, 1 small, 2 medium, 3 large
        return image, targets, sizes


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

# The classes, in this order, and a hue per class, as real categories have typical colours (+-0.03,
# random saturation and value); a similar pair shares its hue. dot is near-white, like a ball,
# brighter than the grey specks.
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
SHAPE_CLASSES = list(SHAPE_HUES)
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
    vertices = []
    for i, r in enumerate(rad):
        angle = 2 * math.pi * i / k  # from straight up, clockwise (y points down)
        vertices.append((r * math.sin(angle), dy - r * math.cos(angle)))
    return vertices


_SQUARE = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
_T = 0.33  # half-width of the plus's arms
_PLUS = [(-_T, -1), (_T, -1), (_T, -_T), (1, -_T), (1, _T), (_T, _T)]
_PLUS += [(_T, 1), (-_T, 1), (-_T, _T), (-1, _T), (-1, -_T), (-_T, -_T)]
_ARROW = [(-1, -0.2), (0.1, -0.2), (0.1, -0.55), (1, 0), (0.1, 0.55), (0.1, 0.2), (-1, 0.2)]
# Outlines in units of the radius (y down) and how strongly each turns with the drawn angle
# (bar and arrow take any direction). Shapes absent here are discs.
_OUTLINES = {
    "square": (_SQUARE, 1),
    "dotted_square": (_SQUARE, 1),
    "triangle": (_ngon(3, dy=0.15), 1),
    "hexagon": (_ngon(6), 1),
    "star": (_ngon(5, inner=0.45), 1),
    "plus": (_PLUS, 1),
    "bar": ([(-1, -0.28), (1, -0.28), (1, 0.28), (-1, 0.28)], 8),
    "arrow": (_ARROW, 8),
}
_HOLES = {"ring": (0.6, 0.0), "dotted_square": (0.42, 0.0), "moon": (0.85, 0.5)}  # radius, offset


def _shape_mask(name, d, rot):
    """Anti-aliased L mask of shape `name`, d pixels across, turned by rot radians, on a square
    of ceil(d) + 2 pixels."""
    m = math.ceil(d) + 2
    c = m * _SS / 2  # centre and radius on the supersampled canvas
    r = d * _SS / 2
    mask = Image.new("L", (m * _SS, m * _SS), 0)
    g = ImageDraw.Draw(mask)
    if name in _OUTLINES:
        pts, spin = _OUTLINES[name]
        cos = math.cos(spin * rot)
        sin = math.sin(spin * rot)
        g.polygon(
            [(c + r * (x * cos - y * sin), c + r * (x * sin + y * cos)) for x, y in pts], fill=255
        )
    else:
        g.ellipse([c - r, c - r, c + r, c + r], fill=255)
    if name in _HOLES:  # the moon's bite comes from any side
        radius, offset = _HOLES[name]
        h = radius * r
        x = c + offset * r * math.cos(6 * rot)
        y = c + offset * r * math.sin(6 * rot)
        g.ellipse([x - h, y - h, x + h, y + h], fill=0)
    return mask.resize((m, m), Image.Resampling.BOX)


@functools.lru_cache(maxsize=None)
def _fill(name):
    """Drawn area of a shape / d^2, measured once at d = 200."""
    return float(np.asarray(_shape_mask(name, 200.0, 0.0), np.float64).sum()) / 255.0 / 200.0**2


def _rgb(h, s, v):
    return tuple(round(255 * x) for x in colorsys.hsv_to_rgb(h, s, v))


def _apart(a, b):
    """Boxes (x0, y0, x1, y1) that neither overlap nor touch."""
    a_x0, a_y0, a_x1, a_y1 = a
    b_x0, b_y0, b_x1, b_y1 = b
    side_by_side = a_x1 < b_x0 or b_x1 < a_x0
    one_above_the_other = a_y1 < b_y0 or b_y1 < a_y0
    return side_by_side or one_above_the_other


class _Plan(NamedTuple):
    d: float  # diameter in pixels
    name: str
    rot: float  # radians


class _Placement(NamedTuple):
    d: float  # the diameter, shrunk when crowded
    box: tuple  # (x0, y0, x1, y1)


class Shapes(EpochDataset):
    """Synthetic multi-label images, generated on the fly. Item i is image index_offset + epoch *
    num_images + i of the stream `seed` (set_epoch: fresh images every epoch), and depends on
    nothing else (not the order of access, process or worker).
    `layout(i)` gives its objects, `image(i)` the untransformed PIL image; transform=None only
    converts to a normalised tensor."""

    def __init__(self, num_images, img_size=96, seed=0, transform=None, index_offset=0):
        self.num_images = int(num_images)
        self.img_size = int(img_size)
        self.seed = int(seed)
        self.transform = transform or build_transform(self.img_size, train=False)
        self.index_offset = int(index_offset)
        self.classes = list(SHAPE_CLASSES)
        self._u = np.linspace(-0.5, 0.5, self.img_size, dtype=np.float32)  # (s,) pixel coordinates

    def __len__(self):
        return self.num_images

    def _rng(self, i):
        if not 0 <= i < self.num_images:
            raise IndexError(f"Shapes index {i} out of range [0, {self.num_images})")
        # A training split draws fresh images each epoch (set_epoch); str seeding hashes with
        # SHA-512: the same stream in every process, every Python run.
        index = self.index_offset + self.epoch * self.num_images + i
        return random.Random(f"shapes/{self.seed}/{index}")

    def _labels(self, rng):
        """Classes present: 1-3 drawn uniformly, then the co-occurrence rules."""
        present = rng.sample(self.classes, rng.choices((1, 2, 3), _NUM_BASE)[0])
        for a, b, p in COOCCURRENCE:  # P(B | A) = p exactly, whatever the base draw gave B
            if a in present:
                present = [c for c in present if c != b] + [b] * (rng.random() < p)
        if len(present) > 4:  # at most 4; 3 drawn + 2 by the rules: drop one the rules left alone
            present.remove(next(c for c in present if c not in _RULED))
        return present

    def _plan(self, name, rng):
        """The drawn size and angle of one instance of `name`."""
        s = self.img_size
        if name == "dot":
            d = rng.uniform(2.5, 3.5) * s / 96  # ~3 px at 96: below a 4x4 patch
        else:
            _, lo, hi = rng.choices(_SIZE_MIX, [p for p, _, _ in _SIZE_MIX])[0]
            frac = math.exp(rng.uniform(math.log(lo), math.log(hi)))  # log-uniform area
            d = min(math.sqrt(frac * s * s / _fill(name)), 0.45 * s)
        return _Plan(d, name, rng.uniform(-0.2, 0.2))

    def _place(self, plan, boxes, rng):
        """Where `plan` goes, apart from `boxes`, or None: 90 random tries, shrinking by 0.75
        after 30 and 60 of them when crowded (never the dot)."""
        s = self.img_size
        d = plan.d
        for t in range(90):
            if t in (30, 60) and plan.name != "dot":
                d *= 0.75
            m = math.ceil(d) + 2
            x = int(rng.random() * (s - m + 1))
            y = int(rng.random() * (s - m + 1))
            box = (x, y, x + m, y + m)
            if all(_apart(box, b) for b in boxes):
                return _Placement(d, box)
        return None

    def layout(self, i, rng=None):
        """Objects of image i, nothing drawn: dicts name, k, box (x0, y0, x1, y1), area (pixels),
        size (1/2/3), colour and mask."""
        if rng is None:
            rng = self._rng(i)
        names = self._labels(rng)
        if len(names) < 4 and rng.random() < 0.2:  # a second instance of some class
            names.append(names[int(rng.random() * len(names))])
        plans = [self._plan(name, rng) for name in names]
        objects = []
        for plan in sorted(plans, key=lambda p: -p.d):  # place large objects first
            placed = self._place(plan, [o["box"] for o in objects], rng)
            if placed is None:
                continue  # not drawn, so not labelled
            mask = _shape_mask(plan.name, placed.d, plan.rot)
            area = float(np.asarray(mask, np.float32).sum() / 255.0)
            hue = SHAPE_HUES[plan.name]
            if hue is None:  # the dot: near-white
                colour = _rgb(rng.random(), rng.uniform(0.0, 0.15), rng.uniform(0.93, 1.0))
            else:
                hue = (hue + rng.uniform(-0.03, 0.03)) % 1.0
                colour = _rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.7, 1.0))
            objects.append(
                dict(
                    name=plan.name,
                    k=self.classes.index(plan.name),
                    box=placed.box,
                    area=area,
                    size=size_category(area, self.img_size**2),
                    colour=colour,
                    mask=mask,
                )
            )
        return objects

    def _render(self, objects, rng):
        s = self.img_size
        seed = rng.getrandbits(64)
        noise = np.random.default_rng(seed).standard_normal((s, s, 3), dtype=np.float32)
        # background: a linear gradient between two dull colours, plus pixel noise
        c0 = np.array(_rgb(rng.random(), rng.uniform(0, 0.35), rng.uniform(0.15, 0.5)), np.float32)
        c1 = np.array(_rgb(rng.random(), rng.uniform(0, 0.35), rng.uniform(0.15, 0.5)), np.float32)
        a = rng.uniform(0, 2 * math.pi)
        u = self._u
        t = np.clip(0.5 + math.cos(a) * u[None, :] + math.sin(a) * u[:, None], 0, 1)  # (s, s)
        t = t[:, :, None]  # (s, s, 1)
        pixels = np.clip(c0 * (1 - t) + c1 * t + 8.0 * noise, 0, 255)  # (s, s, 3)
        img = Image.fromarray(pixels.astype(np.uint8))
        g = ImageDraw.Draw(img)
        for _ in range(rng.randint(3, 7)):  # clutter: thin low-contrast lines
            col = _rgb(rng.random(), rng.uniform(0, 0.3), rng.uniform(0.3, 0.65))
            start = (rng.random() * s, rng.random() * s)
            end = (rng.random() * s, rng.random() * s)
            g.line([start, end], fill=col, width=max(1, round(s / 96)))
        for _ in range(rng.randint(0, 2)):  # "suspicious dots": dim grey specks, not the class dot
            col = _rgb(0, 0, rng.uniform(0.45, 0.7))
            r = rng.uniform(1.0, 1.6) * s / 96
            x = rng.random() * s
            y = rng.random() * s
            g.ellipse([x - r, y - r, x + r, y + r], fill=col)
        for o in objects:
            img.paste(o["colour"], o["box"], o["mask"])
        return img

    def image(self, i, leave_out=()):
        """Untransformed PIL image i; with the classes in `leave_out` not drawn, the same image
        without those objects (they are pasted after every random draw: a counterfactual)."""
        rng = self._rng(i)
        objects = [o for o in self.layout(i, rng) if o["name"] not in leave_out]
        return self._render(objects, rng)

    def __getitem__(self, i):
        rng = self._rng(i)
        objects = self.layout(i, rng)
        sizes = np.zeros(len(self.classes), np.int64)
        for o in objects:
            sizes[o["k"]] = max(sizes[o["k"]], o["size"])  # the larger size wins
        image = self.transform(self._render(objects, rng), self.epoch, i)
        return image, torch.from_numpy(sizes > 0).float(), torch.from_numpy(sizes)


# ----------------------------------------------------------------------------------------------
# The entry points: train.py's two splits, and predict's images

DATASETS = ("shapes", "coco", "voc", "nuswide", "csv")


def _data_root(name, data_dir):
    if not data_dir or not os.path.isdir(data_dir):
        raise InputError(
            f"{name}: data folder {data_dir!r} not found (--data-dir); expected {LAYOUTS[name]}"
        )
    return os.fspath(data_dir)


def _usable(labels, split):
    """labels, or InputError if the split has no class or no image."""
    if not labels.classes or not labels.files:
        raise InputError(
            f"{labels.source} gives {len(labels.classes)} classes and {len(labels.files)} "
            f"{split} images on disk; a split needs at least one of each"
        )
    return labels


def _read_coco_files(name, data_dir, coco_files):
    """Your own COCO-format set: unannotated images kept."""
    if name != "coco" or data_dir:
        raise InputError("your own COCO-format set (--train-json ...) goes with --data coco alone")
    for folder in (coco_files.train_images, coco_files.val_images):
        if not os.path.isdir(folder):
            layout = LAYOUTS["coco-files"]
            raise InputError(f"coco: image folder {folder!r} not found; expected {layout}")
    train = read_coco(coco_files.train_json, coco_files.train_images, None, True, "coco-files")
    train = _usable(train, "train")
    val = read_coco(coco_files.val_json, coco_files.val_images, train, True, "coco-files")
    return Splits(train, _usable(val, "val"), train.classes)


def read_labels(name, data_dir=None, coco_files=None):
    """Splits of the Labels of dataset `name` (not shapes); classes from the training split."""
    if coco_files is not None:
        return _read_coco_files(name, data_dir, coco_files)
    root = _data_root(name, data_dir)
    if name == "nuswide":
        splits = read_nuswide(root)
        return Splits(_usable(splits.train, "train"), _usable(splits.val, "val"), splits.classes)
    if name == "coco":
        json_path = os.path.join(root, "annotations", "instances_{}2014.json")
        train = read_coco(json_path.format("train"), os.path.join(root, "train2014"))
        train = _usable(train, "train")
        val = read_coco(json_path.format("val"), os.path.join(root, "val2014"), train)
    elif name == "voc":
        train = _usable(read_voc(root, "train"), "train")
        val = read_voc(root, "val")
    else:
        train = _usable(read_csv(root, "train.csv"), "train")
        val = read_csv(root, "val.csv", train)
    return Splits(train, _usable(val, "val"), train.classes)


def _check_each_image_once(splits):
    """InputError if an image is listed twice, in one split or in both."""
    seen = {}
    for split, labels in (("train", splits.train), ("val", splits.val)):
        for file in labels.files:
            key = os.path.normpath(file)
            where = f"the {split} split ({labels.source})"
            if seen.get(key) == where:
                raise InputError(f"image {file} is listed twice in {where}; list it once")
            if key in seen:
                raise InputError(
                    f"image {file} is in both {seen[key]} and {where}; an image belongs to "
                    "one split"
                )
            seen[key] = where


def _first(labels, n):
    """The first n images of a split (n = 0: all)."""
    if not n:
        return labels
    return labels._replace(
        files=labels.files[:n], targets=labels.targets[:n], sizes=labels.sizes[:n]
    )


def load_splits(
    name, *, data_dir=None, coco_files=None, img_size, randaug, cutout, seed, num_train, num_val
):
    """Splits(train, val, classes) of dataset `name` (one of DATASETS): the training split with
    Cutout + RandAugment (randaug = (N, M), cutout a probability) drawn per (seed, epoch, index),
    the val split plain, both at img_size. num_train, num_val: the first N images (0 = all);
    for Shapes the number of images to generate (at least 1). The val images are decoded once
    here, so a bad one is found now. Everything is checked before train.py makes any folder."""
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    train_transform = build_transform(img_size, True, randaug, cutout, seed)
    val_transform = build_transform(img_size, False)
    if name == "shapes":
        if num_train < 1 or num_val < 1:
            raise InputError(
                f"shapes generates --num-train {num_train} and --num-val {num_val} images: "
                "give each at least 1 (0 does not mean all: Shapes has no end)"
            )
        train = Shapes(num_train, img_size, 0, train_transform)
        val = Shapes(num_val, img_size, 0, val_transform, SHAPES_VAL_OFFSET)
        return Splits(train, val, list(SHAPE_CLASSES))
    labels = read_labels(name, data_dir, coco_files)
    _check_each_image_once(labels)
    train = _first(labels.train, num_train)
    val = _first(labels.val, num_val)
    verify_images(val.files)
    return Splits(
        ImageFiles(train, train_transform), ImageFiles(val, val_transform), labels.classes
    )


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def list_images(paths):
    """The image files for predict, in the order given: a file as it is, a folder's JPEG and PNG
    files (.jpg, .jpeg, .png in any case, recursively) sorted. InputError if that is none."""
    files = []
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            found = []
            for folder, _, names in os.walk(path):
                found += [
                    os.path.join(folder, n) for n in names if n.lower().endswith(IMAGE_SUFFIXES)
                ]
            files += sorted(found)
        else:
            files.append(path)  # PredictImages names it if it is missing or not an image
    if not files:
        raise InputError(f"no JPEG or PNG images in {', '.join(map(os.fspath, paths))}")
    return files


class PredictImages(Dataset):
    """The images `files` for predict at img_size: item (image (3, S, S), error), error "" or one
    line naming the file (its image zeros then), so one bad file stops nothing."""

    def __init__(self, files, img_size):
        self.files = np.array(files)  # numpy strings: forked workers share them
        self.transform = build_transform(img_size, train=False)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        size = self.transform.img_size
        try:
            img = load_image(str(self.files[i]), draft_size=size)
        except InputError as e:
            return torch.zeros(3, size, size), str(e)
        return self.transform(img), ""
