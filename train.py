"""Train, evaluate and run MITr (Section 4.1 of the paper) on one CPU, one GPU or many.

    python train.py                                   # the embedded default: MITr-tiny on Shapes, CPU
    python train.py --data coco --data-dir /data/coco --variant s --init swin_tiny_patch4_window7_224.pth
    torchrun --nproc_per_node=8 train.py --data coco --data-dir /data/coco --variant s ...
    python train.py --resume runs/RUN/last.pt [--eval-only]   # continue a run (in a new folder) or evaluate it
    python train.py predict --checkpoint runs/RUN/best.pt cat.jpg dog.png

The recipe (Section 4.1 and the ASL code it follows): Adam, one-cycle lr peaking at 1e-4, weight decay 1e-4
on weights only, Eq. 18's loss, Cutout + RandAugment, an EMA of the weights (validation reports the better).
Nothing is lost: every run, a resumed one too, claims a NEW folder, so resuming an older best.pt cannot
overwrite the newer last.pt beside it; best.pt is written before last.pt, each renamed into place. Resume is
exact at epoch boundaries (a run stopped mid-epoch resumes from its last finished one), with the checkpoint's
settings: only RESUME_FLAGS may differ. Bad input: one line on stderr, exit 2 (data.InputError).
"""

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset

import data
import mitr
from data import InputError
from losses import mitr_loss
from metrics import format_report, multilabel_report

log = print if int(os.environ.get("RANK", 0)) == 0 else (lambda *a, **k: None)  # only rank 0 speaks

