"""Speed of MITr (issue 9): images/s, peak memory, achieved FLOP/s, the share of cross-window
attention (CWA), MITr against its Swin twin, the data pipeline, and torch.compile graph breaks.

    python bench.py                       # CPU: tiny and s, eager fp32 (about 2-3 minutes, 2 cores)
    python bench.py --compile             # + torch.compile rows and the graph-break check (slow on CPU)
    python bench.py --hotpath             # + micro-benchmarks of the copies in mitr.py's hot path
    python bench.py --variants s --batches 8 --modes eager-bf16 --json bench_s.json
    python bench.py --threads 1           # on a busy machine (an oversubscribed pool is ~10x slower)

On CUDA the defaults are all four variants in eager fp32, eager bf16 autocast and compiled bf16.

Conventions, printed with the table:
  * FLOPs are counted by mitr.count_flops (torch.utils.flop_counter, matmuls / convs / attention;
    not LayerNorm, softmax, GELU) and reported in MACs (multiply-adds), as the paper and Swin count
    "FLOPs". Achieved rates are real FLOP/s = 2 x MAC/s, comparable with a device's peak.
    A training step is taken as 3x the forward MACs (backward = 2x forward), the usual convention.
  * "fwd" = inference: eval mode, torch.inference_mode, one forward. "train" = one training step
    as train.py runs it: train mode (stochastic depth on), forward, mitr_loss (Eq. 18, with its one
    host sync), backward, Adam step (the paper's optimizer), zero_grad.
  * Times: warm-up calls, then --repeats samples of enough calls to last --min-time each
    (torch.cuda.synchronize around every sample), and the median sample. Where two models are
    compared (MITr vs its Swin twin) their samples are interleaved, so machine noise hits both.
  * Peak memory: CUDA torch.cuda.max_memory_allocated over one call after warm-up. CPU: the
    process's peak RSS (ru_maxrss) after that call. It only ever grows, so a CPU row shows the
    largest footprint of the run so far (rows run in increasing batch order).
  * Data pipeline: one process, one torch thread (as a DataLoader worker), images/s.
  * --hotpath micro-benchmarks report the best sample (as timeit does), in ms per call.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data
import mitr
from losses import mitr_loss
from mitr import MITr, VARIANTS, CrossWindowAttention, count_flops, num_params

try:
    import resource                      # POSIX only; CPU peak memory is left out without it
except ImportError:                      # pragma: no cover
    resource = None

MODES = ("eager-fp32", "eager-bf16", "compile-fp32", "compile-bf16")
DEFAULT_BATCHES = {
    "cpu": {"tiny": (1, 8, 32), "s": (1, 4), "m": (1, 2), "l": (1, 2)},
    "cuda": {"tiny": (1, 64, 256), "s": (1, 16, 64), "m": (1, 16, 64), "l": (1, 16, 64)},
}
NUM_CLASSES = 80                         # COCO


# -----------------------------------------------------------------------------
# Timing and memory

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fns, device, warmup=1, repeats=3, min_time=0.5):
    """fns {name: f()} -> {name: {"s": median seconds per call, "min_s": best, "first_s": first call}}.

    Each f gets `warmup` untimed calls (the first one's time is kept: it holds torch.compile's
    compilation), then `repeats` samples of n calls, n chosen from the last warm-up call so a
    sample lasts about min_time. Samples of the different fns are interleaved."""
    first, last = {}, {}
    for name, f in fns.items():
        for w in range(max(warmup, 1)):
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            last[name] = time.perf_counter() - t0
            first.setdefault(name, last[name])
    n = {k: max(1, math.ceil(min_time / max(t, 1e-6))) for k, t in last.items()}
    samples = {k: [] for k in fns}
    for _ in range(max(repeats, 1)):
        for name, f in fns.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(n[name]):
                f()
            sync(device)
            samples[name].append((time.perf_counter() - t0) / n[name])
    return {k: {"s": statistics.median(v), "min_s": min(v), "first_s": first[k]} for k, v in samples.items()}


def peak_memory_mib(f, device):
    """Peak memory of one call of f (CUDA: allocated by torch; CPU: process peak RSS so far)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        f()
        sync(device)
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    f()
    if resource is None:
        return float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss    # KiB on Linux, bytes on macOS
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10


def rate(f, seconds, at_least=3):
    """Calls per second of f over about `seconds` (after one warm-up call)."""
    f()
    k, t0 = 0, time.perf_counter()
    while k < at_least or time.perf_counter() - t0 < seconds:
        f()
        k += 1
    return k / (time.perf_counter() - t0)


# -----------------------------------------------------------------------------
# Model steps

