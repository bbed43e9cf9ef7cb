"""Train, evaluate and run MITr (Section 4.1 of the paper) on one CPU, one GPU or many.

    python train.py                           # the embedded default: MITr-tiny on Shapes, CPU
    python train.py --data coco --data-dir /data/coco --variant s --init swin_tiny.pth
    python train.py --data csv --data-dir my_set      # my_set/train.csv and my_set/val.csv
    torchrun --nproc_per_node=8 train.py --data coco --data-dir /data/coco --variant s ...
    python train.py --resume runs/RUN/last.pt         # continue a run, in a new folder
    python train.py --resume runs/RUN/best.pt --eval-only     # its metrics table
    python train.py predict --checkpoint runs/RUN/best.pt cat.jpg photos/

The recipe is TrainConfig's defaults: Section 4.1 and, where it points to "our open source code",
the ASL code it follows: Adam, a one-cycle lr peaking at 1e-4, weight decay 1e-4 on weights only,
Eq. 18's loss summed over the batch, Cutout + RandAugment, an EMA of the weights (validation reports
the better). SHAPES overrides it for the embedded CPU demo.

What a run promises:
- Nothing is lost. Every run, a resumed one too, claims a NEW folder (an exclusive os.mkdir), so two
  runs never share one and a resume never overwrites a newer checkpoint. Each epoch writes best.pt
  (when it is the best) and then last.pt, each to a temporary file of its own renamed into place: a
  kill leaves the previous good pair, and last.pt never records a best mAP that best.pt lacks. A run
  writes only inside its own folder and removes nothing but its own temporary files.
- Nothing silently wrong. A non-finite loss, or non-finite validation scores, stop the run with one
  line, keeping the last good pair. After a stop the line says what is on disk (last.pt, else
  best.pt) and gives the command that continues it, with every flag the resume needs.
- Resume is exact at epoch boundaries. On CPU 2 epochs equal 1 epoch plus a resumed 1, bit for bit,
  with any --workers (augmentation draws from (seed, epoch, image)). A run stopped inside an epoch
  resumes from its last finished one. A resumed run keeps its checkpoint's settings: only
  RESUME_FLAGS (where and how it runs) may differ, not --epochs (the one-cycle spans them all).
- Bad input gets one line. A wrong path, a malformed annotation, a corrupt image (in a DataLoader
  worker too), an out-of-range flag, an unwritable --out, a checkpoint whose contents do not fit:
  one line on stderr naming the thing and what to do, exit code 2, before the run folder is made
  wherever it can be known then. Under torchrun the failing process says it, with its rank. Ctrl-C:
  one line, exit 130.
"""

import argparse
import contextlib
import copy
import csv
import dataclasses
import datetime
import json
import math
import os
import secrets
import shlex
import signal
import sys
import threading
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

import data
import metrics
import mitr
from data import InputError
from losses import mitr_loss

# --- Settings: Section 4.1's recipe (TrainConfig), the Shapes demo (SHAPES), the command line


@dataclasses.dataclass
class TrainConfig:
    """A run's settings, one flag each; the defaults are Section 4.1's recipe."""

    # Data
    data: str = "shapes"  # not in the paper: the built-in set, so that `python train.py` runs
    data_dir: str | None = None  # not in the paper: where the dataset lies
    train_json: str | None = None  # not in the paper: your own COCO-format set, with the next 3
    train_images: str | None = None  # not in the paper
    val_json: str | None = None  # not in the paper
    val_images: str | None = None  # not in the paper
    num_train: int = 0  # not in the paper: 0 = every image
    num_val: int = 0  # not in the paper: 0 = every image
    img_size: int = 0  # Table 2: 0 = the variant's, 224 (s) or 384 (m, l)
    # Section 4.1: RandAugment; N = 2 ops at magnitude M = 9 are ASL's code's
    randaug: list[int] = dataclasses.field(default_factory=lambda: [2, 9])
    cutout: float = 0.5  # Section 4.1; the probability is ASL's code's
    # Model: Table 1's variant, Table 5's switches
    variant: str = "s"  # Table 2: MITr-s
    init: str | None = None  # Section 4.1: ImageNet-pretrained, here Swin's weights (Interpr. 19)
    init_nonstrict: bool = False  # not in the paper
    pos_embed: bool = True  # Table 5
    shift: bool = True  # Table 5
    cross_window: bool = True  # Table 5
    cross_window_attention: bool = True  # not in the paper: a capacity control (Interpretation 31)
    arc_sigmoid: bool = True  # Table 5
    object_token: bool = True  # Table 5
    arc_scale: float = 8.0  # Section 4.1: s = 8
    # Loss: Eqs. 14-18
    gamma_pos: float = 0.0  # Section 4.1: gamma+ = 0
    gamma_neg: float = 4.0  # Section 4.1: gamma- = 4
    clip: float = 0.05  # Section 4.1: m = 0.05
    # Optimisation
    epochs: int = 200  # Section 4.1: "after 200 epochs"
    batch_size: int = 128  # ASL's code (the paper gives none)
    accum_steps: int = 1  # not in the paper: micro-batches per optimizer step, for memory
    lr: float = 1e-4  # Section 4.1: 1e-4, here the one-cycle peak (Interpretation 21)
    weight_decay: float = 1e-4  # ASL's code (Interpretation 22)
    ema_decay: float = 0.9997  # ASL's code (Interpretation 22)
    seed: int = 0  # not in the paper
    # Where and how it runs
    device: str = "auto"  # not in the paper
    workers: int = 8  # ASL's code
    amp: str = "auto"  # ASL's code: fp16 autocast; here bf16 on CUDA (Interpretation 22)
    compile: bool = False  # not in the paper
    grad_checkpoint: bool = False  # not in the paper: less memory, for m and l on one GPU
    # Evaluation and output
    threshold: float = 0.5  # Section 4.1: "a threshold (e.g. 0.5)"
    decode: str = "threshold"  # not in the paper: predict's labels (Interpretation 29)
    out: str | None = None  # not in the paper
    resume: str | None = None  # not in the paper
    eval_only: bool = False  # not in the paper


# The embedded default, not from the paper: MITr-tiny from scratch in ~8 minutes of a 2-core CPU.
SHAPES = dict(
    variant="tiny",  # a CPU-sized model (mitr.VARIANTS)
    num_train=12800,  # fresh images every epoch (Shapes.set_epoch): 200 steps of 64 per epoch
    num_val=1000,
    epochs=3,  # 600 steps (442-473 s, 76.9 mAP); 702 steps (3 x 234) scored no better in a trial
    batch_size=64,  # batch 32 learned less per image (74.2 after 32,000 images)
    lr=1e-3,  # no pretraining; 2e-3 collapsed (the loss rose from step 280)
    ema_decay=0.99,  # ~100 steps: 0.9997 averages over ~3300 steps, more than the whole run
    randaug=[0, 0],  # no RandAugment or Cutout: fresh images need little regularising,
    cutout=0.0,  # and with them an earlier 10k-image run scored 22 against 44 mAP
    workers=0,  # an image costs ~1.7 ms to draw, ~400 ms a step to train: a worker competes
)

# A resumed run may change where and how it runs, not what (not --epochs: the one-cycle spans them
# all). The data's paths are not kept: a resume names them again.
DATA_PATHS = ("data_dir", "train_json", "train_images", "val_json", "val_images")
RESUME_FLAGS = (
    *DATA_PATHS,
    *("workers", "device", "amp", "compile", "grad_checkpoint", "accum_steps"),
    *("threshold", "decode", "out", "eval_only", "resume"),
)
CHOICES = dict(
    data=data.DATASETS,
    variant=tuple(sorted(mitr.VARIANTS)),
    device=("auto", "cuda", "cpu"),
    amp=("auto", "bf16", "fp16", "off"),
    decode=("threshold", "count"),
)
# Bounds on what can work: beyond them a run overflows, spawns processes without end or hangs.
MAX_EPOCHS = 100_000
MAX_BATCH = 65_536
MAX_IMAGES = 10**9
MAX_WORKERS = 256
MAX_IMG_SIZE = 1024
MAX_RANDAUG_OPS = 16  # RandAugment applies N of its 14 ops per image; ASL's N is 2


def flag(name):
    return "--" + name.replace("_", "-")