# --- Settings that depend on --data: Section 4.1's recipe (COCO, VOC, NUS-WIDE), and the Shapes default.
PAPER = dict(
    variant="s",
    epochs=200,
    batch_size=128,
    lr=1e-4,
    workers=8,
    ema_decay=0.9997,
    num_train=0,
    num_val=0,
    randaug=[2, 9],
    cutout=0.5,
)
# Paper: "the initial learning rate is 1e-4", 200 epochs, batch size not given. Here: 1e-4 is
# the one-cycle peak (ASL's max_lr), batch 128 as ASL's train.py.
SHAPES = dict(
    variant="tiny",
    epochs=8,
    batch_size=64,
    lr=1e-3,
    workers=0,
    ema_decay=0.99,
    num_train=10000,
    num_val=1000,
    randaug=[0, 0],
    cutout=0.0,
)
# Not from the paper: the tiny model from scratch in ~10 minutes of a 2-core CPU. Why each value:
#  - lr 1e-3: no pretraining and 1248 steps; 2e-3 collapsed to chance after its first epoch.
#  - no Cutout/RandAugment: 10k images seen 8 times need little regularising; augmented, mAP was 22 vs 44.
#  - EMA 0.99 (~100 steps): 0.9997 averages over ~3300 steps, more than the whole run.
#  - workers 0: an image costs ~1 ms to draw, ~12 ms to train on; a worker would fight for the cores.
# A resumed run may change where and how it runs, not what (not --epochs: the one-cycle spans them all).
RESUME_FLAGS = [
    "data_dir",
    "workers",
    "device",
    "amp",
    "compile",
    "threshold",
    "out",
    "eval_only",
    "resume",
]
FLAGS = dict(  # every flag: (default, help); None for those in PAPER / SHAPES; True -> --no-X
    data=("shapes", "dataset; shapes is generated on the fly"),
    variant=(None, "MITr variant (Table 1)"),
    data_dir=(None, "dataset root (README, 'Datasets', gives each layout); not for shapes"),
    num_train=(None, "shapes: images to generate; others: use the first N (0 = all)"),
    num_val=(None, "validation images, as --num-train"),
    img_size=(None, "input side (default: variant's)"),
    randaug=(None, "RandAugment: N ops at magnitude M of 30"),
    cutout=(None, "Cutout probability per image"),
    init=(None, "start from Swin weights (official or timm .pth), via mitr.load_swin"),
    init_nonstrict=(False, "with --init: load what fits and list the rest, instead of stopping"),
    pos_embed=(True, "Table 5: no relative position bias"),
    shift=(True, "Table 5: no shifted windows"),
    cross_window=(True, "Table 5: no cross-window blocks (Eq. 3-4)"),
    arc_sigmoid=(True, "Table 5: linear head (Eq. 11) instead of the arc sigmoid (Eq. 13)"),
    object_token=(True, "Table 5: no object-aware token and its loss (Eq. 17)"),
    epochs=(None, "epochs"),
    batch_size=(None, "GLOBAL batch, split over the processes"),
    lr=(None, "peak lr of the one-cycle schedule"),
    ema_decay=(None, "EMA decay per step (0 = no EMA)"),
    weight_decay=(1e-4, "Adam (L2) decay on weights; not norms, biases, bias tables, tokens"),
    gamma_pos=(0.0, "ASL gamma+ (Eq. 15)"),
    gamma_neg=(4.0, "ASL gamma- (Eq. 16)"),
    clip=(0.05, "ASL probability margin m (Eq. 16)"),
    arc_scale=(8.0, "s of the arc sigmoid (Eq. 13)"),
    device=("auto", "auto = cuda if available, else cpu"),
    workers=(None, "DataLoader workers per process"),
    amp=("auto", "autocast: auto = bf16 on CUDA, off on CPU; fp16 adds a GradScaler"),
    compile=(False, "torch.compile for training"),
    seed=(0, "seed of weights, shuffling, augmentation"),
    out=(None, "run folder, must not exist yet (default runs/<data>-<variant>-<time>-<pid>)"),
    resume=(
        None,
        "continue a last.pt/best.pt from the end of its epoch, in a new folder, with its "
        "settings; only --"
        + ", --".join(k.replace("_", "-") for k in RESUME_FLAGS[:-1])
        + " may change",
    ),
    eval_only=(False, "evaluate the --resume checkpoint (or --init weights); writes nothing"),
    threshold=(0.5, "probability from which a label counts as predicted (CP ... OF1)"),
)
DEFAULTS = {k: d for k, (d, _) in FLAGS.items() if k not in SHAPES}
CHOICES = dict(
    data=data.DATASETS,
    variant=sorted(mitr.VARIANTS),
    device=("auto", "cuda", "cpu"),
    amp=("auto", "bf16", "fp16", "off"),
)
# The one place where numeric flags are checked: their ranges ("[a, b)": a <= v < b).
RANGES = dict(
    epochs="[1, inf)",
    batch_size="[1, inf)",
    num_train="[0, inf)",
    num_val="[0, inf)",
    workers="[0, inf)",
    seed="[0, 4294967296)",
    lr="(0, inf)",
    weight_decay="[0, inf)",
    gamma_pos="[0, inf)",
    gamma_neg="[0, inf)",
    clip="[0, 1)",
    arc_scale="(0, inf)",
    ema_decay="[0, 1)",
    threshold="(0, 1)",
    cutout="[0, 1]",
    randaug=("[0, inf)", "[0, 30]"),
)


def parser(prog, description):
    """An ArgumentParser whose errors are one InputError line pointing at this command's --help."""
    ap = argparse.ArgumentParser(prog=prog, description=description)

    def error(message):
        raise InputError(f"{message} (see python {prog} --help)")

    ap.error = error
    return ap


def check_args(args, prog="train.py"):
    """Every numeric flag against RANGES: one InputError line."""

    def ok(v, spec):
        lo, hi = (float(x) for x in spec[1:-1].split(","))
        return (lo <= v if spec[0] == "[" else lo < v) and (v <= hi if spec[-1] == "]" else v < hi)

    for key, spec in RANGES.items():
        v, specs = vars(args).get(key), spec if isinstance(spec, tuple) else (spec,)
        if v is not None and not all(map(ok, v if isinstance(spec, tuple) else [v], specs)):
            raise InputError(
                f"--{key.replace('_', '-')} {v} must be in {' and '.join(specs)} "
                f"(see python {prog} --help)"
            )