def autocast(device, mode):
    if mode.endswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build(variant, device, cross_window=True, seed=0):
    torch.manual_seed(seed)
    cfg = dataclasses.replace(VARIANTS[variant], cross_window=cross_window)
    return MITr(cfg, NUM_CLASSES).to(device)


def compiled(model, fullgraph=True):
    # dynamic=False: one static graph per batch size, as a training run with a fixed batch has.
    return torch.compile(model, dynamic=False, fullgraph=fullgraph)


def steps(model, run, batch, device, mode):
    """(forward, train_step) closures over fixed random inputs; `run` is model or compiled(model)."""
    S = model.config.img_size
    x = torch.randn(batch, 3, S, S, device=device)
    y = (torch.rand(batch, NUM_CLASSES, device=device) < 0.1).float()   # about 3 labels an image
    y[:, 0] = 1.0
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def forward():
        model.eval()
        with torch.inference_mode(), autocast(device, mode):
            run(x)

    def train_step():
        model.train()
        with autocast(device, mode):
            class_logits, count_logits = run(x)
        loss, _ = mitr_loss(class_logits, count_logits, y)             # Eq. (18)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return forward, train_step


def flops_summary(model):
    """Counted forward MACs per image, and the parts spent in cross-window attention (Eq. 9's
    operator alone) and in the whole cross-window blocks (+ their MLPs, Eq. 3-4)."""
    counts = count_flops(model)
    root = type(model).__name__
    cwa = sum(v for k, v in counts.items() if k.endswith(".cross_window_attention"))
    blocks = sum(v for k, v in counts.items() if re.search(r"\.cross_window_blocks\.\d+$", k))
    return {"mac": counts[root], "cwa_mac": cwa, "cw_blocks_mac": blocks,
            "analytic_mac": sum(mitr.analytic_flops(model.config, NUM_CLASSES).values())}


# -----------------------------------------------------------------------------
# Cross-window attention's share of the time
#
# Method: the CrossWindowAttention modules are timed in isolation on the exact inputs they get
# inside the model (shapes and dtypes caught by forward pre-hooks during one forward pass), in the
# same autocast mode: forward under inference_mode, and forward + backward (input and weight
# gradients) for training. Their sum over all CWA modules, divided by the whole model's forward
# or training-step time at the same batch, is CWA's share. Unlike forward hooks on the running
# model, this also covers the backward pass, needs no profiler (whose overhead distorts small
# ops), and works the same on CPU and CUDA. It misses only cache effects between neighbours. A
# second, independent estimate comes from MITr against its Swin twin (cross_window=False): the
# time difference is the share of the whole cross-window blocks (CWA + LayerNorms + MLP).