HELP = dict(
    data="dataset; shapes is generated on the fly; csv: ROOT/train.csv and ROOT/val.csv",
    data_dir="dataset root (README, 'Datasets', gives each layout); not for shapes",
    train_json="your own COCO-format set: the training json (with the next three flags)",
    train_images="the folder the training json's file_names start from",
    val_json="your own COCO-format set: the validation json",
    val_images="the folder the validation json's file_names start from",
    num_train="shapes: images to generate (at least 1); others: use the first N (0 = all)",
    num_val="validation images, as --num-train",
    img_size="input side; 0 = the variant's",
    randaug="RandAugment: N ops at magnitude M of 30",
    cutout="Cutout probability per image",
    variant="MITr variant (Table 1)",
    init="start from Swin weights (official or timm .pth), via mitr.load_swin",
    init_nonstrict="with --init: load what fits and list the rest, instead of stopping",
    pos_embed="Table 5: relative position bias (--no-pos-embed: none)",
    shift="Table 5: shifted windows (--no-shift: none)",
    cross_window="Table 5: cross-window blocks, Eq. 3-4 (--no-cross-window: none)",
    cross_window_attention="--no-cross-window-attention: the cross-window blocks keep their MLP "
    "but not their attention (a capacity control)",
    arc_sigmoid="Table 5: the arc sigmoid head, Eq. 13 (--no-arc-sigmoid: linear, Eq. 11)",
    object_token="Table 5: the object-aware token and its loss, Eq. 17 (--no-object-token: none)",
    arc_scale="s of the arc sigmoid (Eq. 13)",
    gamma_pos="ASL gamma+ (Eq. 15)",
    gamma_neg="ASL gamma- (Eq. 16)",
    clip="ASL probability margin m (Eq. 16)",
    epochs="epochs",
    batch_size="GLOBAL batch, split over the processes and --accum-steps",
    accum_steps="micro-batches per optimizer step, the global batch unchanged (less memory)",
    lr="peak lr of the one-cycle schedule",
    weight_decay="Adam (L2) decay on weights; not norms, biases, bias tables, tokens",
    ema_decay="EMA decay per step (0 = no EMA)",
    seed="seed of weights, shuffling, augmentation",
    device="auto = cuda if available, else cpu",
    workers="DataLoader workers per process",
    amp="autocast: auto = bf16 on CUDA, off on CPU (bf16 works there too); fp16 adds a GradScaler",
    compile="torch.compile for training",
    grad_checkpoint="recompute each unit in backward (torch.utils.checkpoint): less memory",
    threshold="probability from which a label counts as predicted (the paper's CP ... OF1)",
    decode="predict's labels: threshold (the thresholds chosen on val) or count (the count "
    "head's top z)",
    out="run folder, must not exist yet (default runs/<data>-<variant>-<time>-<pid>)",
    resume="continue a last.pt/best.pt from the end of its epoch, in a new folder, with its "
    "settings; only " + ", ".join(flag(k) for k in RESUME_FLAGS[:-2]) + " may change",
    eval_only="evaluate the --resume checkpoint (or --init weights); writes nothing",
)
DESCRIPTION = (
    "Train / evaluate MITr (Cheng et al., 2021). Defaults: Section 4.1 for --data "
    "coco|voc|nuswide|csv, a ~8-minute CPU demo for --data shapes. Inference: `python train.py "
    "predict --help`. Many processes: `torchrun --nproc_per_node=N train.py ...`."
)


def parser(prog, description):
    """An ArgumentParser whose errors are one InputError line pointing at this command's --help."""
    ap = argparse.ArgumentParser(prog=prog, description=description)

    def error(message):
        raise InputError(f"{message} (see python {prog} --help)")

    ap.error = error
    return ap


def train_parser():
    """train.py's command line, a flag per TrainConfig field (a bool gives --X and --no-X). No
    defaults are set (SUPPRESS): parse_args sees only what was typed."""
    ap = parser("train.py", DESCRIPTION)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        default = getattr(defaults, f.name)
        text = HELP[f.name]
        if f.name in SHAPES:
            text += f" (default {SHAPES[f.name]} for shapes, {default} otherwise)"
        elif default is not None and f.type is not bool:
            text += f" (default {default})"
        kind = dict(dest=f.name, default=argparse.SUPPRESS, help=text)
        if f.type is bool:
            kind["action"] = argparse.BooleanOptionalAction
        elif f.type == list[int]:
            kind.update(type=int, nargs=2, metavar=("N", "M"))
        elif f.type == str | None:
            kind["type"] = str
        else:
            kind.update(type=f.type, choices=CHOICES.get(f.name))
        ap.add_argument(flag(f.name), **kind)
    return ap


def out_of_range(name, value, interval):
    return InputError(f"{flag(name)} {value} must be in {interval}")


def check_config(cfg):
    """Every rule a run's settings follow, for the command line and for a checkpoint's saved
    settings alike: one InputError line each."""
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            value = getattr(cfg, name)
            raise InputError(f"{flag(name)} {value!r}: choose one of {', '.join(choices)}")
    if not 1 <= cfg.epochs <= MAX_EPOCHS:
        raise out_of_range("epochs", cfg.epochs, f"[1, {MAX_EPOCHS}]")
    if not 1 <= cfg.batch_size <= MAX_BATCH:
        raise out_of_range("batch_size", cfg.batch_size, f"[1, {MAX_BATCH}]")
    if not 1 <= cfg.accum_steps <= cfg.batch_size:
        raise out_of_range("accum_steps", cfg.accum_steps, "[1, --batch-size]")
    if not 0 <= cfg.num_train <= MAX_IMAGES:
        raise out_of_range("num_train", cfg.num_train, f"[0, {MAX_IMAGES}]")
    if not 0 <= cfg.num_val <= MAX_IMAGES:
        raise out_of_range("num_val", cfg.num_val, f"[0, {MAX_IMAGES}]")
    if not 0 <= cfg.workers <= MAX_WORKERS:
        raise out_of_range("workers", cfg.workers, f"[0, {MAX_WORKERS}]")
    if not 0 <= cfg.seed < 2**32:
        raise out_of_range("seed", cfg.seed, "[0, 4294967296)")
    if not 0 < cfg.lr <= 1:
        raise out_of_range("lr", cfg.lr, "(0, 1]")
    if not 0 <= cfg.weight_decay <= 1:
        raise out_of_range("weight_decay", cfg.weight_decay, "[0, 1]")
    if not 0 <= cfg.ema_decay < 1:
        raise out_of_range("ema_decay", cfg.ema_decay, "[0, 1)")
    if not 0 <= cfg.gamma_pos < math.inf:
        raise out_of_range("gamma_pos", cfg.gamma_pos, "[0, inf)")
    if not 0 <= cfg.gamma_neg < math.inf:
        raise out_of_range("gamma_neg", cfg.gamma_neg, "[0, inf)")
    if not 0 <= cfg.clip < 1:
        raise out_of_range("clip", cfg.clip, "[0, 1)")
    if not 0 < cfg.arc_scale < math.inf:
        raise out_of_range("arc_scale", cfg.arc_scale, "(0, inf)")
    if not 0 < cfg.threshold < 1:
        raise out_of_range("threshold", cfg.threshold, "(0, 1)")
    if not 0 <= cfg.cutout <= 1:
        raise out_of_range("cutout", cfg.cutout, "[0, 1]")
    if not (0 <= cfg.randaug[0] <= MAX_RANDAUG_OPS and 0 <= cfg.randaug[1] <= 30):
        raise out_of_range("randaug", cfg.randaug, f"[0, {MAX_RANDAUG_OPS}] and [0, 30]")
    base = mitr.VARIANTS[cfg.variant]
    if not (1 <= cfg.img_size <= MAX_IMG_SIZE and mitr.valid_image_size(base, cfg.img_size)):
        fits = [s for s in range(32, MAX_IMG_SIZE + 1, 32) if mitr.valid_image_size(base, s)]
        raise InputError(
            f"--img-size {cfg.img_size} does not fit MITr-{cfg.variant}'s windows; sides that do: "
            f"{', '.join(map(str, fits[:4]))}, ... up to {fits[-1]}"
        )
    if cfg.eval_only and not (cfg.resume or cfg.init):
        raise InputError(
            "--eval-only needs a model to evaluate: --resume CHECKPOINT or --init WEIGHTS"
        )
    own_coco = [getattr(cfg, k) is not None for k in DATA_PATHS[1:]]
    if any(own_coco) and not all(own_coco):
        raise InputError("--train-json, --train-images, --val-json and --val-images go together")
    if cfg.decode == "count" and not cfg.object_token:
        raise InputError(
            "--decode count reads the object token's count head: drop --no-object-token"
        )


def as_typed(name, value):
    """A setting as it is written on the command line: --lr 0.001, --randaug 2 9, --no-shift."""
    if value is True or value is False:
        return flag(name) if value else "--no-" + name.replace("_", "-")
    if isinstance(value, list):
        return f"{flag(name)} {' '.join(map(str, value))}"
    return f"{flag(name)} {value}"