def parse_args(argv):
    """-> (args with every setting resolved, the --resume checkpoint or None). Defaults show in --help but are
    not set (SUPPRESS): `given` holds what was typed. A flag whose default is True is turned off by --no-X."""
    ap = parser(
        "train.py",
        "Train / evaluate MITr (Cheng et al., 2021). Defaults: Section 4.1 for "
        "--data coco|voc|nuswide, a ~10-minute CPU demo for --data shapes. Inference: `python "
        "train.py predict --help`. Many processes: `torchrun --nproc_per_node=N train.py ...`.",
    )
    for k, (d, text) in FLAGS.items():
        d = SHAPES.get(k, d)
        kw = dict(dest=k, default=argparse.SUPPRESS)
        if isinstance(d, bool):
            kw["action"] = "store_false" if d else "store_true"
        elif isinstance(d, list):
            kw.update(type=int, nargs=2, metavar=("N", "M"))
        else:
            kw.update(
                type=int if k == "img_size" else str if d is None else type(d),
                choices=CHOICES.get(k),
            )
        if k in SHAPES:
            text += f" (default {SHAPES[k]} for shapes, {PAPER[k]} otherwise)"
        elif d is not None and not isinstance(d, bool):
            text += f" (default {d})"
        ap.add_argument(f"--{'no-' if d is True else ''}{k.replace('_', '-')}", help=text, **kw)
    given = vars(ap.parse_args(argv))
    ck = load_checkpoint(given["resume"]) if "resume" in given else None
    saved = {k: v for k, v in ck["args"].items() if k not in RESUME_FLAGS} if ck else {}
    for k in sorted(k for k in given if k in saved and given[k] != saved[k]):
        flag = "--" + k.replace("_", "-")
        raise InputError(
            f"{flag} {given[k]} differs from checkpoint {given['resume']} ({flag} {saved[k]}): "
            f"a resumed run keeps its settings; drop {flag}, or start a new run (--init for Swin)"
        )
    preset = SHAPES if saved.get("data", given.get("data", "shapes")) == "shapes" else PAPER
    args = argparse.Namespace(**{**DEFAULTS, **preset, **saved, **given})
    base = mitr.VARIANTS[args.variant]
    args.img_size = base.img_size if args.img_size is None else args.img_size
    check_args(args)
    if not (args.img_size > 0 and mitr.valid_image_size(base, args.img_size)):
        fits = [s for s in range(32, 1025, 32) if mitr.valid_image_size(base, s)]
        raise InputError(
            f"--img-size {args.img_size} does not fit MITr-{args.variant}'s windows; sides "
            f"that do: {', '.join(map(str, fits[:4]))}, ... (see python train.py --help)"
        )
    if args.eval_only and not (args.resume or args.init):
        raise InputError(
            "--eval-only needs a model to evaluate: --resume CHECKPOINT or --init WEIGHTS"
        )
    if args.data != "shapes" and not args.data_dir:
        raise InputError(
            f"--data {args.data} needs --data-dir (README, 'Datasets', gives the layout)"
        )
    return args, ck


def model_config(args):
    """Table 1's variant with this run's resolution and Table 5's switches."""
    switches = (
        "img_size",
        "arc_scale",
        "pos_embed",
        "shift",
        "cross_window",
        "arc_sigmoid",
        "object_token",
    )
    return dataclasses.replace(
        mitr.VARIANTS[args.variant], **{k: getattr(args, k) for k in switches}
    )


def param_groups(model, weight_decay):
    """Adam groups. Paper: silent on weight decay. Here: ASL's 1e-4 as Adam's (L2) decay, on weights only:
    not norms or biases (ASL; all 1-D), nor bias tables and the token (Swin's no-decay list)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim <= 1 or "relative_position_bias_table" in name or name == "object_token"
        (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def one_cycle(step, total, peak, pct=0.2):
    """-> (lr, Adam beta1) at step `step` (0-based) of `total`: cosine from peak/25 up to peak at step
    pct*total - 1, then down to peak/25/1e4 at the last; beta1 0.95 -> 0.85 -> 0.95. Paper: "one-circle [41]
    learning rate scheduler as tresnet". Here: OneCycleLR as ASL calls it, written out (fails at 5 steps)."""
    up = pct * total - 1
    if 0 < up and step <= up:
        t, lr0, lr1, b0, b1 = step / up, peak / 25, peak, 0.95, 0.85
    else:
        t, lr0, lr1, b0, b1 = (step - up) / (total - 1 - up), peak, peak / 25 / 1e4, 0.85, 0.95
    cos = (1 + math.cos(math.pi * t)) / 2  # 1 -> 0 as t goes 0 -> 1
    return lr1 + (lr0 - lr1) * cos, b1 + (b0 - b1) * cos


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema = decay * ema + (1 - decay) * model, after every step. Paper: no EMA. Here: ASL's ModelEma."""
    for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
        e.lerp_(m, 1.0 - decay) if e.dtype.is_floating_point else e.copy_(m)