def module_inputs(model, types, batch, device, mode):
    """[(module, forward args)] for every module of `types`, as met in one forward pass."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append((mod, args)))
             for m in model.modules() if isinstance(m, types)]
    S = model.config.img_size
    try:
        model.eval()
        with torch.no_grad(), autocast(device, mode):
            model(torch.randn(batch, 3, S, S, device=device))
    finally:
        for h in hooks:
            h.remove()
    return seen


def cwa_inputs(model, batch, device, mode):
    """[(CrossWindowAttention module, input shape, input dtype)] as met in one forward pass."""
    return [(m, a[0].shape, a[0].dtype)
            for m, a in module_inputs(model, CrossWindowAttention, batch, device, mode)]


def time_cwa(model, batch, device, mode, args):
    """Seconds per forward and per forward+backward, summed over all CWA modules of the model."""
    fns = {}
    for i, (mod, shape, dtype) in enumerate(cwa_inputs(model, batch, device, mode)):
        x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
        with autocast(device, mode):
            g = torch.randn_like(mod(x))

        def fwd(mod=mod, x=x):
            with torch.inference_mode(), autocast(device, mode):
                mod(x)

        def fwd_bwd(mod=mod, x=x, g=g):
            with autocast(device, mode):
                out = mod(x)
            out.backward(g)
            x.grad = None

        fns[f"{i}/fwd"], fns[f"{i}/train"] = fwd, fwd_bwd
    if not fns:
        return {"fwd_s": 0.0, "train_s": 0.0, "modules": 0}
    t = measure(fns, device, args.warmup, args.repeats, args.min_time / 4)
    model.zero_grad(set_to_none=True)
    return {"fwd_s": sum(v["s"] for k, v in t.items() if k.endswith("/fwd")),
            "train_s": sum(v["s"] for k, v in t.items() if k.endswith("/train")),
            "modules": len(fns) // 2}


# -----------------------------------------------------------------------------
# torch.compile: graph breaks

def compile_check(model, device, batch=2):
    """torch._dynamo.explain in eval and train mode (graphs, breaks and where), and whether a
    fullgraph=True capture succeeds (dynamo only, backend "eager": inductor's code generation is
    timed by the compile rows, not here)."""
    import torch._dynamo as dynamo
    S = model.config.img_size
    x = torch.randn(batch, 3, S, S, device=device)
    out = {}
    for name, train in (("eval", False), ("train", True)):
        dynamo.reset()
        model.train(train)
        t0 = time.perf_counter()
        with (contextlib.nullcontext() if train else torch.no_grad()):
            e = dynamo.explain(model)(x)
        reasons = []
        for r in e.break_reasons:
            where = r.user_stack[-1] if getattr(r, "user_stack", None) else None
            reasons.append(f"{r.reason.strip()[:200]}"
                           + (f" at {os.path.basename(where.filename)}:{where.lineno}" if where else ""))
        out[name] = {"graphs": e.graph_count, "graph_breaks": e.graph_break_count, "ops": e.op_count,
                     "break_reasons": reasons, "explain_s": time.perf_counter() - t0}
    dynamo.reset()
    model.eval()
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            torch.compile(model, fullgraph=True, backend="eager")(x)
        out["fullgraph"], out["fullgraph_error"] = True, None
    except Exception as e:                                 # a graph break under fullgraph=True
        out["fullgraph"], out["fullgraph_error"] = False, f"{type(e).__name__}: {str(e)[:300]}"
    out["fullgraph_capture_s"] = time.perf_counter() - t0
    dynamo.reset()
    return out


def sdpa_backends(model, batch, device, mode):
    """Which fused attention kernels accept each distinct attention call of the model (one call
    per block): its q shape, and for each backend whether it runs (same shapes, dtype, mask)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    calls, original = {}, F.scaled_dot_product_attention

    def record(q, k, v, attn_mask=None, **kw):
        key = (tuple(q.shape), str(q.dtype), None if attn_mask is None else tuple(attn_mask.shape))
        calls.setdefault(key, (q, k, v, attn_mask))
        return original(q, k, v, attn_mask=attn_mask, **kw)

    S = model.config.img_size
    F.scaled_dot_product_attention = record       # mitr.py looks it up through F at call time
    try:
        model.eval()
        with torch.no_grad(), autocast(device, mode):
            model(torch.randn(batch, 3, S, S, device=device))
    finally:
        F.scaled_dot_product_attention = original
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if device.type == "cuda":
        backends.insert(2, SDPBackend.CUDNN_ATTENTION)
    out = []
    for (qs, dt, ms), (q, k, v, m) in calls.items():
        ok = []
        for b in backends:
            try:
                with sdpa_kernel(b), torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")            # "kernel not used because ..."
                    original(q, k, v, attn_mask=m)
                ok.append(b.name.lower())
            except RuntimeError:
                pass
        out.append({"q": list(qs), "dtype": dt, "mask": None if ms is None else list(ms), "backends": ok})
    return out


# -----------------------------------------------------------------------------
# Data pipeline (one process)

def synthetic_jpeg(path, w=640, h=480, seed=0):
    """A photo-like 640x480 JPEG (smooth gradients + texture noise, quality 90, ~COCO's file size)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], -1)   # (h, w, 3)
    img = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90)
    return path


def data_rates(img_size, seconds):
    """Images/s of: Shapes generation + train transform; a 640x480 JPEG decoded (drafted, as the
    datasets do), decoded + train transform (resize, cutout, RandAugment, normalise) and decoded +
    eval transform. One process with one torch thread, as in a DataLoader worker (which sets
    torch.set_num_threads(1)); the file is in the page cache (no disk reads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _data_rates(img_size, seconds)
    finally:
        torch.set_num_threads(threads)


def _data_rates(img_size, seconds):
    train_tf, eval_tf = data.build_transform(img_size, True), data.build_transform(img_size, False)
    shapes = data.Shapes(10 ** 6, img_size=img_size, seed=0, transform=train_tf)
    i = iter(range(10 ** 6))
    out = {"shapes_train_img_s": rate(lambda: shapes[next(i)], seconds)}
    with tempfile.TemporaryDirectory() as tmp:
        path = synthetic_jpeg(os.path.join(tmp, "synthetic_640x480.jpg"))
        out["jpeg_kib"] = os.path.getsize(path) / 1024
        out["jpeg_decode_img_s"] = rate(lambda: data.load_image(path, img_size), seconds)
        out["jpeg_train_img_s"] = rate(lambda: train_tf(data.load_image(path, img_size)), seconds)
        out["jpeg_eval_img_s"] = rate(lambda: eval_tf(data.load_image(path, img_size)), seconds)
    return out


# -----------------------------------------------------------------------------
# Hot path: the copies in mitr.py, measured against copy-free alternatives (not used by the model)

def pa_forward_5d(pa, windows, batch, mask=None):
    """PixelAttention.forward (no token) keeping q, k, v as (B, nW, h, N, d) views, so the
    (nW or 1, h, N, N) bias broadcasts over the batch inside SDPA: no (1, nW*h, N, N) bias copy
    and no copy of q, k, v into (B, nW*h, N, d)."""
    BnW, N, C = windows.shape
    nW, h, d = BnW // batch, pa.heads, C // pa.heads
    qkv = pa.qkv(windows).view(batch, nW, N, 3, h, d).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, h, N, d), a view
    q, k, v = qkv.unbind(0)
    bias = None
    if pa.relative_position_bias_table is not None:
        bias = pa.relative_position_bias_table[pa.relative_position_index.view(-1)]
        bias = bias.view(N, N, h).permute(2, 0, 1)                          # (h, N, N)
    if mask is not None:
        bias = mask[:, None] if bias is None else bias + mask[:, None]      # (nW, h|1, N, N)
    bias = None if bias is None else bias.to(q.dtype)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)            # (B, nW, h, N, d)
    return pa.proj(x.transpose(2, 3).reshape(BnW, N, C))                   # (B*nW, N, C)


