"""Train, evaluate and run MITr (Section 4.1 of the paper) on one CPU, one GPU or many.

    python train.py                                   # the embedded default: tiny on Shapes, CPU
    python train.py --data coco --data-dir /data/coco --variant s --init swin_tiny_patch4_window7_224.pth
    torchrun --nproc_per_node=8 train.py --data coco --data-dir /data/coco --variant s ...
    python train.py --resume runs/RUN/last.pt         # continue a run exactly where it stopped
    python train.py --resume runs/RUN/best.pt --eval-only
    python train.py predict --checkpoint runs/RUN/best.pt cat.jpg dog.png

The recipe (Section 4.1, the rest from the ASL code it follows, see REFERENCE-NOTES): Adam, a
one-cycle schedule peaking at lr 1e-4 (pct_start 0.2), weight decay 1e-4 on weights only, the loss
of Eq. 18 (ASL with gamma+ 0, gamma- 4, m 0.05 on the arc-sigmoid head with s 8, plus the
object-token loss), Cutout + RandAugment, an EMA of the weights (decay 0.9997, every step), and
validation reporting the better of the plain and the EMA model.

Everything a run needs to continue lives in its checkpoint (model, EMA, optimizer, schedule, AMP
scaler, epoch/step, every RNG state, config, arguments, class names); checkpoints are written to a
temporary file and renamed, so an interrupted run always leaves the last good one in place.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset

import data
import mitr
from losses import mitr_loss
from metrics import average_precision, format_report, multilabel_report


class UsageError(Exception):
    """A bad input the user can fix: printed as one line on stderr, exit code 2, no traceback."""


# -----------------------------------------------------------------------------
# Defaults. `None` in the parser means "depends on --data": the paper's recipe for COCO, VOC and
# NUS-WIDE, a recipe tuned to finish in ~10 minutes on a 2-core CPU for the embedded Shapes default.

PAPER = dict(variant="s", epochs=200, batch_size=128, lr=1e-4, workers=8, ema_decay=0.9997,
             num_train=0, num_val=0, randaug=[2, 9], cutout=0.5)
# Paper: "the initial learning rate is 1e-4", 200 epochs, batch size not given. Here: 1e-4 is
# the one-cycle peak (ASL's max_lr), batch 128 as ASL's train.py.
SHAPES = dict(variant="tiny", epochs=8, batch_size=64, lr=1e-3, workers=0, ema_decay=0.99,
              num_train=10000, num_val=1000, randaug=[0, 0], cutout=0.0)
# Not from the paper: the tiny model from scratch in ~10 minutes of a 2-core CPU (80k images at
# ~140 img/s), measured to end at mAP ~82 (README, "The embedded default"). Why each value:
#  - lr 1e-3: no pretraining and 1248 steps; 2e-3 collapsed to chance after its first epoch.
#  - no Cutout/RandAugment: 10k images seen 8 times need little regularising, and augmentation
#    slowed learning (mAP 22 vs 44 after 6k images); data.py's Shapes default agrees.
#  - EMA 0.99 (~100 steps): 0.9997 averages over ~3300 steps, more than the whole run.
#  - workers 0: drawing an image costs ~1 ms of CPU against ~12 ms for its training step; a
#    worker process would fight the model's 2 threads for the 2 cores.

# Arguments a resumed run may change: where and how it runs, not what it computes. The first set
# is kept from the checkpoint unless given again; the second belongs to each invocation.
RESUME_MACHINE = {"data_dir", "workers", "device", "compile", "amp", "threshold", "log_every", "num_val"}
RESUME_PER_CALL = {"max_steps", "eval_only", "out", "resume", "init", "init_nonstrict"}
RESUME_FREE = RESUME_MACHINE | RESUME_PER_CALL


def build_parser():
    ap = argparse.ArgumentParser(
        prog="train.py",
        description="Train / evaluate MITr (Cheng et al., 2021). Defaults reproduce Section 4.1 for "
                    "--data coco|voc|nuswide; with the default --data shapes they are tuned for a "
                    "~10-minute CPU demo: tiny variant, {epochs} epochs of {num_train} images, batch "
                    "{batch_size}, peak lr {lr:g}, EMA {ema_decay}, no augmentation. Inference: `python "
                    "train.py predict --checkpoint CKPT IMAGE...` (see `python train.py predict "
                    "--help`). Many processes: `torchrun --nproc_per_node=N train.py ...`.".format(**SHAPES),
    )
    g = ap.add_argument_group("data")
    g.add_argument("--data", choices=["shapes", "coco", "voc", "nuswide"], default="shapes",
                   help="dataset; shapes is generated on the fly, no files (default %(default)s)")
    g.add_argument("--data-dir", default=None,
                   help="dataset root (README, 'Datasets', gives each layout); not used by shapes")
    g.add_argument("--num-train", type=int, default=None,
                   help=f"shapes: training images to generate (default {SHAPES['num_train']}); other "
                        "datasets: use only the first N training images (default 0 = all)")
    g.add_argument("--num-val", type=int, default=None,
                   help=f"shapes: validation images (default {SHAPES['num_val']}); others: first N (0 = all)")
    g.add_argument("--randaug", type=int, nargs=2, default=None, metavar=("N", "M"),
                   help="RandAugment: N ops at magnitude M of 30 (default 2 9, data.py's; for shapes 0 0 = off)")
    g.add_argument("--cutout", type=float, default=None, metavar="P",
                   help="probability of Cutout (a half-size rectangle) per training image (default "
                        "0.5, data.py's; for shapes 0)")
    g.add_argument("--workers", type=int, default=None,
                   help=f"DataLoader worker processes per process (default {SHAPES['workers']} for "
                        f"shapes: on 2 cores a worker would compete with the model's threads; "
                        f"{PAPER['workers']} otherwise)")
    g = ap.add_argument_group("model (Table 1, Table 5)")
    g.add_argument("--variant", choices=sorted(mitr.VARIANTS), default=None,
                   help="MITr variant (default tiny for shapes, s otherwise)")
    g.add_argument("--img-size", type=int, default=None, help="input side (default: the variant's)")
    g.add_argument("--init", default=None, metavar="PATH",
                   help="initialise from Swin weights (official .pth or timm state dict), via mitr.load_swin")
    g.add_argument("--init-nonstrict", action="store_true",
                   help="with --init: load what fits even if some checkpoint keys have no place or "
                        "another shape (they are listed), instead of stopping")
    for flag, what in [("pos-embed", "relative position bias"), ("shift", "shifted windows"),
                       ("cross-window", "cross-window blocks (Eq. 3-4)"),
                       ("arc-sigmoid", "arc-sigmoid head (Eq. 13; off = linear head, Eq. 11)"),
                       ("object-token", "object-aware token and its loss (Eq. 17)")]:
        g.add_argument(f"--no-{flag}", dest=flag.replace("-", "_"), action="store_false",
                       help=f"Table 5 ablation: switch off the {what} (on by default)")
    g = ap.add_argument_group("optimisation (Section 4.1)")
    g.add_argument("--epochs", type=int, default=None,
                   help=f"epochs (default {SHAPES['epochs']} for shapes, {PAPER['epochs']} otherwise)")
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"GLOBAL batch, split over processes (default {SHAPES['batch_size']} for "
                        f"shapes, {PAPER['batch_size']} otherwise)")
    g.add_argument("--lr", type=float, default=None,
                   help=f"peak lr of the one-cycle schedule (default {SHAPES['lr']:g} for shapes, "
                        f"{PAPER['lr']:g} otherwise)")
    g.add_argument("--weight-decay", type=float, default=1e-4,
                   help="Adam (L2) weight decay on weights only, not on norms, biases, position-bias "
                        "tables, tokens (default %(default)s)")
    g.add_argument("--gamma-pos", type=float, default=0.0, help="ASL gamma+ (Eq. 15) (default %(default)s)")
    g.add_argument("--gamma-neg", type=float, default=4.0, help="ASL gamma- (Eq. 16) (default %(default)s)")
    g.add_argument("--clip", type=float, default=0.05, help="ASL probability margin m (Eq. 16) (default %(default)s)")
    g.add_argument("--arc-scale", type=float, default=8.0, help="s of the arc sigmoid (Eq. 13) (default %(default)s)")
    g.add_argument("--ema-decay", type=float, default=None,
                   help=f"EMA decay per step (default {SHAPES['ema_decay']} for shapes, "
                        f"{PAPER['ema_decay']} otherwise; 0 = no EMA)")
    g.add_argument("--max-steps", type=int, default=0,
                   help="stop after this many optimizer steps in total (0 = run all epochs); the "
                        "schedule still spans --epochs, the stop is evaluated and checkpointed")
    g = ap.add_argument_group("run")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto (default) = cuda if available, else cpu")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="autocast: auto (default) = bf16 on CUDA, off on CPU; fp16 uses a GradScaler")
    g.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    g.add_argument("--seed", type=int, default=0,
                   help="seed for weights, shuffling and augmentation (default %(default)s)")
    g.add_argument("--out", default=None,
                   help="run folder (default runs/<data>-<variant>-<time>); must be new or empty, "
                        "unless it is the folder of --resume")
    g.add_argument("--resume", default=None, metavar="PATH",
                   help="continue from a checkpoint with its own settings (you may change only "
                        + ", ".join("--" + k.replace("_", "-") for k in sorted(RESUME_FREE - {"resume"})) + ")")
    g.add_argument("--eval-only", action="store_true",
                   help="evaluate the --resume checkpoint (or --init weights) on the val split; writes nothing")
    g.add_argument("--threshold", type=float, default=0.5,
                   help="probability from which a label counts as predicted, for CP, CR, CF1, OP, "
                        "OR, OF1 (default %(default)s)")
    g.add_argument("--log-every", type=int, default=0,
                   help="progress line every N steps (default 0 = about 5 per epoch)")
    ap.error = lambda message: _usage_error(message)      # one line, not argparse's usage dump
    return ap


def _usage_error(message):
    raise UsageError(f"{message} (see python train.py --help)")


def parse_args(argv):
    """-> (args with every default resolved, the set of flags given explicitly)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    quiet = build_parser()                                # same flags, defaults None: what was typed
    quiet.set_defaults(**{k: None for k in vars(args)})
    explicit = {k for k, v in vars(quiet.parse_args(argv)).items() if v is not None}
    base = SHAPES if args.data == "shapes" else PAPER
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.img_size is None:
        args.img_size = mitr.VARIANTS[args.variant].img_size
    for k in ("epochs", "batch_size"):
        if getattr(args, k) < 1:
            raise UsageError(f"--{k.replace('_', '-')} must be at least 1")
    if args.lr <= 0 or not 0 <= args.ema_decay < 1 or args.workers < 0 or args.max_steps < 0:
        raise UsageError("--lr must be > 0, --ema-decay in [0, 1), --workers and --max-steps >= 0")
    return args, explicit