def parse_args(argv):
    """-> (the run's TrainConfig, its --resume checkpoint or None). What was typed wins over the
    checkpoint's settings (only RESUME_FLAGS may differ), over SHAPES, over the defaults."""
    given = vars(train_parser().parse_args(argv))
    ck = None
    saved = {}
    if "resume" in given:
        ck = load_checkpoint(given["resume"])
        saved = {k: v for k, v in ck["args"].items() if k not in RESUME_FLAGS}
    for name in sorted(given.keys() & saved.keys()):
        if given[name] != saved[name]:
            raise InputError(
                f"{as_typed(name, given[name])} differs from checkpoint {given['resume']} "
                f"({as_typed(name, saved[name])}): a resumed run keeps its settings; drop "
                f"{flag(name)}, or start a new run (--init for Swin)"
            )
    preset = SHAPES if saved.get("data", given.get("data", TrainConfig.data)) == "shapes" else {}
    cfg = TrainConfig(**{**preset, **saved, **given})
    if cfg.img_size == 0:
        cfg.img_size = mitr.VARIANTS[cfg.variant].img_size  # Table 2's resolution
    check_config(cfg)
    if cfg.init:  # now, not after the data is read
        data.check_regular_file(cfg.init, "--init")
    if ck is not None and ck["epoch"] == cfg.epochs and not cfg.eval_only:
        raise InputError(
            f"checkpoint {cfg.resume} has finished its {cfg.epochs} epochs: nothing to train; "
            "evaluate it with --eval-only, or start a new run (--init for Swin)"
        )
    return cfg, ck


# --- The recipe: the model of a run, Adam's groups, the one-cycle schedule, the EMA, Eq. 18's sum


def model_config(cfg):
    """Table 1's variant with the run's resolution, Table 5's switches and the memory option."""
    return dataclasses.replace(
        mitr.VARIANTS[cfg.variant],
        img_size=cfg.img_size,
        arc_scale=cfg.arc_scale,
        pos_embed=cfg.pos_embed,
        shift=cfg.shift,
        cross_window=cfg.cross_window,
        cross_window_attention=cfg.cross_window_attention,
        arc_sigmoid=cfg.arc_sigmoid,
        object_token=cfg.object_token,
        grad_checkpoint=cfg.grad_checkpoint,
    )


def build_model(cfg, num_classes):
    """The run's MITr; its initial weights are drawn from cfg.seed (the same on every process)."""
    return mitr.MITr(model_config(cfg), num_classes, seed=cfg.seed)


def param_groups(model, weight_decay):
    """Adam groups. Paper: silent on weight decay. Here: ASL's 1e-4 as Adam's (L2) decay, on
    weights only: not norms or biases (ASL; all 1-D), nor bias tables and the token (Swin's)."""
    decay = []
    no_decay = []
    for name, p in model.named_parameters():
        if p.ndim <= 1 or "relative_position_bias_table" in name or name == "object_token":
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class Schedule(NamedTuple):
    lr: float
    beta1: float  # Adam's


def cosine(start, end, t):
    """From start (t = 0) to end (t = 1) along half a cosine."""
    return end + (start - end) * (1 + math.cos(math.pi * t)) / 2


def one_cycle(step, total, peak, pct=0.2):
    """The Schedule at step `step` (0-based) of `total`: lr from peak/25 up to peak at step
    pct*total - 1, then down to peak/25/1e4 at the last; beta1 0.95 -> 0.85 -> 0.95. Paper:
    "one-circle [41] learning rate scheduler as tresnet". Here: torch's OneCycleLR as ASL calls it,
    written out (OneCycleLR fails at 5 steps)."""
    up = pct * total - 1  # the warm-up's last step
    if 0 < up and step <= up:
        return Schedule(cosine(peak / 25, peak, step / up), cosine(0.95, 0.85, step / up))
    t = (step - up) / (total - 1 - up)
    return Schedule(cosine(peak, peak / 25 / 1e4, t), cosine(0.85, 0.95, t))


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema = decay * ema + (1 - decay) * model, after every step. Paper: no EMA. Here: ASL's."""
    for e, m in zip(ema.state_dict().values(), model.state_dict().values(), strict=True):
        if e.dtype.is_floating_point:
            e.lerp_(m, 1.0 - decay)
        else:
            e.copy_(m)


def autocast(device, dtype):
    """The forward's autocast context: dtype bfloat16 or float16, or None for float32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


class Losses(NamedTuple):
    """A step's Eq. (18) and its two parts, means over the global batch (what is logged)."""

    loss: float
    asl: float
    otl: float


def accumulate_gradients(net, scaler, micro_batches, cfg, device, dtype):
    """Backpropagate Eq. (18) over one global batch, given as micro-batches -> its mean Losses.

    Paper: L_i per image, the batch reduction unstated. Here: the objective is the SUM over the
    global batch, as ASL's code; its mean would make Adam's coupled L2 decay B times stronger
    against the data term (Interpretation 14). The mean is logged.
    """
    total = torch.zeros(3, device=device)
    for i, (images, targets) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = net.no_sync() if isinstance(net, DDP) and not last else contextlib.nullcontext()
        with sync:
            with autocast(device, dtype):
                class_logits, count_logits = net(images.to(device, non_blocking=True))
            loss, parts = mitr_loss(
                class_logits,
                count_logits,
                targets.to(device),
                cfg.gamma_pos,
                cfg.gamma_neg,
                cfg.clip,
            )  # Eq. (18), the mean over this micro-batch of b = B / (processes x accum_steps)
            # Its mean times B / accum_steps is (processes x its sum); DDP averages the gradient
            # over the processes and the micro-batches add up: the sum over the B images.
            scaler.scale(loss * (cfg.batch_size / cfg.accum_steps)).backward()
        total += torch.stack([loss.detach(), parts["asl"], parts["otl"]])
    mean = total / len(micro_batches)
    if dist.is_initialized():  # every process sees the same: all stop together
        dist.all_reduce(mean)
        mean /= dist.get_world_size()
    return Losses(*mean.tolist())


def decode_labels(class_logits, count_logits, how, thresholds):
    """Predicted labels, bool (N, K), from the heads' logits (N, K) and (N, K + 1) (or None).
    threshold: each class whose probability reaches `thresholds` (one, or (K,) per class).
    count: the z classes of highest logit, z the count head's argmax (Eq. 17; Interpretation 29)."""
    if how == "count":
        z = count_logits.argmax(-1)  # (N,)
        order = torch.argsort(class_logits, dim=-1, descending=True, stable=True)  # (N, K)
        rank = order.argsort(-1)  # (N, K): 0 for the highest logit
        return rank < z[:, None]
    cut = torch.as_tensor(metrics.logit(thresholds), device=class_logits.device)  # () or (K,)
    return class_logits.double() >= cut


# --- Training and validation