def cwa_forward_3d(cwa, x):
    """CrossWindowAttention.forward as first written, with 3-D q, k, v (no head axis). SDPA's fused
    kernels (flash, memory-efficient) take only 4-D inputs, so this runs the math path; kept to
    show what mitr.py's head axis of 1 buys."""
    B, H, W, C = x.shape
    ws, nh, nw = cwa.ws, H // cwa.ws, W // cwa.ws
    t = x.view(B, nh, ws, nw, ws, C).permute(0, 5, 1, 3, 2, 4).reshape(B * C, nh * nw, ws * ws)
    q, k, v = cwa.qkv(t).chunk(3, dim=-1)                     # 3 x (B*C, nW, ws*ws)
    t = cwa.proj(F.scaled_dot_product_attention(q, k, v))    # (B*C, nW, ws*ws)
    t = t.view(B, C, nh, nw, ws, ws).permute(0, 2, 4, 3, 5, 1)  # (B, nh, ws, nw, ws, C)
    return t.reshape(B, H, W, C)


def window_index(H, W, ws, shift):
    """(H*W,) source token of each windowed position: torch.roll by -shift then window_partition
    as ONE gather (PixelBlock does a roll copy, then a permute+reshape copy)."""
    idx = torch.arange(H * W).view(1, H, W, 1)
    if shift:
        idx = torch.roll(idx, shifts=(-shift, -shift), dims=(1, 2))
    return mitr.window_partition(idx, ws).reshape(-1)                      # (nW*N,)


def _ms(t):
    return {k: 1e3 * v["min_s"] for k, v in t.items()}     # micro-benchmarks: best sample, as timeit