# --- Files: the run folder, checkpoints (atomic, weights_only), the log
TMP = ".checkpoint.tmp"  # a folder's one temporary file: each checkpoint write replaces it
CKPT_KEYS = (
    "model",
    "ema",
    "optimizer",
    "scaler",
    "epoch",
    "step",
    "args",
    "classes",
    "best_map",
    "best_of",
)


@contextlib.contextmanager
def disk_errors(what):
    """An OSError while creating or writing (full disk, read-only, a file in the way) -> one line."""
    try:
        yield
    except OSError as e:
        raise InputError(
            f"cannot write {what} ({e.strerror or e}: {e.filename}); free disk space or "
            "use another --out"
        ) from None


def claim_out(args):
    """Create the run folder by an exclusive os.mkdir, so no two runs share one (default name: time, pid)."""
    out = (
        args.out
        if args.out is not None
        else os.path.join(
            "runs",
            f"{args.data}-{args.variant}-{datetime.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}",
        )
    )
    if not out.strip() or os.path.lexists(out):
        raise InputError(f"--out '{out}' is empty or already exists: every run needs a new folder")
    with disk_errors(f"--out {out}"):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        os.mkdir(out)  # exclusive: FileExistsError if another run won
    return out


def save_checkpoint(state, path):
    """Write the folder's TMP file, then rename it over `path` (atomic): the old file stays until then."""
    tmp = os.path.join(os.path.dirname(path), TMP)
    with disk_errors(path):
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def load_checkpoint(path, what="checkpoint", keys=CKPT_KEYS):
    """torch.load(weights_only=True) -> the dict, or one InputError line naming the file."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated, not torch's, foreign pickle
        raise InputError(
            f"cannot read {what} {path} ({type(e).__name__}): missing, truncated, not a torch "
            "file, or holding more than tensors and plain values"
        ) from None
    missing = [k for k in keys if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise InputError(
            f"{what} {path} lacks {', '.join(missing)}: not from train.py (Swin weights: --init)"
        )
    return ck


def load_weights(model, state, path, what="model"):
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # its second line names the first misfit
        raise InputError(
            f"checkpoint {path}: its {what} weights do not fit the model it describes "
            f"({str(e).splitlines()[1].strip()[:160]}); use one written by train.py"
        ) from None


def append_jsonl(out, record):
    with (
        disk_errors(os.path.join(out, "log.jsonl")),
        open(os.path.join(out, "log.jsonl"), "a") as f,
    ):
        f.write(json.dumps(record) + "\n")


# --- Training and evaluation
def setup(argv):
    """Everything a run needs, as one namespace: args, processes, device, data, model, EMA, optimizer."""
    args, ck = parse_args(argv)
    world, rank = (
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("RANK", 0)),
    )  # from torchrun
    cuda = args.device != "cpu" and torch.cuda.is_available()
    if (args.device == "cuda" or args.amp == "fp16") and not cuda:
        raise InputError(
            f"--device {args.device} --amp {args.amp}: no CUDA device (none visible to PyTorch, "
            "or --device cpu); use --device cpu with --amp bf16 or off"
        )
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    torch.cuda.set_device(device) if cuda else None
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        if not cuda and "OMP_NUM_THREADS" not in os.environ:  # the processes share the cores
            torch.set_num_threads(
                max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
            )
    if args.batch_size % world:
        raise InputError(
            f"--batch-size {args.batch_size} is the global batch: make it divisible by {world}"
        )
    # Paper: silent on precision. Here: bf16 autocast on CUDA (ASL: fp16 AMP; bf16 needs no scaling).
    amp = {"auto": "bf16" if cuda and torch.cuda.is_bf16_supported() else "off"}.get(
        args.amp, args.amp
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]  # of autocast
    # The val images are checked now (not after an epoch); Shapes' are drawn once (not per model and epoch).
    sets = []
    for split, n in (("train", args.num_train), ("val", args.num_val)):
        ds = data.build_dataset(
            args.data,
            args.data_dir,
            split,
            args.img_size,
            split == "train",
            tuple(args.randaug),
            args.cutout,
            n if args.data == "shapes" else None,
        )
        sets.append(Subset(ds, range(min(n, len(ds)))) if n and args.data != "shapes" else ds)
    data.verify_images(sets[1])
    train_set, classes = sets[0], list(ds.classes)
    val_set = [sets[1][i] for i in range(len(sets[1]))] if args.data == "shapes" else sets[1]
    if ck is not None and list(ck["classes"]) != classes:
        raise InputError(
            f"checkpoint {args.resume} was trained on {len(ck['classes'])} classes, this "
            f"data has {len(classes)} ({', '.join(classes[:3])}, ...): resume on the same dataset"
        )
    if len(val_set) < world:
        raise InputError(f"{len(val_set)} validation images for {world} processes; use more images")
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = mitr.MITr(model_config(args), len(classes))
    if ck is not None:
        load_weights(model, ck["model"], args.resume)
    elif args.init:  # Section 4.1's ImageNet-pretrained start
        swin = load_checkpoint(args.init, "--init", keys=())
        try:
            report = mitr.load_swin(model, swin, strict=not args.init_nonstrict)
        except ValueError as e:
            raise InputError(f"--init {args.init}: {e}") from None
        log(f"--init {args.init}\n" + mitr.format_swin_report(report))
    ema = None  # no EMA, or nothing to average yet
    if args.ema_decay > 0 and not (args.eval_only and ck is None):
        ema = copy.deepcopy(model).eval().requires_grad_(False).to(device)
        if ck is not None:
            load_weights(ema, ck["ema"], args.resume, "EMA")
    optimizer = torch.optim.Adam(param_groups(model.to(device), args.weight_decay), lr=args.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if ck is not None and not args.eval_only:
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
    net = DDP(model, device_ids=[device] if device.type == "cuda" else None) if world > 1 else model
    return argparse.Namespace(
        args=args,
        ck=ck,
        device=device,
        rank=rank,
        world=world,
        dtype=dtype,
        classes=classes,
        train_set=train_set,
        val_set=val_set,
        model=model,
        ema=ema,
        optimizer=optimizer,
        scaler=scaler,
        net=torch.compile(net) if args.compile else net,
        epoch=0 if ck is None else ck["epoch"],
    )


def train_epoch(r, loader, epoch, step, total, t_start):
    """One pass over the training data -> (step, {lr: the last step's, train_loss, train_img_per_s})."""
    a, every, losses, t0 = r.args, max(1, len(loader) // 5), [], time.time()
    # Randomness is a function of (seed, epoch, rank): shuffle, augmentation (workers too), stochastic depth.
    loader.sampler.set_epoch(epoch)
    torch.manual_seed(int(np.random.SeedSequence([a.seed, epoch, r.rank]).generate_state(1)[0]))
    r.net.train()
    for i, (images, targets, _) in enumerate(loader):
        lr, beta1 = one_cycle(step, total, a.lr)
        for g in r.optimizer.param_groups:
            g["lr"], g["betas"] = lr, (beta1, g["betas"][1])
        with torch.autocast(
            r.device.type, dtype=r.dtype or torch.float32, enabled=r.dtype is not None
        ):
            class_logits, count_logits = r.net(images.to(r.device, non_blocking=True))
        loss, parts = mitr_loss(
            class_logits,
            count_logits,
            targets.to(r.device),  # Eq. (18)
            a.gamma_pos,
            a.gamma_neg,
            a.clip,
        )
        mean = loss.detach().clone()
        if r.world > 1:  # all ranks see the same loss: all stop together
            dist.all_reduce(mean)
            mean /= r.world
        if not math.isfinite(mean.item()):
            raise InputError(
                f"the loss is {mean.item()} at step {step + 1} (epoch {epoch + 1}); lower "
                f"--lr (now {a.lr:g}) or use --amp off"
            )
        r.optimizer.zero_grad(set_to_none=True)
        r.scaler.scale(loss).backward()
        r.scaler.step(r.optimizer)
        r.scaler.update()
        if r.ema is not None:
            ema_update(r.ema, r.model, a.ema_decay)
        step += 1
        losses.append((mean.item(), parts["asl"], parts["otl"]))
        if (i + 1) % every == 0 or i + 1 == len(loader):
            now, (l, asl, otl) = time.time(), np.mean(losses[-every:], axis=0)
            eta = (
                (now - t_start) / (step - r.epoch * len(loader)) * (total - step)
            )  # validations included
            log(
                f"epoch {epoch + 1}/{a.epochs} step {step}/{total} | loss {l:.4f} (asl {asl:.3f} otl "
                f"{otl:.3f}) | lr {lr:.2e} | {(i + 1) * a.batch_size / (now - t0):.0f} img/s | ETA "
                f"{datetime.timedelta(seconds=round(eta))}"
            )
    return step, {
        "lr": lr,
        "train_loss": float(np.mean(losses, axis=0)[0]),
        "train_img_per_s": len(loader) * a.batch_size / (time.time() - t0),
    }


@torch.no_grad()
def validate(r, title):
    """Score the whole val set with the model and its EMA, print the table -> ({"model": report, "ema":
    report}, the better (as ASL), rows). Rank k scores items k, k + world, ...; gathered in dataset order."""
    index, reports = range(r.rank, len(r.val_set), r.world), {}
    loader = DataLoader(
        r.val_set, 2 * r.args.batch_size // r.world, sampler=index, num_workers=r.args.workers
    )
    for name, model in [
        (n, m.eval()) for n, m in (("model", r.model), ("ema", r.ema)) if m is not None
    ]:
        cols = [[], [], [], []]  # probabilities (N, K), targets, sizes (N, K), counts (N,)
        for images, targets, sizes in loader:
            with torch.autocast(
                r.device.type, dtype=r.dtype or torch.float32, enabled=r.dtype is not None
            ):
                class_logits, count_logits = model(images.to(r.device, non_blocking=True))
            counts = (
                torch.full((len(images),), -1) if count_logits is None else count_logits.argmax(-1)
            )
            for col, x in zip(cols, (torch.sigmoid(class_logits.float()), targets, sizes, counts)):
                col.append(x.cpu())
        shards = [(torch.tensor(index), [torch.cat(c) for c in cols])] * r.world
        if r.world > 1:  # every rank's (index, columns), in rank order
            dist.all_gather_object(shards, shards[0])
        order = torch.cat([i for i, _ in shards]).argsort()  # (N,): where each item's row is
        scores, targets, sizes, counts = (
            torch.cat([cs[k] for _, cs in shards])[order] for k in range(4)
        )
        reports[name] = multilabel_report(
            scores, targets, r.args.threshold, sizes=sizes if (sizes > 0).any() else None
        )
        if (counts >= 0).all():  # the count head's accuracy (Eq. 17's z, argmax)
            reports[name]["count_acc"] = 100.0 * float(
                (counts == (targets == 1).sum(1)).float().mean()
            )
    log("\n".join(f"{title} {k:>5}: {format_report(v)}" for k, v in reports.items()))
    return reports, max(reports, key=lambda k: reports[k]["mAP"]), len(scores)


def train(argv):
    r = setup(argv)
    a = r.args
    if a.eval_only:  # print the table, write nothing
        return validate(r, f"eval ({len(r.val_set)} images)")[0]
    loader = DataLoader(
        r.train_set,
        a.batch_size // r.world,
        drop_last=True,
        num_workers=a.workers,
        sampler=DistributedSampler(r.train_set, r.world, r.rank, seed=a.seed, drop_last=True),
        pin_memory=r.device.type == "cuda",
    )
    if len(loader) == 0:
        raise InputError(
            f"{len(r.train_set)} training images make no full batch of {a.batch_size}; "
            "lower --batch-size or use more images"
        )
    out = claim_out(a) if r.rank == 0 else None
    if out and r.ck is not None and os.path.exists(os.path.join(os.path.dirname(a.resume), TMP)):
        os.remove(os.path.join(os.path.dirname(a.resume), TMP))  # left there by a killed save
    total, step, best, t_start = a.epochs * len(loader), r.epoch * len(loader), -1.0, time.time()
    if out:
        append_jsonl(
            out,
            {
                "kind": "resume" if r.ck else "config",
                "step": step,
                "args": vars(a),
                "world_size": r.world,
                "device": str(r.device),
            },
        )
    log(
        f"MITr-{a.variant} on {len(r.train_set)} train / {len(r.val_set)} val images, {r.world} process(es) "
        f"on {r.device}; {len(loader)} steps/epoch x {a.epochs} epochs from step {step}; run folder {out}"
    )
    try:
        for epoch in range(r.epoch, a.epochs):
            step, stats = train_epoch(r, loader, epoch, step, total, t_start)
            reports, which, rows = validate(r, f"epoch {epoch + 1} val")
            score = reports[which]["mAP"]
            if out:
                append_jsonl(
                    out,
                    {
                        "kind": "epoch",
                        "epoch": epoch + 1,
                        "step": step,
                        "mAP": score,
                        "best_of": which,
                        "val_rows": rows,
                        **stats,
                        **reports,
                    },
                )
                state = {
                    "model": r.model.state_dict(),
                    "ema": r.ema and r.ema.state_dict(),
                    "optimizer": r.optimizer.state_dict(),
                    "scaler": r.scaler.state_dict(),
                    "epoch": epoch + 1,
                    "step": step,
                    "args": vars(a),
                    "classes": r.classes,
                    "best_map": max(best, score),
                    "best_of": which,
                    "metrics": reports,
                }
                if score > best:  # best.pt first: last.pt never records a best that best.pt lacks
                    save_checkpoint(state, os.path.join(out, "best.pt"))
                save_checkpoint(state, os.path.join(out, "last.pt"))
            best = max(best, score)
    except (InputError, KeyboardInterrupt) as e:  # say what is left and how to go on
        last = os.path.join(out or "", "last.pt")
        hint = (
            f"the last good checkpoint is kept: continue with --resume {last}"
            if os.path.exists(last)
            else f"no epoch finished, nothing to resume: start again with a new --out or delete {out}"
        )
        raise type(e)("; ".join(filter(None, [str(e).strip(), hint]))) from None
    log(f"done at step {step}: best val mAP {best:.2f}; checkpoints in {out}")
    return best


@torch.no_grad()
def predict(argv):
    ap = parser(
        "train.py predict",
        "Print, per image, the labels whose probability reaches --threshold "
        "and the number of classes the object-token head predicts (argmax of Eq. 17's softmax).",
    )
    ap.add_argument("--checkpoint", required=True, help="a last.pt / best.pt written by train.py")
    ap.add_argument("images", nargs="+", help="image files (JPEG or PNG)")
    ap.add_argument(
        "--threshold", type=float, default=0.5, help="probability threshold (default 0.5)"
    )
    args = ap.parse_args(argv)
    check_args(args, "train.py predict")
    ck = load_checkpoint(args.checkpoint)
    saved = argparse.Namespace(**{**DEFAULTS, **ck["args"]})
    model = mitr.MITr(model_config(saved), len(ck["classes"]))
    load_weights(
        model, ck[ck["best_of"]], args.checkpoint, ck["best_of"]
    )  # the better: plain or EMA
    transform = data.build_transform(saved.img_size, train=False)
    images = torch.stack([transform(data.load_image(p)) for p in args.images])  # all read first
    class_logits, count_logits = model.eval()(images)  # (N, K), (N, K + 1)
    counts = [None] * len(images) if count_logits is None else count_logits.argmax(-1).tolist()
    results = []
    for path, p, n in zip(args.images, torch.sigmoid(class_logits), counts):
        labels = [
            (ck["classes"][j], float(p[j]))
            for j in p.argsort(descending=True)
            if p[j] >= args.threshold
        ]
        results.append({"image": path, "labels": labels, "count": n})
        shown = ", ".join(f"{name} {q:.3f}" for name, q in labels) or "(none above threshold)"
        print(f"{path}: {shown} | predicted number of classes: {'n/a' if n is None else n}")
    return results


def main(argv=None):
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    try:
        return predict(argv[1:]) if argv[:1] == ["predict"] else train(argv)
    except InputError as e:  # one line, from a DataLoader worker too
        log(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        log("train.py: interrupted" + (f"; {e}" if str(e) else ""), file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