def epoch_seed(seed, epoch, rank):
    """The seed of stochastic depth in one epoch on one process (shuffling and augmentation draw
    from (seed, epoch) and (seed, epoch, image) themselves)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def global_batches(loader, accum_steps):
    """The loader's micro-batches in groups of accum_steps, one optimizer step each (a last
    incomplete group is dropped: every step sees the whole global batch)."""
    group = []
    for images, targets, _ in loader:
        group.append((images, targets))
        if len(group) == accum_steps:
            yield group
            group = []


class Progress:
    """Counts the run's optimizer steps and prints a progress line after its first step (so one
    shows within seconds of the start), every fifth of an epoch and at the epoch's end."""

    def __init__(self, cfg, step, steps_per_epoch):
        self.cfg = cfg
        self.step = step  # optimizer steps done, over the whole run
        self.first_step = step  # a resumed run starts at its checkpoint's
        self.per_epoch = steps_per_epoch
        self.total = cfg.epochs * steps_per_epoch
        self.every = max(1, steps_per_epoch // 5)
        self.run_start = time.time()

    def start_epoch(self):
        self.epoch_start = time.time()
        self.epoch_losses = []
        self.recent = []

    def step_done(self, losses, lr, epoch):
        self.step += 1
        self.epoch_losses.append(losses)
        self.recent.append(losses)
        in_epoch = self.step - epoch * self.per_epoch
        first = self.step == self.first_step + 1
        if first or in_epoch % self.every == 0 or in_epoch == self.per_epoch:
            self.show(lr, epoch, in_epoch)

    def show(self, lr, epoch, in_epoch):
        now = time.time()
        loss, asl, otl = np.mean(self.recent, axis=0)
        self.recent = []
        eta = (now - self.run_start) / (self.step - self.first_step) * (self.total - self.step)
        rate = in_epoch * self.cfg.batch_size / (now - self.epoch_start)
        log(
            f"epoch {epoch + 1}/{self.cfg.epochs} step {self.step}/{self.total} | loss {loss:.4f} "
            f"(asl {asl:.3f} otl {otl:.3f}) | lr {lr:.2e} | {rate:.0f} img/s | ETA "
            f"{datetime.timedelta(seconds=round(eta))}"  # validations included
        )

    def epoch_stats(self):
        images = self.per_epoch * self.cfg.batch_size
        return {
            "train_loss": float(np.mean([s.loss for s in self.epoch_losses])),
            "train_img_per_s": images / (time.time() - self.epoch_start),
        }


def nonfinite(what, step, epoch, cfg):
    """The line that stops a run whose numbers are no longer finite."""
    return InputError(
        f"{what} at step {step} (epoch {epoch + 1}); lower --lr (now {cfg.lr:g}) or use --amp off"
    )


def train_epoch(net, model, ema, optimizer, scaler, loader, cfg, epoch, progress, rt):
    """One pass over the training data, an optimizer step per global batch -> the epoch's stats."""
    # Randomness is a function of (seed, epoch): shuffling, augmentation, stochastic depth
    loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
    torch.manual_seed(epoch_seed(cfg.seed, epoch, rt.rank))
    progress.start_epoch()
    net.train()
    for micro_batches in global_batches(loader, cfg.accum_steps):
        schedule = one_cycle(progress.step, progress.total, cfg.lr)
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr
            group["betas"] = (schedule.beta1, group["betas"][1])
        optimizer.zero_grad(set_to_none=True)
        losses = accumulate_gradients(net, scaler, micro_batches, cfg, rt.device, rt.dtype)
        if not math.isfinite(losses.loss):
            raise nonfinite(f"the loss is {losses.loss}", progress.step + 1, epoch, cfg)
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema_update(ema, model, cfg.ema_decay)
        progress.step_done(losses, schedule.lr, epoch)
    return {"lr": schedule.lr, **progress.epoch_stats()}


class Scores(NamedTuple):
    """A model's outputs on the val set, row i for image i."""

    class_logits: torch.Tensor  # (N, K) float32
    count_logits: torch.Tensor | None  # (N, K + 1); None without the object-aware token
    targets: torch.Tensor  # (N, K): 1 present, 0 absent, -1 ignored
    sizes: torch.Tensor  # (N, K): 0 unknown, 1 small, 2 medium, 3 large


def concat(rows, order=None):
    """One Scores from a list of them, each column concatenated (and reordered by `order`)."""
    columns = []
    for parts in zip(*rows, strict=True):
        column = None if parts[0] is None else torch.cat(parts)
        if column is not None and order is not None:
            column = column[order]
        columns.append(column)
    return Scores(*columns)


@torch.no_grad()
def score(model, loader, rt):
    """The model's Scores on this process's share of the val set (the loader's sampler)."""
    model.eval()
    rows = []
    for images, targets, sizes in loader:
        with autocast(rt.device, rt.dtype):
            class_logits, count_logits = model(images.to(rt.device, non_blocking=True))
        counts = None if count_logits is None else count_logits.float().cpu()
        rows.append(Scores(class_logits.float().cpu(), counts, targets, sizes))
    return concat(rows)


def evaluate(scores, threshold):
    """The paper's metrics on logits (Interpretation 27), Table 7's AP_s/m/l where the data has
    sizes, and how often the count head's argmax (Eq. 17's z) is the true number of labels."""
    has_sizes = bool((scores.sizes > 0).any())
    sizes = scores.sizes if has_sizes else None
    report = metrics.multilabel_report(scores.class_logits, scores.targets, threshold, sizes=sizes)
    if scores.count_logits is not None:
        true_counts = (scores.targets == 1).sum(1)
        right = scores.count_logits.argmax(-1) == true_counts
        report["count_acc"] = 100.0 * float(right.float().mean())
    return report


DECODINGS = {  # how labels are chosen -> the row's name in the table
    "threshold": "p >= {t:g} (Section 4.1)",
    "overall": "p >= {overall:.3f} (one threshold, chosen)",
    "per_class": "p >= per-class thresholds (chosen)",
    "count": "top z, z from the count head (Eq. 17)",
}


def decodings(scores, thresholds, threshold):
    """label_report (CP ... OF1) of each way to choose labels: the paper's threshold, the one and
    the per-class thresholds chosen on these scores (Interpretation 28), and the top-z labels."""
    chosen = {
        "threshold": decode_labels(scores.class_logits, None, "threshold", threshold),
        "overall": decode_labels(scores.class_logits, None, "threshold", thresholds.overall),
        "per_class": decode_labels(scores.class_logits, None, "threshold", thresholds.per_class),
    }
    if scores.count_logits is not None:
        chosen["count"] = decode_labels(scores.class_logits, scores.count_logits, "count", None)
    return {k: metrics.label_report(labels, scores.targets) for k, labels in chosen.items()}


def format_decodings(rows, title, threshold, thresholds):
    """The decodings as a table, one row each, CP ... OF1 side by side."""
    keys = ("CP", "CR", "CF1", "OP", "OR", "OF1")
    lines = [f"{title:<48}" + "".join(f"{k:>7}" for k in keys)]
    for name, report in rows.items():
        label = DECODINGS[name].format(t=threshold, overall=thresholds.overall)
        lines.append(f"  {label:<46}" + "".join(f"{report[k]:7.2f}" for k in keys))
    return "\n".join(lines)


class Validation(NamedTuple):
    """One validation: each model's report, the better one and its scores and thresholds."""

    reports: dict  # {"model": report, "ema": report}
    best_of: str  # the better by mAP, as ASL's code reports
    scores: Scores  # the better's
    thresholds: metrics.Thresholds  # chosen on the better's scores (Interpretation 28)

    @property
    def mAP(self):
        return self.reports[self.best_of]["mAP"]


def validate(models, loader, cfg, rt, title, step, epoch):
    """Score every model on the whole val set (gathered from every process), choose thresholds for
    the better one, print the table -> Validation."""
    reports = {}
    all_scores = {}
    for name, model in models.items():
        scores = gather(score(model, loader, rt), loader.sampler)
        finite = torch.isfinite(scores.class_logits).all()
        if scores.count_logits is not None:
            finite = finite and torch.isfinite(scores.count_logits).all()
        if not finite:
            raise nonfinite(f"the {name}'s validation scores are not finite", step, epoch, cfg)
        reports[name] = evaluate(scores, cfg.threshold)
        all_scores[name] = scores
    best_of = "model"
    if "ema" in reports and reports["ema"]["mAP"] > reports["model"]["mAP"]:
        best_of = "ema"
    best = all_scores[best_of]
    thresholds = metrics.choose_thresholds(best.class_logits, best.targets)
    rows = decodings(best, thresholds, cfg.threshold)
    reports[best_of]["decodings"] = rows
    log("\n".join(f"{title} {k:>5}: {metrics.format_report(v)}" for k, v in reports.items()))
    heading = f"{title} labels, {best_of} (chosen on these images: optimistic)"
    log(format_decodings(rows, heading, cfg.threshold, thresholds))
    return Validation(reports, best_of, best, thresholds)


def format_class_ap(ap, classes):
    """Per-class AP as 'name 91.2' pairs, in class order, lines of at most 100 characters."""
    lines = [""]
    for name, value in zip(classes, ap, strict=True):
        pair = f"   {name} {value:.1f}"
        if len(lines[-1]) + len(pair) > 100:
            lines.append("")
        lines[-1] += pair
    return "\n".join(lines)


def train(argv):
    """A run (see the module docstring): build everything, then per epoch train, validate, save."""
    cfg, ck = parse_args(argv)
    rt = start_processes(cfg)
    splits = load_data(cfg, ck)
    models = build_models(cfg, ck, len(splits.classes), rt.device)
    model = models["model"]
    ema = models.get("ema")
    val_loader = make_val_loader(splits, cfg, rt)
    if cfg.eval_only:  # print the table, write nothing
        epoch = 0 if ck is None else ck["epoch"]
        step = 0 if ck is None else ck["step"]
        title = f"eval ({len(val_loader.dataset)} images)"
        return validate(models, val_loader, cfg, rt, title, step, epoch - 1).reports
    optimizer = torch.optim.Adam(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    if ck is not None:
        restore_optimizer(optimizer, scaler, ck)
    train_loader = make_train_loader(splits, cfg, rt)
    steps_per_epoch = len(train_loader) // cfg.accum_steps
    check_steps(steps_per_epoch, ck, cfg, len(splits.train))
    net = model
    if rt.world > 1:
        net = DDP(model, device_ids=[rt.device] if rt.device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    start_epoch = 0 if ck is None else ck["epoch"]
    progress = Progress(cfg, start_epoch * steps_per_epoch, steps_per_epoch)
    out = start_run(cfg, rt, splits, progress, ck)
    best = None  # this run's best epoch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            stats = train_epoch(
                net, model, ema, optimizer, scaler, train_loader, cfg, epoch, progress, rt
            )
            title = f"epoch {epoch + 1} val"
            val = validate(models, val_loader, cfg, rt, title, progress.step, epoch)
            if best is None or val.mAP > best.val.mAP:
                best = BestEpoch(epoch + 1, val)
            if out:
                append_jsonl(out, epoch_record(epoch, progress.step, stats, val))
                state = checkpoint_state(
                    cfg, splits.classes, models, optimizer, scaler, epoch, progress.step, best, val
                )
                if best.epoch == epoch + 1:  # best.pt first: last.pt never holds a better mAP
                    save_checkpoint(state, os.path.join(out, "best.pt"))
                save_checkpoint(state, os.path.join(out, "last.pt"))
    except (InputError, KeyboardInterrupt, RuntimeError) as e:
        raise stopped(e, out, cfg) from None
    finish(out, cfg, splits, best, progress.step)
    return best.val.mAP


# --- Plumbing: processes, data loaders, the run folder, checkpoints and their checks, DDP gather


def log(*args, **kwargs):
    """print, on the first process only: rank 0 speaks for the job."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)


class Runtime(NamedTuple):
    """Where this process runs: torchrun's rank and world size, its device, the autocast dtype."""

    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype | None  # None: float32


def start_processes(cfg):
    """This process's Runtime; joins the process group when torchrun started several."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if cfg.batch_size % (world * cfg.accum_steps):
        raise InputError(
            f"--batch-size {cfg.batch_size} is the global batch: make it divisible by {world} "
            f"process(es) x --accum-steps {cfg.accum_steps}"
        )
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if (cfg.device == "cuda" or cfg.amp == "fp16") and not cuda:
        raise InputError(
            f"--device {cfg.device} --amp {cfg.amp}: no CUDA device (none visible to PyTorch, "
            "or --device cpu); use --device cpu with --amp bf16 or off"
        )
    device = torch.device("cpu")
    if cuda:
        device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        if not cuda and "OMP_NUM_THREADS" not in os.environ:  # the processes share the cores
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
    # Paper: silent on precision. Here: bf16 autocast on CUDA (ASL: fp16; bf16 needs no scaling).
    amp = cfg.amp
    if amp == "auto":
        amp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "off"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    return Runtime(rank, world, device, dtype)


def coco_files(cfg):
    """Your own COCO-format set's files, or None."""
    if cfg.train_json is None:
        return None
    return data.CocoFiles(cfg.train_json, cfg.train_images, cfg.val_json, cfg.val_images)


def load_data(cfg, ck):
    """The run's Splits (every annotation and val image checked, before any folder is made); a
    resumed run's classes must be its checkpoint's."""
    splits = data.load_splits(
        cfg.data,
        data_dir=cfg.data_dir,
        coco_files=coco_files(cfg),
        img_size=cfg.img_size,
        randaug=cfg.randaug,
        cutout=cfg.cutout,
        seed=cfg.seed,
        num_train=cfg.num_train,
        num_val=cfg.num_val,
    )
    if ck is not None:
        check_same_classes(ck["classes"], splits.classes, cfg.resume)
    return splits


def build_models(cfg, ck, num_classes, device):
    """{"model": the run's MITr, "ema": its EMA (when there is one)}, with the checkpoint's weights,
    Swin's (--init) or the seed's."""
    model = build_model(cfg, num_classes)
    if ck is not None:
        model.load_state_dict(ck["model"])  # its shapes checked by load_checkpoint
    elif cfg.init:
        init_from_swin(model, cfg.init, cfg.init_nonstrict)
    models = {"model": model.to(device)}
    if cfg.ema_decay > 0 and not (cfg.eval_only and ck is None):  # else nothing to average
        models["ema"] = copy.deepcopy(model).eval().requires_grad_(False)
        if ck is not None:
            models["ema"].load_state_dict(ck["ema"])
    return models


def make_train_loader(splits, cfg, rt):
    """Micro-batches of B / (processes x accum_steps) images, each process its share (shuffled
    per epoch). Its own generator: the workers' seeds do not draw from stochastic depth's."""
    sampler = DistributedSampler(splits.train, rt.world, rt.rank, seed=cfg.seed, drop_last=True)
    return DataLoader(
        splits.train,
        cfg.batch_size // (rt.world * cfg.accum_steps),
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.workers,
        pin_memory=rt.device.type == "cuda",
        generator=torch.Generator(),
    )


def make_val_loader(splits, cfg, rt):
    """Process k scores images k, k + world, ...; Shapes' images are drawn once, not per model and
    epoch."""
    val_set = splits.val
    if cfg.data == "shapes":
        val_set = [splits.val[i] for i in range(len(splits.val))]
    if len(val_set) < rt.world:
        raise InputError(f"{len(val_set)} validation images for {rt.world} processes; use more")
    index = range(rt.rank, len(val_set), rt.world)
    batch = 2 * cfg.batch_size // (rt.world * cfg.accum_steps)
    return DataLoader(val_set, max(1, batch), sampler=index, num_workers=cfg.workers)


def check_steps(steps_per_epoch, ck, cfg, num_images):
    """InputError unless the data makes full steps, and a checkpoint's step fits this data."""
    if steps_per_epoch == 0:
        raise InputError(
            f"{num_images} training images make no full batch of {cfg.batch_size}; lower "
            "--batch-size or use more images"
        )
    if ck is not None and ck["step"] != ck["epoch"] * steps_per_epoch:
        raise InputError(
            f"checkpoint {cfg.resume} took {ck['step']} steps in {ck['epoch']} epochs, this data "
            f"makes {steps_per_epoch} per epoch: resume on the same data"
        )


def check_same_classes(saved, classes, path):
    """InputError unless the data's classes are the checkpoint's, in the same order."""
    if saved == classes:
        return
    if sorted(saved) == sorted(classes):
        k = next(i for i, (a, b) in enumerate(zip(saved, classes, strict=True)) if a != b)
        raise InputError(
            f"checkpoint {path} has this data's {len(classes)} classes in another order (column "
            f"{k}: {saved[k]!r} there, {classes[k]!r} here): resume on the same dataset"
        )
    raise InputError(
        f"checkpoint {path} was trained on {len(saved)} classes ({', '.join(saved[:3])}, ...), "
        f"this data has {len(classes)} ({', '.join(classes[:3])}, ...): resume on the same dataset"
    )


def init_from_swin(model, path, nonstrict):
    """Section 4.1's ImageNet-pretrained start: Swin's weights through mitr.load_swin."""
    swin = read_torch_file(path, "--init")
    try:
        report = mitr.load_swin(model, swin, strict=not nonstrict)
    except ValueError as e:
        raise InputError(f"--init {path}: {e}") from None
    log(f"--init {path}\n" + mitr.format_swin_report(report))


def restore_optimizer(optimizer, scaler, ck):
    """Adam's moments from a checked checkpoint; its hyperparameters are this run's (the lr and
    beta1 are set before every step anyway)."""
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": ck["optimizer"]["state"], "param_groups": groups})
    if scaler.is_enabled() and ck["scaler"]:  # a run without fp16 saved an empty one
        scaler.load_state_dict(ck["scaler"])


class BestEpoch(NamedTuple):
    epoch: int  # 1-based
    val: Validation


def epoch_record(epoch, step, stats, val):
    """An epoch's line of RUN/log.jsonl: its training stats and both models' full reports."""
    rows = len(val.scores.targets)
    head = {"kind": "epoch", "epoch": epoch + 1, "step": step, "mAP": val.mAP}
    return {**head, "best_of": val.best_of, "val_rows": rows, **stats, **val.reports}


def checkpoint_state(cfg, classes, models, optimizer, scaler, epoch, step, best, val):
    """What best.pt and last.pt hold (plain values and tensors: torch.load(weights_only=True))."""
    ema = models.get("ema")
    return {
        "model": models["model"].state_dict(),
        "ema": None if ema is None else ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch + 1,
        "step": step,
        "args": dataclasses.asdict(cfg),
        "classes": list(classes),
        "best_map": best.val.mAP,
        "best_of": val.best_of,  # the weights predict uses: "model" or "ema"
        "thresholds": {  # chosen for them on this validation (Interpretation 28)
            "overall": float(val.thresholds.overall),
            "per_class": [float(t) for t in val.thresholds.per_class],
        },
    }


def start_run(cfg, rt, splits, progress, ck):
    """Claim the run folder (rank 0; None elsewhere), log the settings, say what runs."""
    out = None
    if rt.rank == 0:
        out = claim_out(cfg)
        record = {"kind": "config" if ck is None else "resume", "step": progress.step}
        info = {"args": dataclasses.asdict(cfg), "world_size": rt.world, "device": str(rt.device)}
        append_jsonl(out, {**record, **info})
    log(
        f"MITr-{cfg.variant} on {len(splits.train)} train / {len(splits.val)} val images, "
        f"{rt.world} process(es) on {rt.device}; {progress.per_epoch} steps/epoch x {cfg.epochs} "
        f"epochs from step {progress.step}; run folder {out}"
    )
    return out


def finish(out, cfg, splits, best, step):
    """The closing lines: the best epoch's per-class AP with the class names, and its samples."""
    report = best.val.reports[best.val.best_of]
    log(f"AP per class, epoch {best.epoch} ({best.val.best_of}):")
    log(format_class_ap(report["AP_per_class"], splits.classes))
    if out:
        n = min(16, len(splits.val))
        images = torch.stack([splits.val[i][0] for i in range(n)])
        scores = best.val.scores
        counts = None if scores.count_logits is None else scores.count_logits[:n]
        thresholds = best.val.thresholds.per_class
        predicted = decode_labels(scores.class_logits[:n], counts, cfg.decode, thresholds)
        path = os.path.join(out, "samples.png")
        draw_samples(images, scores.targets[:n], predicted, splits.classes, path)
        log(f"samples: {path} (true and predicted labels of {n} val images, epoch {best.epoch})")
    log(f"done at step {step}: best val mAP {report['mAP']:.2f}; checkpoints in {out}")


def claim_out(cfg):
    """Create the run folder by an exclusive os.mkdir, so no two runs share one (default name:
    time and process id)."""
    out = cfg.out
    if out is None:
        stamp = f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
        out = os.path.join("runs", f"{cfg.data}-{cfg.variant}-{stamp}")
    if not out.strip() or os.path.lexists(out):
        raise InputError(f"--out '{out}' is empty or already exists: every run needs a new folder")
    with disk_errors(f"--out {out}"):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        os.mkdir(out)  # exclusive: FileExistsError if another run won
    return out


def reason(e):
    """An exception as a short phrase on one line."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}"
    return " ".join(str(e).split())[:200] or type(e).__name__


@contextlib.contextmanager
def disk_errors(what):
    """Any failure while creating or writing `what` -> one line. torch.save reports a full disk as
    a RuntimeError, not an OSError, so every exception counts (an InputError passes as it is)."""
    try:
        yield
    except InputError:
        raise
    except Exception as e:
        if interrupted():  # Ctrl-C inside torch.save surfaces as its zip writer's RuntimeError
            raise KeyboardInterrupt from None
        raise InputError(
            f"cannot write {what} ({reason(e)}); free disk space or use another --out"
        ) from None


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """A new file beside `path`, unique to this writer (process id and a random tag), renamed over
    `path` when the block ends: `path` is never half written. On any failure that file alone is
    removed and the failure is one line (disk_errors)."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    with disk_errors(path):
        try:
            with open(tmp, mode.replace("w", "x"), newline=None if "b" in mode else "") as f:
                yield f
            os.replace(tmp, path)
        finally:
            if os.path.lexists(tmp):
                os.remove(tmp)


def save_checkpoint(state, path):
    """torch.save through atomic_write: the old file stays until the new one is complete."""
    with atomic_write(path) as f:
        torch.save(state, f)


def append_jsonl(out, record):
    with (
        disk_errors(os.path.join(out, "log.jsonl")),
        open(os.path.join(out, "log.jsonl"), "a") as f,
    ):
        f.write(json.dumps(record) + "\n")


def read_torch_file(path, what):
    """torch.load(weights_only=True) of a regular file (a fifo would hang) -> its object, or one
    InputError line naming the file."""
    data.check_regular_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not torch's, a foreign pickle
        raise InputError(
            f"cannot read {what} {path} ({type(e).__name__}): truncated, not a torch file, or "
            "holding more than tensors and plain values"
        ) from None


CKPT_KEYS = ("model", "ema", "optimizer", "scaler", "epoch", "step", "args", "classes")
CKPT_KEYS += ("best_map", "best_of", "thresholds")


def load_checkpoint(path, what="checkpoint"):
    """A checkpoint of train.py, read with weights_only and checked whole before anything uses it:
    its settings (check_config, as the command line's), classes, epoch, thresholds, and the shape
    of every tensor the model, its EMA and Adam take. Any failure: one line naming the field."""
    ck = read_torch_file(path, what)
    where = f"{what} {path}"
    missing = [k for k in CKPT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise InputError(
            f"{where} lacks {', '.join(missing)}: not from train.py (Swin weights: --init)"
        )
    cfg = config_from_dict(ck["args"], where)
    classes = ck["classes"]
    if not (isinstance(classes, list) and classes and all(type(c) is str for c in classes)):
        raise InputError(f"{where}: classes is {short(classes)}, not a list of class names")
    if len(set(classes)) != len(classes):
        raise InputError(f"{where}: classes names a class twice")
    check_int(ck["epoch"], 1, cfg.epochs, f"{where}: epoch")
    check_int(ck["step"], ck["epoch"], math.inf, f"{where}: step")
    if not is_number(ck["best_map"]):
        raise InputError(f"{where}: best_map is {short(ck['best_map'])}, not a number")
    if ck["best_of"] not in ("model", "ema") or (ck["best_of"] == "ema" and cfg.ema_decay == 0):
        raise InputError(f"{where}: best_of is {short(ck['best_of'])}, not 'model' or 'ema'")
    check_thresholds(ck["thresholds"], len(classes), where)
    with torch.device("meta"):  # shapes only: no memory, no time
        model = build_model(cfg, len(classes))
    check_tensors(ck["model"], model.state_dict(), f"{where}: model")
    if cfg.ema_decay > 0:
        check_tensors(ck["ema"], model.state_dict(), f"{where}: ema")
    elif ck["ema"] is not None:
        raise InputError(f"{where}: ema is {short(ck['ema'])}, but --ema-decay 0 keeps none")
    check_adam(ck["optimizer"], param_groups(model, cfg.weight_decay), f"{where}: optimizer")
    if not (isinstance(ck["scaler"], dict) and all(is_number(v) for v in ck["scaler"].values())):
        raise InputError(f"{where}: scaler is {short(ck['scaler'])}, not a GradScaler's state")
    return ck


def short(value):
    """A value as a few words for a message: its type, and its repr when short."""
    text = repr(value)
    if len(text) > 40 or isinstance(value, torch.Tensor):
        return f"a {type(value).__name__}"
    return f"{text} (a {type(value).__name__})"


def is_number(value):
    return type(value) in (int, float)


def has_type(value, annotation):
    """Whether a saved setting has its field's type (a bool is no int; an int does as a float)."""
    if annotation == str | None:
        return value is None or type(value) is str
    if annotation == list[int]:
        return type(value) is list and len(value) == 2 and all(type(v) is int for v in value)
    if annotation is float:
        return is_number(value)
    return type(value) is annotation


def config_from_dict(saved, where):
    """The TrainConfig a checkpoint saved, each value of its field's type, and check_config's."""
    if not isinstance(saved, dict):
        raise InputError(f"{where}: args is {short(saved)}, not a dict of settings")
    for f in dataclasses.fields(TrainConfig):
        if f.name not in saved:
            raise InputError(f"{where}: args lacks {f.name} (written by an older train.py?)")
        if not has_type(saved[f.name], f.type):
            kind = f.type.__name__ if f.type in (bool, int, float, str) else f.type
            raise InputError(f"{where}: args {f.name} is {short(saved[f.name])}, not {kind}")
    cfg = TrainConfig(**{f.name: saved[f.name] for f in dataclasses.fields(TrainConfig)})
    try:
        check_config(cfg)
    except InputError as e:
        raise InputError(f"{where}: its settings break a rule: {e}") from None
    return cfg


def check_int(value, low, high, where):
    """InputError unless value is an int in [low, high]."""
    if not (type(value) is int and low <= value <= high):
        raise InputError(f"{where} is {short(value)}, not an integer in [{low}, {high}]")


def check_thresholds(thresholds, num_classes, where):
    """InputError unless thresholds = {"overall": p, "per_class": [K p]}, probabilities."""

    def probability(p):
        return is_number(p) and 0 <= p <= 1

    ok = isinstance(thresholds, dict) and probability(thresholds.get("overall"))
    per_class = thresholds.get("per_class") if ok else None
    ok = ok and isinstance(per_class, list) and len(per_class) == num_classes
    if not (ok and all(probability(p) for p in per_class)):
        raise InputError(
            f"{where}: thresholds is {short(thresholds)}, not {{'overall': p, 'per_class': "
            f"[{num_classes} p]}} with probabilities p"
        )


def check_tensors(state, expected, where):
    """InputError unless `state` holds, for every name of `expected`, a tensor of its shape."""
    if not isinstance(state, dict):
        raise InputError(f"{where} is {short(state)}, not a state dict of tensors")
    if state.keys() != expected.keys():
        odd = sorted(state.keys() ^ expected.keys(), key=str)
        raise InputError(
            f"{where} does not fit the model it describes: {odd[0]!r} and {len(odd) - 1} more "
            "names differ"
        )
    for name, tensor in expected.items():
        if not (isinstance(state[name], torch.Tensor) and state[name].shape == tensor.shape):
            raise InputError(
                f"{where} {name} is {short(state[name])} of shape "
                f"{tuple(getattr(state[name], 'shape', ()))}; the model needs {tuple(tensor.shape)}"
            )


def check_adam(state, groups, where):
    """InputError unless `state` is Adam's state dict for these parameter groups: the same
    parameters in each, moments of their shapes."""
    if not (isinstance(state, dict) and isinstance(state.get("state"), dict)):
        raise InputError(f"{where} is {short(state)}, not Adam's state dict")
    saved = state.get("param_groups")
    if not (isinstance(saved, list) and len(saved) == len(groups)):
        raise InputError(
            f"{where}: {short(saved)} as param_groups; the model needs {len(groups)} groups"
        )
    shapes = {}
    for g, (group, saved_group) in enumerate(zip(groups, saved, strict=True)):
        ids = list(range(len(shapes), len(shapes) + len(group["params"])))
        if not (isinstance(saved_group, dict) and saved_group.get("params") == ids):
            raise InputError(
                f"{where}: parameter group {g} lists other parameters than the model's"
            )
        shapes.update(zip(ids, (p.shape for p in group["params"]), strict=True))
    for i, moments in state["state"].items():
        if i not in shapes or not isinstance(moments, dict):
            raise InputError(f"{where}: the state of parameter {short(i)} fits no parameter")
        for key in ("exp_avg", "exp_avg_sq"):
            if not (isinstance(moments.get(key), torch.Tensor) and moments[key].shape == shapes[i]):
                raise InputError(
                    f"{where}: parameter {i}'s {key} is not a tensor of shape {tuple(shapes[i])}"
                )
        if not (isinstance(moments.get("step"), torch.Tensor) and moments["step"].numel() == 1):
            raise InputError(f"{where}: parameter {i}'s step is not a one-element tensor")


def gather(scores, index):
    """Every process's Scores on its val indices -> the whole set's, in dataset order (DDP)."""
    if not dist.is_initialized():
        return scores
    shards = [None] * dist.get_world_size()
    dist.all_gather_object(shards, (list(index), scores))
    order = torch.tensor([i for indices, _ in shards for i in indices]).argsort()
    return concat([s for _, s in shards], order)


def resume_hint(out, cfg):
    """What a stopped run leaves, read from disk: the command that continues from last.pt, else
    best.pt, with the flags a checkpoint does not keep (the data's paths)."""
    for name in ("last.pt", "best.pt"):
        path = os.path.join(out, name)
        if os.path.isfile(path):
            argv = ["python", "train.py", "--resume", path]
            for k in DATA_PATHS:
                if getattr(cfg, k) is not None:
                    argv += [flag(k), getattr(cfg, k)]
            return f"the last good checkpoint is kept: continue with {shlex.join(argv)}"
    return f"no epoch finished, nothing to resume: start again with a new --out or delete {out}"


def explain(e):
    """A RuntimeError with a known cause as the exception that says it in one line; any other
    RuntimeError (a bug) as it is, to keep its traceback."""
    if interrupted():  # what fails after Ctrl-C (a worker, another process) is its echo
        return KeyboardInterrupt()
    if "DataLoader worker" in str(e):
        return InputError(
            f"a DataLoader worker died ({reason(e)}): the out-of-memory killer? use fewer "
            "--workers or a smaller --batch-size"
        )
    lost_peer = isinstance(e, dist.DistError) or "by peer" in str(e)  # NCCL's, gloo's
    if not (dist.is_initialized() and lost_peer):
        return e
    return InputError("another process of the job failed first; its line says why")


def stopped(e, out, cfg):
    """The exception that ends a run stopped in its epochs: its line and what is on disk."""
    if isinstance(e, RuntimeError):
        e = explain(e)
    if isinstance(e, RuntimeError):
        return e
    hint = resume_hint(out, cfg) if out else ""
    return type(e)("; ".join(part for part in (str(e).strip(), hint) if part))


CTRL_C = threading.Event()  # set by interrupt_once: this run was stopped by Ctrl-C


def interrupted():
    """Whether Ctrl-C has stopped this run (interrupt_once has run)."""
    return CTRL_C.is_set()


def interrupt_once(signum, frame):
    """Ctrl-C stops the run (KeyboardInterrupt); later ones are ignored while it cleans up and
    says what is on disk, so the one line is not buried under the workers' noise."""
    CTRL_C.set()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv=None):
    """`train.py [flags]` trains, `train.py predict ...` labels images. Bad input: one line and exit
    code 2 (from the process that found it, under torchrun); Ctrl-C: exit code 130."""
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    rank = int(os.environ.get("RANK", 0))
    name = "train.py"
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        name = f"train.py (rank {rank})"
    CTRL_C.clear()
    previous = signal.signal(signal.SIGINT, interrupt_once)
    try:
        if argv[:1] == ["predict"]:
            return predict(argv[1:])
        return train(argv)
    except InputError as e:  # one line, from a DataLoader worker too
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        log(f"train.py: interrupted; {e}" if str(e) else "train.py: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGINT, previous)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# --- Inference: predict and samples (below)


class Prediction(NamedTuple):
    """One image's result: every class's probability, the labels chosen, the predicted count."""

    image: str  # the file, as listed
    error: str  # "" or the line naming why it could not be read
    probabilities: list  # (K,) floats: the sigmoid of the class logits
    labels: list  # the chosen class names, the most probable first
    count: int | None  # the count head's argmax (Eq. 17); None without the object token


def predictions(model, loader, decode, thresholds, classes, device):
    """Yield a Prediction per file of loader.dataset, in order; a progress line with img/s on
    stderr every 10 s."""
    files = loader.dataset.files
    done = 0
    start = time.time()
    shown = start
    for images, errors in loader:
        with torch.no_grad():
            class_logits, count_logits = model(images.to(device))  # (B, K), (B, K + 1) or None
        chosen = decode_labels(class_logits, count_logits, decode, thresholds).cpu()  # (B, K)
        order = torch.argsort(class_logits, dim=-1, descending=True, stable=True).cpu()  # (B, K)
        probabilities = torch.sigmoid(class_logits.float()).cpu()  # (B, K)
        counts = [None] * len(images)
        if count_logits is not None:
            counts = count_logits.argmax(-1).tolist()
        for i, error in enumerate(errors):
            labels = [classes[j] for j in order[i].tolist() if chosen[i, j]]
            p = probabilities[i].tolist()
            yield Prediction(str(files[done + i]), error, p, labels, counts[i])
        done += len(images)
        if time.time() - shown >= 10:
            shown = time.time()
            rate = done / (shown - start)
            eta = datetime.timedelta(seconds=round((len(files) - done) / rate))
            line = f"predict: {done}/{len(files)} images, {rate:.0f} img/s, ETA {eta}"
            print(line, file=sys.stderr)


def write_predictions(f, kind, classes, stream):
    """Write each readable Prediction of `stream` to f as csv, jsonl or text (a short line each);
    name each unreadable one on stderr -> how many were skipped."""
    table = csv.writer(f)
    if kind == "csv":
        table.writerow(["image", "labels", "count", *classes])
    skipped = 0
    for p in stream:
        if p.error:
            print(f"train.py: skipped: {p.error}", file=sys.stderr)
            skipped += 1
        elif kind == "csv":
            count = "" if p.count is None else p.count
            probabilities = [f"{q:.6f}" for q in p.probabilities]
            table.writerow([p.image, " ".join(p.labels), count, *probabilities])
        elif kind == "jsonl":
            record = dict(image=p.image, labels=p.labels, count=p.count)
            record["probabilities"] = dict(zip(classes, p.probabilities, strict=True))
            f.write(json.dumps(record) + "\n")
        else:
            named = dict(zip(classes, p.probabilities, strict=True))
            shown = ", ".join(f"{c} {named[c]:.3f}" for c in p.labels) or "(none)"
            f.write(f"{p.image}: {shown} | count {'n/a' if p.count is None else p.count}\n")
    return skipped


def predict_parser():
    ap = parser(
        "train.py predict",
        "Label images with a checkpoint of train.py: every class's probability, the labels chosen "
        "(--decode) and the number of labels the object token predicts (argmax of Eq. 17).",
    )
    ap.add_argument(
        "--checkpoint", required=True, metavar="FILE", help="a best.pt / last.pt of train.py"
    )
    ap.add_argument(
        "paths", nargs="+", metavar="PATH", help="image files and folders (recursive: JPEG, PNG)"
    )
    ap.add_argument(
        "--out",
        metavar="FILE",
        help="FILE.csv (columns image, labels, count, then one probability per class) or "
        "FILE.jsonl; must not exist yet (default: a short line per image on stdout)",
    )
    ap.add_argument(
        "--decode",
        choices=CHOICES["decode"],
        help="threshold: each class whose probability reaches its threshold; count: the z most "
        "probable classes, z the object token's count (Eq. 17) (default: the run's --decode)",
    )
    ap.add_argument(
        "--threshold",
        type=float,
        metavar="P",
        help="one probability for every class (default: the per-class thresholds chosen on the "
        "run's validation set, stored in the checkpoint; samples.png shows those)",
    )
    ap.add_argument(
        "--batch-size", type=int, default=64, metavar="N", help="images per forward (default 64)"
    )
    ap.add_argument(
        "--workers", type=int, metavar="N", help="DataLoader workers (default: the run's)"
    )
    ap.add_argument("--device", choices=CHOICES["device"], default="auto", help=HELP["device"])
    return ap


def check_predict_args(args):
    """predict's flags, before any work: one InputError line each."""
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise out_of_range("threshold", args.threshold, "[0, 1]")
    if not 1 <= args.batch_size <= MAX_BATCH:
        raise out_of_range("batch_size", args.batch_size, f"[1, {MAX_BATCH}]")
    if args.workers is not None and not 0 <= args.workers <= MAX_WORKERS:
        raise out_of_range("workers", args.workers, f"[0, {MAX_WORKERS}]")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device visible to PyTorch; use --device cpu")
    if args.out is not None and not args.out.endswith((".csv", ".jsonl")):
        raise InputError(f"--out {args.out}: name a .csv or .jsonl file")
    if args.out is not None and os.path.lexists(args.out):
        raise InputError(f"--out {args.out} already exists: remove it or name another file")


def predict(argv):
    """`train.py predict`: label the images of PATHs into --out (or onto stdout) -> rows written.
    Memory stays flat: batches flow from the DataLoader to the file, nothing is collected."""
    args = predict_parser().parse_args(argv)
    check_predict_args(args)
    ck = load_checkpoint(args.checkpoint)
    cfg = TrainConfig(**ck["args"])
    decode = args.decode or cfg.decode
    if args.threshold is not None and decode == "count":
        raise InputError(
            "--threshold applies to --decode threshold, not count (given, or the run's): "
            "add --decode threshold or drop --threshold"
        )
    if decode == "count" and not cfg.object_token:
        raise InputError(
            f"--decode count reads the object token's count head, and {args.checkpoint} was "
            "trained without it (--no-object-token): use --decode threshold"
        )
    thresholds = ck["thresholds"]["per_class"] if args.threshold is None else args.threshold
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    model = build_model(cfg, len(ck["classes"]))
    model.load_state_dict(ck[ck["best_of"]])  # the better on validation: plain or EMA
    images = data.PredictImages(data.list_images(args.paths), cfg.img_size)
    workers = cfg.workers if args.workers is None else args.workers  # Shapes: 0; others: 8
    loader = DataLoader(
        images, args.batch_size, num_workers=workers, pin_memory=device.type == "cuda"
    )
    stream = predictions(model.eval().to(device), loader, decode, thresholds, ck["classes"], device)
    start = time.time()
    if args.out is None:
        skipped = write_predictions(sys.stdout, "text", ck["classes"], stream)
    else:
        with atomic_write(args.out, "w") as f:
            skipped = write_predictions(f, args.out.rsplit(".", 1)[1], ck["classes"], stream)
    rate = len(images) / (time.time() - start)
    where = args.out or "stdout"
    # A skipped image: exit code 2 after writing every other row. A script that checks the
    # status learns that some inputs have no row, which exit 0 and a warning would hide.
    if skipped:
        raise InputError(
            f"{skipped} of {len(images)} images skipped (named above); the other "
            f"{len(images) - skipped} are written to {where}"
        )
    print(f"predict: {len(images)} images, {rate:.0f} img/s, into {where}", file=sys.stderr)
    return len(images)


SAMPLE_COLOURS = dict(right=(0, 140, 0), wrong=(210, 0, 0), missed=(150, 150, 150), text=(0, 0, 0))


def sample_lines(true, predicted, classes):
    """An image's two lines of (word, SAMPLE_COLOURS key): its true labels, right where predicted
    and missed where not, and its predicted ones, right where true and wrong where not."""
    truth = [(classes[j], "right" if predicted[j] else "missed") for j in np.flatnonzero(true)]
    guess = [(classes[j], "right" if true[j] else "wrong") for j in np.flatnonzero(predicted)]
    none = [("(none)", "text")]
    return [[("true:", "text"), *(truth or none)], [("pred:", "text"), *(guess or none)]]


def wrap(words, font, width):
    """Words of (text, kind) -> rows of (x, text, kind), each no wider than `width` pixels."""
    rows = [[]]
    x = 0
    for text, kind in words:
        if x > 0 and x + font.getlength(text) > width:
            rows.append([])
            x = 0
        rows[-1].append((x, text, kind))
        x += font.getlength(text + " ")
    return rows


def draw_word(draw, x, y, text, kind, font):
    """A word in the colour of its kind; a missed label is struck through too."""
    draw.text((x, y), text, fill=SAMPLE_COLOURS[kind], font=font)
    if kind == "missed":
        draw.line((x, y + 7, x + font.getlength(text), y + 7), fill=SAMPLE_COLOURS[kind])


def draw_samples(images, targets, predicted, classes, path):
    """A grid, 4 wide, of up to 16 images (n, 3, H, W), normalised as data.to_tensor does, each
    shown twice its size above its true and predicted labels (sample_lines), under a legend.
    targets (n, K) in {1, 0, -1}, predicted bool (n, K). Written atomically as a PNG at `path`."""
    pad = 8  # pixels around each cell
    line_h = 15  # pixels per line of labels
    font = ImageFont.load_default(size=12)
    mean = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    rgb = (images[:16].float().cpu() * std + mean).clamp(0, 1)  # (n, 3, H, W) in [0, 1]
    pixels = rgb.mul(255).round().byte()  # (n, 3, H, W) uint8
    side = 2 * pixels.shape[-1]  # shown at 2H x 2W
    true = np.asarray(targets[:16]) == 1
    texts = [
        [row for line in sample_lines(t, p, classes) for row in wrap(line, font, side)]
        for t, p in zip(true, np.asarray(predicted[:16]), strict=True)
    ]
    cell_w = side + pad
    cell_h = side + pad + line_h * max(map(len, texts)) + pad
    grid_rows = math.ceil(len(texts) / 4)
    canvas = Image.new("RGB", (4 * cell_w + pad, pad + line_h + grid_rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    legend = [
        ("right", "right"),
        ("(predicted, true),", "text"),
        ("wrong", "wrong"),
        ("(predicted, not true),", "text"),
        ("missed", "missed"),
        ("(true, not predicted)", "text"),
    ]
    for x, text, kind in wrap(legend, font, canvas.width)[0]:
        draw_word(draw, pad + x, pad // 2, text, kind, font)
    for i, (image, rows) in enumerate(zip(pixels, texts, strict=True)):
        left = pad + i % 4 * cell_w
        top = pad + line_h + i // 4 * cell_h
        picture = Image.fromarray(image.permute(1, 2, 0).numpy())  # (3, H, W) -> (H, W, 3)
        canvas.paste(picture.resize((side, side), Image.Resampling.NEAREST), (left, top))
        for r, row in enumerate(rows):
            y = top + side + pad // 2 + r * line_h
            for x, text, kind in row:
                draw_word(draw, left + x, y, text, kind, font)
    with atomic_write(path) as f:
        canvas.save(f, format="PNG")


if __name__ == "__main__":
    main()