def hotpath(model, batch, device, mode, args):
    """Per stage: PixelAttention's bias materialisation, PA's q/k/v layout, roll + partition and
    their reverse, and CWA's permute copies, each timed against the whole op (ms per call)."""
    blocks = module_inputs(model, (mitr.PixelBlock, mitr.CrossWindowBlock), batch, device, mode)
    m = lambda fns: _ms(measure(fns, device, args.warmup, args.repeats, args.min_time / 4))
    inf = lambda f: (lambda: _no_grad(f, device, mode))
    rows, done = [], set()
    for blk, a in blocks:
        x, H, W = a[0], a[1], a[2]
        B, L, C = x.shape
        key = (type(blk).__name__, H, getattr(blk, "shift", None))
        if key in done or (len(a) > 3 and a[3] is not None):      # stage 4 (token): skip
            continue
        done.add(key)
        row = {"block": key[0], "H": H, "C": C, "batch": B}
        if isinstance(blk, mitr.PixelBlock):
            pa, ws, shift = blk.pixel_attention, blk.ws, blk.shift
            with torch.no_grad():
                y = blk.norm1(x).view(B, H, W, C)                           # (B, H, W, C)
                win = mitr.window_partition(torch.roll(y, (-shift, -shift), (1, 2)) if shift else y, ws)
                mask, nW = blk.mask(H, W, x.device), win.shape[0] // B
                cached = pa.attention_bias(mask, nW, False)
            idx = window_index(H, W, ws, shift).to(x.device)
            inv = torch.argsort(idx)
            with torch.no_grad(), autocast(device, mode):
                ref, alt = pa(win, B, mask)[0], pa_forward_5d(pa, win, B, mask)
            row["pa_5d_max_abs_diff"] = float((ref.float() - alt.float()).abs().max())
            orig_bias = pa.attention_bias
            try:
                t = m({
                    "pa_fwd": inf(lambda: pa(win, B, mask)),
                    "bias_only": inf(lambda: pa.attention_bias(mask, nW, False)),
                    "pa_fwd_5d": inf(lambda: pa_forward_5d(pa, win, B, mask)),
                    "roll_partition": inf(lambda: mitr.window_partition(
                        torch.roll(y, (-shift, -shift), (1, 2)) if shift else y, ws)),
                    "gather_partition": inf(lambda: y.view(B, H * W, C).index_select(1, idx)),
                    "reverse_roll": inf(lambda: _reverse_roll(win, ws, H, W, shift, B)),
                    "gather_reverse": inf(lambda: win.view(B, -1, C).index_select(1, inv)),
                })
                pa.attention_bias = lambda *_: cached            # inference: bias built once
                t["pa_fwd_cached_bias"] = m({"c": inf(lambda: pa(win, B, mask))})["c"]
            finally:
                pa.attention_bias = orig_bias
            w = win.detach().clone().requires_grad_(True)
            t.update(m({"pa_train": lambda: _fwd_bwd(lambda: pa(w, B, mask)[0], device, mode),
                        "pa_train_5d": lambda: _fwd_bwd(lambda: pa_forward_5d(pa, w, B, mask), device, mode)}))
            row.update(shift=shift, windows=nW, heads=pa.heads, **t)
        else:
            cwa = blk.cross_window_attention
            ws = cwa.ws
            with torch.no_grad():
                z = blk.norm1(x).view(B, H, W, C)                           # (B, H, W, C)
            nh, nw = H // ws, W // ws
            t_in = z.view(B, nh, ws, nw, ws, C).permute(0, 5, 1, 3, 2, 4).reshape(B * C, nh * nw, ws * ws)
            with torch.no_grad(), autocast(device, mode):
                row["cwa_3d_max_abs_diff"] = float((cwa(z).float() - cwa_forward_3d(cwa, z).float()).abs().max())
            zg = z.detach().clone().requires_grad_(True)
            row.update(m({
                "cwa_fwd": inf(lambda: cwa(z)),
                "cwa_fwd_3d": inf(lambda: cwa_forward_3d(cwa, z)),
                "cwa_train": lambda: _fwd_bwd(lambda: cwa(zg), device, mode),
                "cwa_train_3d": lambda: _fwd_bwd(lambda: cwa_forward_3d(cwa, zg), device, mode),
                "permute_in": inf(lambda: z.view(B, nh, ws, nw, ws, C).permute(0, 5, 1, 3, 2, 4)
                                  .reshape(B * C, nh * nw, ws * ws)),
                "permute_out": inf(lambda: t_in.view(B, C, nh, nw, ws, ws).permute(0, 2, 4, 3, 5, 1)
                                   .reshape(B, H, W, C)),
            }))
        rows.append(row)
    model.zero_grad(set_to_none=True)
    return rows


def _no_grad(f, device, mode):
    with torch.inference_mode(), autocast(device, mode):
        return f()


def _fwd_bwd(f, device, mode):
    with autocast(device, mode):
        out = f()
    out.float().sum().backward()


def _reverse_roll(win, ws, H, W, shift, B):
    y = mitr.window_reverse(win, ws, H, W)                                  # (B, H, W, C)
    if shift:
        y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
    return y.reshape(B, H * W, -1)


# -----------------------------------------------------------------------------
# The run

def time_row(model, swin, batch, with_swin, device, mode, fullgraph, warmup, args):
    """Time MITr's forward and training step (and its Swin twin's, interleaved, when with_swin)."""
    compile_ = mode.startswith("compile")
    fwd, train = steps(model, compiled(model, fullgraph) if compile_ else model, batch, device, mode)
    fns = {"fwd": fwd, "train": train}
    if with_swin:
        fns["swin_fwd"], fns["swin_train"] = steps(swin, compiled(swin, fullgraph) if compile_ else swin,
                                                   batch, device, mode)
    return measure(fns, device, warmup, args.repeats, args.min_time), fwd, train