def model_config(args):
    """Table 1's variant with this run's resolution and Table 5's switches."""
    cfg = dataclasses.replace(mitr.VARIANTS[args.variant], img_size=args.img_size,
                              arc_scale=args.arc_scale, pos_embed=args.pos_embed, shift=args.shift,
                              cross_window=args.cross_window, arc_sigmoid=args.arc_sigmoid,
                              object_token=args.object_token)
    if not mitr.valid_image_size(mitr.VARIANTS[args.variant], args.img_size):
        ok = [s for s in range(32, 1025, 4) if mitr.valid_image_size(mitr.VARIANTS[args.variant], s)][:5]
        raise UsageError(f"--img-size {args.img_size} does not fit MITr-{args.variant}'s windows; "
                         f"sides that work: {', '.join(map(str, ok))}, ...")
    return cfg


# -----------------------------------------------------------------------------
# Processes and devices

def setup_distributed(args):
    """-> (device, rank, world). torchrun sets RANK / WORLD_SIZE / LOCAL_RANK."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible to PyTorch; use --device cpu "
                         "or install a CUDA build of torch (README, 'GPU')")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
        if not use_cuda and "OMP_NUM_THREADS" not in os.environ:   # processes share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return device, rank, world


def amp_dtype(args, device):
    """The autocast dtype, or None. Paper: AMP, as ASL. Here: bf16 on CUDA (no loss scaling)."""
    mode = args.amp
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    if mode == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs CUDA; use --amp bf16 or --amp off on CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


# -----------------------------------------------------------------------------
# Data

def build_datasets(args):
    """-> (train, val, class names). Shapes generates its images; the others read --data-dir."""
    if args.data != "shapes" and not args.data_dir:
        raise UsageError(f"--data {args.data} needs --data-dir pointing at the dataset "
                         "(README, 'Datasets', gives the layout)")
    sets = []
    for split, train, n in (("train", True, args.num_train), ("val", False, args.num_val)):
        kw = {"num_images": n} if args.data == "shapes" else {}   # Shapes' own seed: one fixed dataset
        if train:
            kw.update(randaug_n=args.randaug[0], randaug_m=args.randaug[1], cutout_p=args.cutout)
        ds = data.build_dataset(args.data, args.data_dir, split, args.img_size, train, **kw)
        classes = list(ds.classes)
        if args.data != "shapes" and n:
            ds = Subset(ds, range(min(n, len(ds))))     # a quick look at the first n images
        sets.append(ds)
    return sets[0], cache(sets[1]), classes


def cache(ds):
    """The validation set rendered once (its transform is deterministic): Shapes draws every image
    with Pillow, and evaluating twice per epoch (plain and EMA) would draw it twice."""
    if not isinstance(ds, data.Shapes):
        return ds
    return [ds[i] for i in range(len(ds))]


# -----------------------------------------------------------------------------
# Model, optimizer, EMA

def param_groups(model, weight_decay):
    """Adam groups: decay on weight matrices / kernels only.

    Paper: silent on weight decay. Here: ASL's 1e-4, as torch.optim.Adam's (coupled, L2) decay,
    on weights only: ASL's add_weight_decay skips 1-D parameters (norms, biases); Swin's no-decay
    list adds the relative position bias tables and learned tokens, 2-D/3-D but not weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim <= 1 or name.endswith(".bias") or "relative_position_bias_table" in name \
            or name == "object_token"
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def ema_update(ema, model, decay):
    """ASL's ModelEma: every float entry of the state dict (parameters and buffers) moves towards
    the model's, ema = decay * ema + (1 - decay) * model, after every optimizer step.
    Paper: no EMA mentioned. Here: ASL's, because Section 4.1 follows its recipe; validation
    reports both and keeps the better (as ASL's train.py)."""
    for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.dtype.is_floating_point:
            e.lerp_(m, 1.0 - decay)
        else:
            e.copy_(m)