def bench_variant(variant, device, modes, batches, args):
    cfg = VARIANTS[variant]
    model, swin = build(variant, device, True), build(variant, device, False)
    res = {"img_size": cfg.img_size, "params": num_params(model), "swin_params": num_params(swin),
           **flops_summary(model), "swin_mac": flops_summary(swin)["mac"], "runs": []}
    print(f"[{variant}] {res['params'] / 1e6:.2f}M params, {res['mac'] / 1e9:.3f} GMAC/img", flush=True)
    big = max(batches)
    for mode in modes:
        is_compiled = mode.startswith("compile")
        warmup = max(args.warmup, 2) if is_compiled else args.warmup
        fullgraph = True
        if is_compiled:
            torch._dynamo.reset()
        for batch in sorted(batches):
            row = {"mode": mode, "batch": batch}
            try:
                try:
                    t, fwd, train = time_row(model, swin, batch, batch == big, device, mode, fullgraph, warmup, args)
                except Exception as e:                      # fullgraph=True refused: say so, go on
                    if not is_compiled or not fullgraph or isinstance(e, torch.OutOfMemoryError):
                        raise
                    print(f"  fullgraph=True failed ({type(e).__name__}); compiling with graph breaks", flush=True)
                    fullgraph, row["fullgraph_error"] = False, f"{type(e).__name__}: {str(e)[:300]}"
                    torch._dynamo.reset()
                    t, fwd, train = time_row(model, swin, batch, batch == big, device, mode, fullgraph, warmup, args)
                row.update({f"{k}_img_s": batch / v["s"] for k, v in t.items()})
                row["fwd_peak_mib"] = peak_memory_mib(fwd, device)
                row["train_peak_mib"] = peak_memory_mib(train, device)
                row["fwd_gflop_s"] = 2 * res["mac"] * row["fwd_img_s"] / 1e9
                row["train_gflop_s"] = 3 * 2 * res["mac"] * row["train_img_s"] / 1e9
                if is_compiled:
                    row["fullgraph"] = fullgraph
                    row["compile_s"] = t["fwd"]["first_s"] + t["train"]["first_s"]
                if batch == big:
                    # CWA alone (eager only: in a compiled model it is fused with its neighbours).
                    if not is_compiled:
                        c = time_cwa(model, batch, device, mode, args)
                        row["cwa_fwd_share"] = c["fwd_s"] / t["fwd"]["s"]
                        row["cwa_train_share"] = c["train_s"] / t["train"]["s"]
                    # MITr vs Swin: time ratio beside the FLOPs ratio; 1 - 1/ratio = CW blocks' share.
                    row["time_ratio_fwd"] = t["fwd"]["s"] / t["swin_fwd"]["s"]
                    row["time_ratio_train"] = t["train"]["s"] / t["swin_train"]["s"]
                    row["cw_blocks_fwd_share"] = 1 - t["swin_fwd"]["s"] / t["fwd"]["s"]
                    row["cw_blocks_train_share"] = 1 - t["swin_train"]["s"] / t["train"]["s"]
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
                torch.cuda.empty_cache()
            res["runs"].append(row)
            print("  " + format_row(variant, row), flush=True)
    res["flops_ratio"] = res["mac"] / res["swin_mac"]
    res["cwa_flops_share"] = res["cwa_mac"] / res["mac"]
    res["cw_blocks_flops_share"] = res["cw_blocks_mac"] / res["mac"]
    eager = next((m for m in modes if m.startswith("eager")), modes[0])
    res["sdpa_backends"] = sdpa_backends(model, min(batches), device, eager)
    if args.check_compile or args.compile:
        print(f"  [{variant}] torch._dynamo.explain + fullgraph capture ...", flush=True)
        res["compile_check"] = compile_check(model, device)
    if args.hotpath:
        print(f"  [{variant}] hot-path micro-benchmarks ...", flush=True)
        res["hotpath"] = hotpath(model, big, device, eager, args)
    return res


def format_row(variant, r):
    if "error" in r:
        return f"{variant:>5} {r['mode']:>12} {r['batch']:>5}  {r['error']}"
    return (f"{variant:>5} {r['mode']:>12} {r['batch']:>5} {r['fwd_img_s']:>9.1f} {r['train_img_s']:>9.1f}"
            f" {r['fwd_gflop_s']:>9.1f} {r['train_gflop_s']:>9.1f} {r['fwd_peak_mib']:>9.0f}"
            f" {r['train_peak_mib']:>9.0f}" + (f"  compile {r['compile_s']:.0f}s" if "compile_s" in r else ""))


HEADER = (f"{'model':>5} {'mode':>12} {'batch':>5} {'fwd':>9} {'train':>9} {'fwd':>9} {'train':>9}"
          f" {'fwd peak':>9} {'trn peak':>9}\n{'':>24} {'img/s':>9} {'img/s':>9} {'GFLOP/s':>9}"
          f" {'GFLOP/s':>9} {'MiB':>9} {'MiB':>9}")


def pct(x):
    return f"{100 * x:.1f}%"


def report(result, device):
    """The readable summary printed after the rows."""
    lines = [HEADER]
    for v, r in result["variants"].items():
        lines += [format_row(v, row) for row in r["runs"]]
    lines.append("")
    peak = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS (ru_maxrss), cumulative"
    lines.append(f"GFLOP/s = 2 x counted MACs x img/s (train: 3 x forward MACs). Peak memory: {peak}.")
    for v, r in result["variants"].items():
        lines.append(f"\nMITr-{v} @{r['img_size']}: {r['params'] / 1e6:.2f}M params, {r['mac'] / 1e9:.3f} GMAC/img "
                     f"counted ({r['analytic_mac'] / 1e9:.3f} by Eq. 5-10); CWA {r['cwa_mac'] / 1e9:.4f} GMAC = "
                     f"{pct(r['cwa_flops_share'])} of MACs, cross-window blocks (CWA + MLP) "
                     f"{pct(r['cw_blocks_flops_share'])}.")
        for row in r["runs"]:
            if "cwa_fwd_share" in row:
                lines.append(f"  CWA share of time ({row['mode']}, batch {row['batch']}, CWA modules timed alone): "
                             f"fwd {pct(row['cwa_fwd_share'])}, train {pct(row['cwa_train_share'])}  "
                             f"| its MAC share {pct(r['cwa_flops_share'])}")
            if "time_ratio_fwd" in row:
                lines.append(f"  MITr / Swin twin (cross_window off), {row['mode']}, batch {row['batch']}: time "
                             f"x{row['time_ratio_fwd']:.3f} fwd, x{row['time_ratio_train']:.3f} train | MACs "
                             f"x{r['flops_ratio']:.3f}  (cross-window blocks: {pct(row['cw_blocks_fwd_share'])} "
                             f"fwd, {pct(row['cw_blocks_train_share'])} train of time, "
                             f"{pct(r['cw_blocks_flops_share'])} of MACs)")
        d = r.get("data")
        if d:
            ok = [row for row in r["runs"] if "train_img_s" in row]
            best = max((row["train_img_s"] for row in ok), default=float("nan"))
            lines.append(f"  data, 1 process @{r['img_size']}: Shapes + train transform {d['shapes_train_img_s']:.0f} "
                         f"img/s; 640x480 JPEG ({d['jpeg_kib']:.0f} KiB) decode {d['jpeg_decode_img_s']:.0f}, "
                         f"decode + train aug {d['jpeg_train_img_s']:.0f}, decode + eval {d['jpeg_eval_img_s']:.0f} img/s"
                         f" | model train (best row) {best:.1f} img/s -> "
                         + ("data limits" if d["jpeg_train_img_s"] < best else "model limits")
                         + f" with 1 worker; JPEG workers to feed it: {max(1, math.ceil(best / d['jpeg_train_img_s']))}")
        cc = r.get("compile_check")
        if cc:
            for k in ("eval", "train"):
                e = cc[k]
                lines.append(f"  torch.compile {k}: {e['graphs']} graph(s), {e['graph_breaks']} graph break(s), "
                             f"{e['ops']} ops (explain {e['explain_s']:.1f}s)"
                             + "".join(f"\n    break: {s}" for s in e["break_reasons"]))
            lines.append(f"  fullgraph=True capture: {'ok' if cc['fullgraph'] else 'FAILED ' + cc['fullgraph_error']}"
                         f" ({cc['fullgraph_capture_s']:.1f}s)")
        for s in r.get("sdpa_backends", []):
            lines.append(f"  attention call q{tuple(s['q'])} {s['dtype']}, mask {s['mask'] and tuple(s['mask'])}: "
                         f"kernels {', '.join(s['backends'])}")
        for h in r.get("hotpath", []):
            if h["block"] == "PixelBlock":
                lines.append(
                    f"  hot path PixelBlock {h['H']}x{h['H']}x{h['C']} shift {h['shift']} (ms): PA fwd {h['pa_fwd']:.2f}, "
                    f"of which bias build {h['bias_only']:.2f}; bias cached {h['pa_fwd_cached_bias']:.2f}; 5-D q/k/v "
                    f"{h['pa_fwd_5d']:.2f} (diff {h['pa_5d_max_abs_diff']:.1e}); PA train {h['pa_train']:.2f} vs 5-D "
                    f"{h['pa_train_5d']:.2f}; roll+partition {h['roll_partition']:.2f} vs gather "
                    f"{h['gather_partition']:.2f}; reverse+roll {h['reverse_roll']:.2f} vs gather {h['gather_reverse']:.2f}")
            else:
                lines.append(f"  hot path CrossWindowBlock {h['H']}x{h['H']}x{h['C']} (ms): CWA fwd {h['cwa_fwd']:.2f} vs "
                             f"3-D q/k/v {h['cwa_fwd_3d']:.2f} (diff {h['cwa_3d_max_abs_diff']:.1e}); CWA train "
                             f"{h['cwa_train']:.2f} vs 3-D {h['cwa_train_3d']:.2f}; permute in "
                             f"{h['permute_in']:.2f}, permute out {h['permute_out']:.2f}")
    return "\n".join(lines)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model_name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        model_name = platform.processor() or platform.machine()
    return f"{model_name}, {torch.get_num_threads()} torch threads, {os.cpu_count()} logical CPUs"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Benchmark MITr: img/s, memory, FLOP/s, CWA share, "
                                             "Swin ratio, data pipeline (issue 9).")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=None,
                    help="default: tiny s on CPU, all four on CUDA")
    ap.add_argument("--batches", nargs="+", type=int, default=None,
                    help="default per variant: CPU tiny 1 8 32, s 1 4; CUDA 1 16 64 (tiny 1 64 256)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=None,
                    help="default: CPU eager-fp32 (+ compile-fp32 with --compile); "
                         "CUDA eager-fp32 eager-bf16 compile-bf16")
    ap.add_argument("--compile", action="store_true", help="add torch.compile rows (and --check-compile)")
    ap.add_argument("--check-compile", action="store_true",
                    help="count graph breaks with torch._dynamo.explain and try fullgraph=True")
    ap.add_argument("--hotpath", action="store_true", help="micro-benchmark the copies in mitr.py's hot path")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 1 CPU, 3 CUDA)")
    ap.add_argument("--repeats", type=int, default=3, help="timed samples; the median is reported")
    ap.add_argument("--min-time", type=float, default=None, help="seconds per sample (default 0.5 CPU, 0.2 CUDA)")
    ap.add_argument("--data-time", type=float, default=1.0, help="seconds per data-pipeline rate (0: skip)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (CPU); 1 on a busy machine, where an oversubscribed "
                         "thread pool runs up to 10x slower")
    ap.add_argument("--json", default="bench.json", help="output file (default bench.json)")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.variants = args.variants or (sorted(VARIANTS, key=["tiny", "s", "m", "l"].index) if cuda else ["tiny", "s"])
    if args.modes is None:
        args.modes = (["eager-fp32", "eager-bf16", "compile-bf16"] if cuda
                      else ["eager-fp32"] + (["compile-fp32"] if args.compile else []))
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.min_time = args.min_time if args.min_time is not None else (0.2 if cuda else 0.5)
    return args