def init_weights(model, path, strict):
    """Section 4.1's ImageNet-pretrained start: Swin weights into the pixel-attention path
    (mitr.load_swin) -> a few lines saying what was loaded, resized, left new."""
    load_swin = getattr(mitr, "load_swin", None)
    if load_swin is None:
        raise UsageError("--init needs mitr.load_swin, which this mitr.py does not have; "
                         "train from scratch (drop --init) or update mitr.py")
    if not os.path.isfile(path):
        raise UsageError(f"--init {path} does not exist; give a Swin checkpoint (.pth)")
    try:
        report = load_swin(model, path, strict=strict)
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise UsageError(f"--init {path}: {str(e).splitlines()[0]}") from None
    fmt = getattr(mitr, "format_swin_report", None)
    return fmt(report) if fmt else str({k: len(v) for k, v in report.items() if isinstance(v, list)})


# -----------------------------------------------------------------------------
# Checkpoints: atomic, complete, loadable with weights_only=True

def rng_state(device):
    np_state = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(state, path):
    """Write to a temporary file in the same folder, then rename: the old file stays intact until
    the new one is complete (os.replace is atomic on POSIX and Windows)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path} does not exist; give the path of a last.pt or best.pt "
                         "written by train.py")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                                # truncated, not a torch file, foreign pickle
        raise UsageError(f"cannot read checkpoint {path} ({type(e).__name__}: truncated, not a torch "
                         "file, or holding more than tensors and plain values); give a last.pt or "
                         "best.pt written by train.py") from None
    if not isinstance(ck, dict) or not {"model", "config", "classes", "args"} <= set(ck):
        raise UsageError(f"{path} is not a train.py checkpoint (no model/config/classes/args); for "
                         "Swin weights use --init")
    return ck


def load_weights(model, state, path, what="model"):
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [l.strip() for l in str(e).splitlines()[1:] if l.strip()]
        raise UsageError(f"checkpoint {path}: its {what} weights do not fit the model it describes "
                         f"({model.num_classes} classes; {lines[0][:160] if lines else 'state dict mismatch'}); "
                         "use a checkpoint written by train.py for this variant, switches and dataset") from None


# -----------------------------------------------------------------------------
# Evaluation over the whole validation set, sharded across processes without duplicates

@torch.no_grad()
def evaluate(model, val, args, device, dtype, rank, world):
    """-> (scores (N, K) probabilities, targets (N, K), sizes (N, K), count predictions (N,)), on
    every rank, rows in dataset order. Rank r scores items r, r + world, ...; the shards are padded
    to equal length for all_gather, and the padding (rows >= N) is cut off after interleaving."""
    was_training = model.training
    model.eval()
    N = len(val)
    local = list(range(rank, N, world))                   # every rank gets >= 1 item (N >= world)
    loader = DataLoader(val, batch_size=max(1, 2 * args.batch_size // world), sampler=local,
                        num_workers=0 if isinstance(val, list) else args.workers,
                        pin_memory=device.type == "cuda")
    cols = {"scores": [], "targets": [], "sizes": [], "counts": []}
    with torch.random.fork_rng(devices=[]):               # evaluation must not move the training RNG
        for images, targets, sizes in loader:
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                class_logits, count_logits = model(images.to(device, non_blocking=True))
            cols["scores"].append(torch.sigmoid(class_logits.float()))
            cols["targets"].append(targets.to(device))
            cols["sizes"].append(sizes.to(device))
            cols["counts"].append(count_logits.argmax(-1) if count_logits is not None
                                  else torch.full((len(images),), -1, device=device))
    model.train(was_training)
    out = []
    for x in cols.values():
        x = torch.cat(x)                                  # (n_local, ...)
        if world > 1:
            M = math.ceil(N / world)                      # rows per rank after padding
            x = torch.cat([x, x.new_zeros((M - len(x),) + x.shape[1:])])   # (M, ...)
            parts = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(parts, x)
            x = torch.stack(parts, 1).flatten(0, 1)[:N]   # (M, world, ...) -> row j*world + r = item; cut padding
        out.append(x.cpu())
    return out


def report(scores, targets, sizes, counts, threshold):
    """The metrics table (metrics.py) plus the count head's accuracy (Eq. 17's z, argmax)."""
    has_sizes = bool((sizes > 0).any())
    r = multilabel_report(scores, targets, threshold, sizes=sizes if has_sizes else None)
    if (counts >= 0).all():
        r["count_acc"] = 100.0 * float((counts == (targets == 1).sum(1)).float().mean())
    return r


def table(epoch_label, reports):
    keys = [k for k in ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", "AP_s", "AP_m", "AP_l", "count_acc")
            if k in next(iter(reports.values()))]
    w = max(12, len(epoch_label) + 1)
    lines = [f"{epoch_label:<{w}}" + "".join(f"{k:>10}" for k in keys)]
    for name, r in reports.items():
        lines.append(f"  {name:<{w - 2}}" + "".join(f"{r[k]:>10.2f}" for k in keys))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Training

def prepare_out(args):
    """The run folder. A new run never writes into a folder holding files (no overwriting another
    run); a resumed run continues in its checkpoint's folder (or an empty/new --out)."""
    resume_dir = os.path.dirname(os.path.abspath(args.resume)) if args.resume else None
    out = args.out
    if out is None:
        if resume_dir:
            return resume_dir
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = base = os.path.join("runs", f"{args.data}-{args.variant}-{stamp}")
        n = 1
        while os.path.exists(out):
            n += 1
            out = f"{base}-{n}"
    if os.path.isdir(out) and os.listdir(out) and os.path.abspath(out) != resume_dir:
        raise UsageError(f"--out {out} already holds files (another run?); choose a new folder, or "
                         f"continue that run with --resume {os.path.join(out, 'last.pt')}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file; give a folder")
    return out