def main(argv=None):
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run_all(args)
    finally:
        torch.set_num_threads(threads)


def run_all(args):
    device = torch.device(args.device)
    # Many shapes x train/eval x models share MITr.forward's code object: let dynamo keep them all.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    result = {"meta": {
        "device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args),
        "torch_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "conventions": {"mac": "counted by mitr.count_flops, per image, forward",
                        "gflop_s": "2 x MAC x img/s; train uses 3 x forward MACs",
                        "train": "train mode, forward, mitr_loss, backward, Adam step, zero_grad",
                        "fwd": "eval mode, inference_mode, forward",
                        "time": "median of repeats, each sample >= min_time, after warm-up",
                        "peak_mib": "CUDA max_memory_allocated; CPU process peak RSS (cumulative)",
                        "cwa_share": "CWA modules timed alone on their in-model inputs / model time",
                        "cw_blocks_share": "1 - t(cross_window off) / t(on), interleaved samples"}},
        "variants": {}}
    print(f"{result['meta']['device']}, torch {torch.__version__}\n{HEADER}", flush=True)
    t_start = time.perf_counter()
    rates = {}
    for v in args.variants:
        batches = args.batches or DEFAULT_BATCHES["cuda" if device.type == "cuda" else "cpu"][v]
        r = bench_variant(v, device, args.modes, batches, args)
        if args.data_time > 0:
            size = VARIANTS[v].img_size
            if size not in rates:
                rates[size] = data_rates(size, args.data_time)
            r["data"] = rates[size]
        result["variants"][v] = r
    result["meta"]["total_s"] = time.perf_counter() - t_start
    print("\n" + report(result, device))
    print(f"\n{result['meta']['total_s']:.0f}s in all; JSON -> {args.json}")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1, default=str)
    return result


if __name__ == "__main__":
    main()