def check_resume(ck, args, explicit, path):
    """A resumed run takes its settings from the checkpoint; flags that would change what it
    computes must be absent or equal."""
    for k in sorted(explicit - RESUME_FREE):
        if k in ck["args"] and ck["args"][k] != getattr(args, k):
            flag = "--" + k.replace("_", "-")
            raise UsageError(f"{flag} {getattr(args, k)} differs from checkpoint {path} ({flag} "
                             f"{ck['args'][k]}, MITr-{ck['args'].get('variant')} with "
                             f"{len(ck['classes'])} classes); drop {flag} to resume that run, or "
                             "start a new run (with --init for Swin weights)")
    saved = {**vars(args), **ck["args"]}                  # flags newer than the checkpoint: defaults
    for k in explicit | RESUME_PER_CALL:
        saved[k] = getattr(args, k)
    return argparse.Namespace(**saved)


def train(argv):
    args, explicit = parse_args(argv)
    ck = load_checkpoint(args.resume) if args.resume else None
    if ck is not None:
        args = check_resume(ck, args, explicit, args.resume)
    elif args.eval_only and not args.init:
        raise UsageError("--eval-only needs a model to evaluate: --resume CHECKPOINT (or --init WEIGHTS)")
    out = None if args.eval_only else prepare_out(args)
    device, rank, world = setup_distributed(args)
    log = print if rank == 0 else (lambda *a, **k: None)
    dtype = amp_dtype(args, device)
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} is the global batch; make it divisible by "
                         f"the {world} processes")
    local_batch = args.batch_size // world

    torch.manual_seed(args.seed)                          # the same initial weights on every rank
    cfg = model_config(args)
    train_set, val_set, classes = build_datasets(args)
    if ck is not None and list(ck["classes"]) != classes:
        raise UsageError(f"checkpoint {args.resume} was trained on {len(ck['classes'])} classes "
                         f"({', '.join(ck['classes'][:3])}, ...), this data has {len(classes)}; "
                         "resume on the same dataset")
    if len(val_set) < world:
        raise UsageError(f"{len(val_set)} validation images for {world} processes; use more images")
    model = mitr.MITr(cfg, len(classes))
    if args.init and ck is None:
        log(f"--init {args.init}\n" + init_weights(model, args.init, strict=not args.init_nonstrict))
    model.to(device)
    use_ema = args.ema_decay > 0 and not (args.eval_only and ck is None)   # nothing to average yet
    ema = copy.deepcopy(model).eval().requires_grad_(False) if use_ema else None

    steps_per_epoch = len(train_set) // world // local_batch   # drop_last: equal, full batches
    if steps_per_epoch == 0 and not args.eval_only:
        raise UsageError(f"{len(train_set)} training images make no full batch of {args.batch_size}; "
                         "lower --batch-size or use more images")
    optimizer = torch.optim.Adam(param_groups(model, args.weight_decay), lr=args.lr)
    # One-cycle (ASL: OneCycleLR, pct_start 0.2): from lr/25 up to lr over the first 20% of the
    # steps, then cosine down to lr/25/1e4.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=max(1, args.epochs * steps_per_epoch), pct_start=0.2)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    epoch, batch_done, step, best = 0, 0, 0, -1.0
    if ck is not None:
        load_weights(model, ck["model"], args.resume)
        if ema is not None and ck.get("ema") is not None:
            load_weights(ema, ck["ema"], args.resume, "EMA")
        if not args.eval_only:
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            scaler.load_state_dict(ck["scaler"])
            set_rng_state(ck["rng"][rank] if len(ck["rng"]) == world else ck["rng"][0], device)
        epoch, batch_done, step, best = ck["epoch"], ck["batch"], ck["step"], ck["best_map"]
    else:                                  # per-rank augmentation randomness (shuffles: seed, epoch)
        random.seed(args.seed + rank)
        np.random.seed(args.seed + rank)
        torch.manual_seed(args.seed + rank)

    if args.eval_only:                                    # print the table, write nothing
        reports, per_class, rows = validate(model, ema, val_set, args, device, dtype, rank, world)
        log(table(f"eval {rows} images", reports))
        log(class_line(classes, per_class, reports))
        log(json.dumps({"kind": "eval", "checkpoint": args.resume, "val_rows": rows, **reports}))
        return reports

    net = DDP(model, device_ids=[device] if device.type == "cuda" else None) if world > 1 else model
    if args.compile:
        net = torch.compile(net)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    total = args.epochs * steps_per_epoch
    stop = min(total, args.max_steps) if args.max_steps else total
    every = args.log_every or max(1, steps_per_epoch // 5)
    header = {"kind": "resume" if ck else "config", "step": step, "args": vars(args),
              "config": dataclasses.asdict(cfg), "classes": classes, "world_size": world,
              "device": str(device), "amp": str(dtype), "torch": torch.__version__,
              "params": sum(p.numel() for p in model.parameters()),
              "train_images": len(train_set), "val_images": len(val_set)}
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        append_jsonl(out, header)
    log(f"MITr-{args.variant} ({header['params'] / 1e6:.2f}M params, {len(classes)} classes) on "
        f"{len(train_set)} train / {len(val_set)} val images; {world} process(es) on {device}, amp "
        f"{dtype}; {steps_per_epoch} steps/epoch x {args.epochs} epochs, from step {step}; run folder {out}")

    clock = {"train_s": 0.0, "steps": 0, "eval_s": 0.0}   # for images/s and ETA
    per_class = None
    while step < stop:
        # The epoch's order is a function of (seed, epoch); a run stopped mid-epoch skips what it did.
        sampler.set_epoch(epoch)
        order = list(sampler)[batch_done * local_batch:]
        loader = DataLoader(train_set, batch_size=local_batch, sampler=order, drop_last=True,
                            num_workers=args.workers, pin_memory=device.type == "cuda")
        net.train()
        t0, t_last, window, losses, cpu0 = time.time(), time.time(), [], [], time.process_time()
        for images, targets, _ in loader:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                class_logits, count_logits = net(images)
            loss, parts = mitr_loss(class_logits, count_logits, targets,             # Eq. (18)
                                    args.gamma_pos, args.gamma_neg, args.clip)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            lr = scheduler.get_last_lr()[0]                # the lr this step used
            scheduler.step()
            if ema is not None:
                ema_update(ema, model, args.ema_decay)
            step, batch_done = step + 1, batch_done + 1
            window.append((loss.item(), parts["asl"], parts["otl"]))
            losses.append(window[-1][0])
            if step % every == 0 or batch_done == steps_per_epoch or step == stop:
                now = time.time()
                rate = len(window) * args.batch_size / max(now - t_last, 1e-9)
                per_step = (clock["train_s"] + now - t0) / (clock["steps"] + len(losses))
                evals_left = math.ceil((stop - step) / steps_per_epoch) + 1
                eta = (stop - step) * per_step + evals_left * clock["eval_s"]
                l, a, o = np.mean(window, axis=0)
                log(f"epoch {epoch + 1}/{args.epochs} step {step}/{stop} | loss {l:.4f} (asl {a:.3f} "
                    f"otl {o:.3f}) | lr {lr:.2e} | {rate:.0f} img/s | "
                    f"ETA {format_time(eta)}")
                t_last, window = now, []
            if step == stop:
                break
        train_s, cpu_s = time.time() - t0, time.process_time() - cpu0
        clock["train_s"], clock["steps"] = clock["train_s"] + train_s, clock["steps"] + len(losses)
        rngs = gather_objects(rng_state(device), world)   # the RNG state the next step starts from
        finished = batch_done == steps_per_epoch
        if finished:
            epoch, batch_done = epoch + 1, 0

        t1 = time.time()
        reports, per_class, rows = validate(model, ema, val_set, args, device, dtype, rank, world)
        clock["eval_s"] = time.time() - t1
        which = max(reports, key=lambda k: reports[k]["mAP"])     # ASL: the better of plain and EMA
        score = reports[which]["mAP"]
        if rank == 0:
            label = f"epoch {epoch}" if finished else f"step {step}"
            log(table(f"{label} val", reports) + f"\n  -> {which}: {format_report(reports[which])}")
            append_jsonl(out, {"kind": "epoch", "epoch": epoch, "step": step, "finished_epoch": finished,
                               "mAP": score, "best_of": which, "val_rows": rows,
                               "train_loss": float(np.mean(losses)) if losses else None,
                               "train_img_per_s": len(losses) * args.batch_size / train_s,
                               "train_s": train_s, "train_cpu_s": cpu_s, "eval_s": clock["eval_s"],
                               "lr": lr, **reports,
                               "AP_per_class": dict(zip(classes, per_class[which]))})
            state = {"model": model.state_dict(), "ema": None if ema is None else ema.state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "epoch": epoch, "batch": batch_done, "step": step,
                     "rng": rngs, "config": dataclasses.asdict(cfg), "args": vars(args),
                     "classes": classes, "best_map": max(best, score), "best_of": which,
                     "metrics": reports}
            save_checkpoint(state, os.path.join(out, "last.pt"))
            if score > best:
                save_checkpoint(state, os.path.join(out, "best.pt"))
        best = max(best, score)
    if per_class is not None:
        log(class_line(classes, per_class, reports))
    log(f"done at step {step}: best val mAP {best:.2f}; checkpoints in {out}")
    return best


def class_line(classes, per_class, reports):
    which = max(reports, key=lambda k: reports[k]["mAP"])
    return f"AP per class ({which}): " + ", ".join(
        f"{c} {'-' if ap is None else f'{ap:.1f}'}" for c, ap in zip(classes, per_class[which]))


def append_jsonl(out, record):
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def validate(model, ema, val, args, device, dtype, rank, world):
    """-> ({"model": report, "ema": report}, {"model": AP per class, ...}, number of rows gathered)."""
    reports, per_class, rows = {}, {}, 0
    for name, m in (("model", model), ("ema", ema)):
        if m is not None:
            scores, targets, sizes, counts = evaluate(m, val, args, device, dtype, rank, world)
            reports[name], rows = report(scores, targets, sizes, counts, args.threshold), len(scores)
            per_class[name] = [None if math.isnan(a) else a for a in average_precision(scores, targets).tolist()]
    return reports, per_class, rows


def gather_objects(obj, world):
    if world == 1:
        return [obj]
    objs = [None] * world
    dist.all_gather_object(objs, obj)
    return objs


def format_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# -----------------------------------------------------------------------------
# Inference: python train.py predict --checkpoint CKPT IMAGE...

def predict(argv):
    ap = argparse.ArgumentParser(
        prog="train.py predict",
        description="Print, per image, the labels whose probability reaches --threshold and the "
                    "number of classes predicted by the object-token head (argmax of Eq. 17's softmax).")
    ap.add_argument("--checkpoint", required=True, help="a last.pt / best.pt written by train.py")
    ap.add_argument("images", nargs="+", help="image files (any format Pillow reads)")
    ap.add_argument("--threshold", type=float, default=0.5, help="probability threshold (default %(default)s)")
    ap.add_argument("--weights", choices=["best", "model", "ema"], default="best",
                    help="best (default) = the one, plain or EMA, that scored higher at that checkpoint")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                    help="auto (default) = cuda if available")
    ap.error = lambda message: _usage_error(message)
    args = ap.parse_args(argv)
    ck = load_checkpoint(args.checkpoint)
    which = ck.get("best_of", "model") if args.weights == "best" else args.weights
    if ck.get(which) is None:
        raise UsageError(f"checkpoint {args.checkpoint} holds no {which} weights; use --weights model")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible to PyTorch; use --device cpu")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    try:
        cfg = mitr.MITrConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ck["config"].items()})
    except TypeError as e:
        raise UsageError(f"checkpoint {args.checkpoint} has a config this mitr.py does not know ({e})") from None
    classes = list(ck["classes"])
    model = mitr.MITr(cfg, len(classes))
    load_weights(model, ck[which], args.checkpoint, which)
    model.to(device).eval()
    transform = data.build_transform(cfg.img_size, train=False)
    images = [transform(read_image(p)) for p in args.images]   # all read before any output
    probs, counts = [], []
    with torch.no_grad():
        for i in range(0, len(images), 64):
            class_logits, count_logits = model(torch.stack(images[i:i + 64]).to(device))
            probs += torch.sigmoid(class_logits.float()).cpu()
            counts += [None] * len(class_logits) if count_logits is None else count_logits.argmax(-1).tolist()
    results = []
    for path, p, n in zip(args.images, probs, counts):
        labels = [(classes[j], float(p[j])) for j in p.argsort(descending=True).tolist() if p[j] >= args.threshold]
        results.append({"image": path, "labels": labels, "count": n})
        shown = ", ".join(f"{name} {q:.3f}" for name, q in labels) or "(none above threshold)"
        print(f"{path}: {shown} | predicted number of classes: {'n/a' if n is None else n}")
    return results


def read_image(path):
    """An upright RGB PIL image (data.load_image), or a one-line UsageError naming the file."""
    if not os.path.isfile(path):
        raise UsageError(f"image {path} does not exist; pass paths of image files")
    try:
        return data.load_image(path)
    except data.DataError as e:
        raise UsageError(f"{e}; pass image files that Pillow can open") from None


# -----------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    rank = int(os.environ.get("RANK", 0))
    try:
        if argv[:1] == ["predict"]:
            return predict(argv[1:])
        return train(argv)
    except (UsageError, data.DataError) as e:
        if rank == 0:
            print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if rank == 0:
            print("train.py: interrupted; checkpoints already written are intact (last.pt = the last "
                  "finished epoch): continue with --resume RUN/last.pt", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
