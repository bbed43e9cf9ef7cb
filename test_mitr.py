"""The test suite: the model (Section 3.1), its cost and load_swin, losses and metrics (Section 3.2,
4.1), data, training, notebooks. Run: python -m pytest -q"""

import argparse
import contextlib
import copy
import csv
import dataclasses
import json
import math
import os
import pathlib
import re
import signal
import struct
import subprocess
import sys
import time
import zlib

import nbclient
import nbformat
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch._utils import ExceptionWrapper

import data
import mitr
import train
from data import InputError
from losses import (
    asl_negative,
    asl_positive,
    asymmetric_loss,
    bce_loss,
    mitr_loss,
    object_token_loss,
)
from metrics import (
    VOC11_GRID,
    auroc,
    average_precision,
    choose_thresholds,
    format_report,
    label_report,
    logit,
    multilabel_report,
)
from mitr import VARIANTS, MITr, MITrConfig, format_swin_report, load_swin

# =============================================================================
# mitr.py


def _features(model, x):
    """The pooled feature (B, 8C) that the class head reads (Swin's forward_features)."""
    return model.forward_tokens(x)[0].mean(1)


def _model_tiny(seed=0, **changes):
    torch.manual_seed(0)  # for the inputs a test draws next; the weights come from `seed` alone
    return MITr(dataclasses.replace(VARIANTS["tiny"], **changes), num_classes=5, seed=seed).eval()


# The arms of a paired ablation: Table 5's steps and the capacity control (Interpretation 31).
_ARMS = {
    "Swin": dict(cross_window=False, object_token=False, arc_sigmoid=False),
    "Swin + MLP blocks": dict(cross_window_attention=False, object_token=False, arc_sigmoid=False),
    "Swin + CWA": dict(object_token=False, arc_sigmoid=False),
    "Swin + CWA + arc": dict(object_token=False),
    "MITr": {},
}


def test_model_same_seed_same_start_across_table5_switches():
    # Paired ablations: for one seed, every tensor two arms share (same name and shape) starts
    # equal, the class head included, so differences come from the parts alone.
    start = {arm: _model_tiny(**changes).state_dict() for arm, changes in _ARMS.items()}
    arms = list(start)
    for i, a in enumerate(arms):
        for b in arms[i + 1 :]:
            shared = [
                k for k in start[a] if k in start[b] and start[a][k].shape == start[b][k].shape
            ]
            assert "head.weight" in shared and "patch_embed.proj.weight" in shared, (a, b)
            differ = [k for k in shared if not torch.equal(start[a][k], start[b][k])]
            assert differ == [], (a, b, differ[:3])
    # Not shared is exactly what the switches add or take away:
    swin, mitr_ = set(start["Swin"]), set(start["MITr"])
    assert swin - mitr_ == {"head.bias"}  # the linear head's
    added = {k for k in mitr_ - swin if ".cross_window." not in k}
    assert added == {"object_token", "count_head.weight", "count_head.bias"}
    attention = {k for k in start["Swin + CWA"] if re.search(r"cross_window\.(norm1|cross_wi)", k)}
    assert len(attention) == 3 * 6  # per block: norm1 w, b; qkv w, b; proj w, b
    assert set(start["Swin + CWA"]) - set(start["Swin + MLP blocks"]) == attention
    assert set(start["Swin + MLP blocks"]) <= set(start["Swin + CWA"])
    # The global generator plays no part; the seed does, and every tensor has its own draw.
    torch.manual_seed(12345)
    again = MITr(VARIANTS["tiny"], 5, seed=0).state_dict()
    assert all(torch.equal(again[k], v) for k, v in start["MITr"].items())
    other = MITr(VARIANTS["tiny"], 5, seed=1).state_dict()
    drawn = [k for k, v in other.items() if v.dim() > 1]
    assert "head.weight" in drawn and not any(torch.equal(other[k], again[k]) for k in drawn)
    qkv = "stages.0.units.0.{}.pixel_attention.qkv.weight"
    assert not torch.equal(again[qkv.format("w_msa")], again[qkv.format("sw_msa")])


@pytest.mark.parametrize("variant", ["tiny", "s", "m", "l"])
def test_model_output_shapes(variant):
    # m and l run with one unit per stage: tensor shapes do not depend on depth, and the full
    # models take seconds per image on this CPU. s and tiny run as in Table 1.
    cfg = VARIANTS[variant]
    if variant in ("m", "l"):
        cfg = dataclasses.replace(cfg, depths=(1, 1, 1, 1))
    model = MITr(cfg, num_classes=7).eval()
    x = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        logits, counts = model(x)
        feats = _features(model, x)
    assert logits.shape == (2, 7) and counts.shape == (2, 8)
    assert feats.shape == (2, 8 * cfg.embed_dim)
    assert torch.isfinite(logits).all() and torch.isfinite(counts).all()


def test_model_window_partition_round_trip():
    x = torch.randn(2, 12, 9, 5)
    w = mitr.window_partition(x, 3)
    assert w.shape == (2 * 4 * 3, 9, 5)
    assert torch.equal(mitr.window_reverse(w, 3, 12, 9), x)
    # window 1 of image 0 is rows 0-2, cols 3-5, row-major inside the window
    assert torch.equal(w[1].view(3, 3, 5), x[0, 0:3, 3:6])


def test_model_relative_position_index_hand_worked():
    # ws=2, tokens (0,0),(0,1),(1,0),(1,1); index = (dy+1)*3 + (dx+1) with (dy,dx) = p_i - p_j
    expected = torch.tensor([[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
    assert torch.equal(mitr.relative_position_index(2), expected)


def _changed_pixels(block, H, W, pixel):
    torch.manual_seed(1)
    x = torch.randn(1, H * W, block.norm1.normalized_shape[0])
    y = x.clone()
    y[0, pixel[0] * W + pixel[1]] += 5.0 * torch.randn(x.shape[-1])  # not constant: LN removes that
    with torch.no_grad():
        a, _ = block(x, H, W)
        b, _ = block(y, H, W)
    diff = (a - b).abs().amax(-1).view(H, W) > 1e-6
    return {(int(i), int(j)) for i, j in diff.nonzero()}


def test_model_shifted_window_mask_isolates_wrapped_regions():
    cfg = VARIANTS["tiny"]
    torch.manual_seed(0)
    plain = mitr.PixelBlock(8, 2, ws=3, shift=0, cfg=cfg).eval()
    shifted = mitr.PixelBlock(8, 2, ws=3, shift=1, cfg=cfg).eval()
    shifted.load_state_dict(plain.state_dict())
    # Unshifted: a change at (0,0) reaches exactly its window, rows 0-2 x cols 0-2.
    assert _changed_pixels(plain, 6, 6, (0, 0)) == {(i, j) for i in range(3) for j in range(3)}
    # Shifted by 1: (2,2) lands at (1,1) of the rolled map, in a window of one region (rows 1-3,
    # cols 1-3 of the original map), so it reaches all of those.
    assert _changed_pixels(shifted, 6, 6, (2, 2)) == {(i, j) for i in (1, 2, 3) for j in (1, 2, 3)}
    # (0,0) rolls to the corner (5,5): its window also holds rows/cols 4-5 of the original map,
    # neighbours only through the wrap. The mask must keep it alone.
    assert _changed_pixels(shifted, 6, 6, (0, 0)) == {(0, 0)}
    # ... and (4,4), in the same rolled window, reaches its true neighbours (4..5)x(4..5) only.
    assert _changed_pixels(shifted, 6, 6, (4, 4)) == {(4, 4), (4, 5), (5, 4), (5, 5)}


def test_model_pixel_attention_matches_naive_loop():
    torch.manual_seed(0)
    B, H, W, C, ws, heads = 2, 6, 6, 8, 3, 2
    attn = mitr.PixelAttention(C, ws, heads).eval()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    mask = mitr.shifted_window_mask(H, W, ws, 1)  # (nW, N, N)
    windows = torch.randn(B * 4, ws * ws, C)
    token = torch.randn(B, 1, C)
    with torch.no_grad():
        out, tok = attn(windows, B, mask, token)
        # naive: each image, window and head on its own, the token appended to each window
        N, d = ws * ws, C // heads
        bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(
            N, N, heads
        )
        ref, ref_tok = torch.zeros_like(out), torch.zeros(B, 1, C)
        for b in range(B):
            for w in range(4):
                seq = torch.cat([windows[b * 4 + w], token[b]], 0)  # (N+1, C)
                q, k, v = attn.qkv(seq).view(N + 1, 3, heads, d).unbind(1)
                heads_out = []
                for h in range(heads):
                    s = q[:, h] @ k[:, h].T / math.sqrt(d)
                    s[:N, :N] += bias[:, :, h] + mask[w]
                    heads_out.append(s.softmax(-1) @ v[:, h])
                o = attn.proj(torch.cat(heads_out, -1))
                ref[b * 4 + w] = o[:N]
                ref_tok[b] += o[N:] / 4
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(tok, ref_tok, atol=1e-5)


def test_model_cross_window_attention_matches_naive_loop():
    torch.manual_seed(0)
    B, H, W, C, ws = 2, 6, 9, 4, 3
    cwa = mitr.CrossWindowAttention(ws).eval()
    x = torch.randn(B, H, W, C)
    with torch.no_grad():
        out = cwa(x)
        ref = torch.zeros_like(x)
        for b in range(B):
            for c in range(C):
                # one token per window of this channel, its ws*ws pixels in row-major order
                tokens = torch.stack(
                    [
                        x[b, i : i + ws, j : j + ws, c].reshape(-1)
                        for i in range(0, H, ws)
                        for j in range(0, W, ws)
                    ]
                )
                q, k, v = cwa.qkv(tokens).chunk(3, -1)
                o = cwa.proj((q @ k.T / ws).softmax(-1) @ v)  # scale 1/sqrt(ws^2)
                for n, (i, j) in enumerate(
                    (i, j) for i in range(0, H, ws) for j in range(0, W, ws)
                ):
                    ref[b, i : i + ws, j : j + ws, c] = o[n].view(ws, ws)
    assert torch.allclose(out, ref, atol=1e-5)


def test_model_cross_window_attention_mask_cuts_keys():
    """attn_mask (notebook 05's interventions): a window cut out of the keys gets no weight, and a
    mask keeping each window to itself gives each window its own v, projected."""
    torch.manual_seed(0)
    B, H, W, C, ws = 2, 6, 6, 3, 3  # 2 x 2 windows
    cwa = mitr.CrossWindowAttention(ws).eval()
    x = torch.randn(B, H, W, C)
    cut = torch.zeros(B, 1, 1, 4)
    cut[0, 0, 0, 3] = -math.inf  # image 0: the bottom-right window out of the keys
    with torch.no_grad():
        out = cwa(x, attn_mask=cut)
        changed = x.clone()
        changed[:, 3:, 3:] += 5.0  # what that window holds no longer matters to image 0 only
        after = cwa(changed, attn_mask=cut)
        assert torch.allclose(after[0, :3], out[0, :3], atol=1e-5)
        assert not torch.allclose(after[1, :3], out[1, :3], atol=1e-3)
        own = torch.full((4, 4), -math.inf).fill_diagonal_(0)
        alone = cwa(x, attn_mask=own)
        t = x[0, :3, :3, 1].reshape(-1)  # image 0, channel 1, the top-left window
        v = cwa.qkv(t).chunk(3)[2]
        assert torch.allclose(alone[0, :3, :3, 1].reshape(-1), cwa.proj(v), atol=1e-5)
        assert torch.equal(cwa(x, attn_mask=torch.zeros(1, 1, 1, 4)), cwa(x))


def test_model_space_to_depth_matches_swin_slices():
    torch.manual_seed(0)
    m = mitr.SpaceToDepth(4)
    x = torch.randn(2, 6, 8, 4)
    xs = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]  # Swin's order
    ref = m.reduction(m.norm(torch.cat(xs, -1).view(2, 12, 16)))
    assert torch.allclose(m(x.view(2, 48, 4), 6, 8), ref, atol=1e-6)


def test_model_gradients_reach_every_parameter():
    model = _model_tiny().train()
    logits, counts = model(torch.randn(2, 3, 96, 96))
    (logits.square().sum() + counts.square().sum()).backward()
    missing = [
        n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert missing == []


def test_model_ablation_switches_remove_their_parts():
    full = _model_tiny()
    n_full = mitr.num_params(full)
    names = {n for n, _ in full.named_parameters()}
    assert any("relative_position_bias_table" in n for n in names)
    assert any(".cross_window." in n for n in names)
    assert "object_token" in names and isinstance(full.head, mitr.ArcHead)
    pixel_blocks = [b for s in full.stages for u in s.units for b in (u.w_msa, u.sw_msa)]
    cross_window_blocks = [u.cross_window for s in full.stages for u in s.units if u.cross_window]

    no_pos = _model_tiny(pos_embed=False)
    tables = sum(
        p.numel() for n, p in full.named_parameters() if "relative_position_bias_table" in n
    )
    assert mitr.num_params(no_pos) == n_full - tables

    no_shift = _model_tiny(shift=False)
    assert mitr.num_params(no_shift) == n_full
    assert all(u.sw_msa.shift == 0 for s in no_shift.stages for u in s.units)
    assert sum(b.shift > 0 for b in pixel_blocks) == 3  # stages 1-3, the SW-MSA blocks
    assert all(u.w_msa.shift == 0 for s in full.stages for u in s.units)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert not torch.allclose(full(x)[0], no_shift(x)[0])  # same weights, different windows

    no_cwa = _model_tiny(cross_window=False)
    cwa = sum(mitr.num_params(b) for b in cross_window_blocks)
    assert len(cross_window_blocks) == 3 and mitr.num_params(no_cwa) == n_full - cwa
    assert all(u.cross_window is None for s in no_cwa.stages for u in s.units)

    # The capacity control: each cross-window block loses exactly its attention branch (Eq. 3's
    # LayerNorm and attention), keeping Eq. 4's LayerNorm + MLP residual at the same place.
    control = _model_tiny(cross_window_attention=False)
    branch = sum(
        mitr.num_params(b.norm1) + mitr.num_params(b.cross_window_attention)
        for b in cross_window_blocks
    )
    assert branch == 3 * (4 * 3**4 + 4 * 3**2) + 2 * (32 + 64 + 128)  # Eq. 10's ws^4 + norm1
    assert mitr.num_params(control) == n_full - branch
    kept = [u.cross_window for s in control.stages for u in s.units if u.cross_window]
    assert len(kept) == 3
    assert all(b.cross_window_attention is None and b.norm1 is None for b in kept)
    assert [mitr.num_params(b) for b in kept] == [
        mitr.num_params(b.norm2) + mitr.num_params(b.mlp) for b in cross_window_blocks
    ]
    with torch.no_grad():
        logits, counts = control(x)
        assert not torch.allclose(logits, full(x)[0])  # the shared weights, no attention
    assert torch.isfinite(logits).all() and counts.shape == (1, 6)

    linear = _model_tiny(arc_sigmoid=False)
    assert isinstance(linear.head, torch.nn.Linear) and linear.head.bias is not None

    no_token = _model_tiny(object_token=False)
    assert no_token(x)[1] is None and no_token.object_token is None
    assert mitr.num_params(no_token) == n_full - 256 - (256 * 6 + 6)  # token + count head
    assert "stage4" in mitr.summary(no_token)


def test_model_arc_head_is_scaled_cosine():
    torch.manual_seed(0)
    head = mitr.ArcHead(16, 3, s=8.0)
    x = torch.randn(5, 16)
    logits = head(x)
    cos = torch.stack(
        [
            torch.stack([torch.dot(xi, wj) / (xi.norm() * wj.norm()) for wj in head.weight])
            for xi in x
        ]
    )
    assert torch.allclose(logits, 8.0 * cos, atol=1e-5)
    assert logits.abs().max() <= 8.0 + 1e-5  # "within [-s, s]"


@pytest.mark.parametrize("between", [True, False])
def test_model_unit_order(between):
    # Default: W-MSA -> cross-window -> SW-MSA (CAT's in-window -> cross -> in-window); the flag
    # restores W-MSA -> SW-MSA -> cross-window. Same parameters either way.
    model = _model_tiny(cross_window_between=between)
    seen = []
    for name, m in model.stages[0].named_modules():
        if isinstance(m, (mitr.PixelBlock, mitr.CrossWindowBlock)):
            m.register_forward_pre_hook(lambda mod, args, name=name: seen.append(name))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 96))[0]
    want = ["units.0.w_msa", "units.0.cross_window", "units.0.sw_msa"]
    assert seen == (want if between else [want[0], want[2], want[1]])
    other = _model_tiny(cross_window_between=not between)
    other.load_state_dict(model.state_dict())  # same keys and shapes
    with torch.no_grad():
        assert not torch.allclose(other(torch.randn(1, 3, 96, 96))[0], out)
    # Stochastic-depth rates grow in the order the sub-blocks run.
    rates = []
    for stage in _model_tiny(cross_window_between=between, drop_path=0.3).stages:
        for unit in stage.units:
            blocks = [unit.w_msa, unit.sw_msa]
            if unit.cross_window is not None:
                blocks.insert(1 if between else 2, unit.cross_window)
            rates += [b.dpr for b in blocks]
    assert (
        rates == sorted(rates) and len(set(rates)) == len(rates) == 3 * 3 + 2 and rates[-1] == 0.3
    )


def test_model_stochastic_depth_one_draw_for_token_and_pixels():
    torch.manual_seed(0)
    block = mitr.PixelBlock(8, 2, ws=3, shift=0, cfg=VARIANTS["tiny"], dpr=0.5).train()
    with torch.no_grad():  # Eq. 2's branch adds nothing: only Eq. 1's draw shows
        block.mlp.fc2.weight.zero_()
        block.mlp.fc2.bias.zero_()
        x, token = torch.randn(64, 9, 8), torch.randn(64, 1, 8)
        y, t = block(x, 3, 3, token)
    kept_pixels = (y - x).flatten(1).abs().amax(1) > 0
    kept_token = (t - token).flatten(1).abs().amax(1) > 0
    assert 0 < kept_pixels.sum() < 64
    assert torch.equal(kept_pixels, kept_token)
    with torch.no_grad():  # and Eq. 2's draw: now Eq. 1's branch adds nothing
        block.mlp.fc2.bias.fill_(1.0)
        block.pixel_attention.proj.weight.zero_()
        block.pixel_attention.proj.bias.zero_()
        y, t = block(x, 3, 3, token)
    kept_pixels = (y - x).flatten(1).abs().amax(1) > 0
    assert 0 < kept_pixels.sum() < 64
    assert torch.equal(kept_pixels, (t - token).flatten(1).abs().amax(1) > 0)


def test_model_grad_checkpoint_gives_the_same_gradients():
    # Recomputing each unit in backward saves memory, and changes nothing else: checkpoint replays
    # the RNG state, so stochastic depth draws the same samples in the recomputation.
    x = torch.randn(4, 3, 96, 96)
    y = (torch.rand(4, 5) < 0.4).float()
    grads, calls = [], []
    for grad_checkpoint, draw in ((False, 1), (True, 1), (False, 2)):
        model = _model_tiny(drop_path=0.5, grad_checkpoint=grad_checkpoint).train()
        runs = []
        for unit in model.modules():
            if isinstance(unit, mitr.Unit):
                unit.register_forward_pre_hook(lambda *_, runs=runs: runs.append(1))
        torch.manual_seed(draw)  # stochastic depth's draws
        logits, counts = model(x)
        mitr_loss(logits, counts, y)[0].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        calls.append(len(runs))
    assert calls == [4, 8, 4]  # with checkpointing each unit ran again in backward
    plain, checkpointed, other_draw = grads
    for name, g in plain.items():
        assert torch.allclose(g, checkpointed[name], rtol=1e-4, atol=1e-7), name
    assert not all(torch.allclose(g, other_draw[n], rtol=1e-4, atol=1e-7) for n, g in plain.items())


def test_model_object_token_sees_the_image():
    model = _model_tiny()
    with torch.no_grad():
        a = model(torch.zeros(1, 3, 96, 96))[1]
        b = model(torch.randn(1, 3, 96, 96))[1]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("variant", ["s", "m", "l"])
def test_model_parameter_counts_match_table2(variant):
    with torch.device("meta"):  # counts only: no memory, no init
        model = MITr(VARIANTS[variant], num_classes=80)
    params = mitr.num_params(model) / 1e6
    assert abs(params - mitr.TABLE2_PARAMS_M[variant]) / mitr.TABLE2_PARAMS_M[variant] < 0.10


def test_model_pixel_path_is_swin():
    # Cross-window blocks and the object token off, a linear head for 1000 classes: MITr-s is
    # Swin-T (28,288,354 parameters, the relative_position_index buffers aside). MITr-m and -l are
    # Swin-S (49,606,258) and Swin-B (87,768,224) with ws 12 instead of 7: each block's bias table
    # grows from 13^2 to 23^2 rows per head, i.e. 360 * sum(depth * heads) parameters.
    published = {
        "s": 28_288_354,
        "m": 49_606_258 + 360 * (2 * 3 + 2 * 6 + 18 * 12 + 2 * 24),
        "l": 87_768_224 + 360 * (2 * 4 + 2 * 8 + 18 * 16 + 2 * 32),
    }
    for variant, n in published.items():
        cfg = dataclasses.replace(
            VARIANTS[variant], cross_window=False, object_token=False, arc_sigmoid=False
        )
        with torch.device("meta"):
            model = MITr(cfg, num_classes=1000)
        assert mitr.num_params(model) == n, variant


@pytest.mark.parametrize(
    "variant,changes", [("tiny", {}), ("s", {}), ("tiny", dict(cross_window_attention=False))]
)
def test_model_analytic_flops_match_counted(variant, changes):
    cfg = dataclasses.replace(VARIANTS[variant], **changes)
    model = MITr(cfg, num_classes=80)
    analytic = sum(mitr.analytic_flops(cfg, 80).values())
    counted = mitr.count_flops(model)["MITr"]
    # Eq. 7 and Eq. 9 count every matmul; norms, softmax, GELU and additions are left out by both.
    assert analytic == counted


def test_model_flop_counter_works_under_no_grad():
    # The standard idiom; it used to trip an assertion in FlopCounterMode's module tracker.
    from torch.utils.flop_counter import FlopCounterMode

    model = _model_tiny()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, 3, 96, 96))
    assert fc.get_total_flops() > 0


def test_model_eq9_cross_window_cost_is_linear_in_channels():
    cost = {}
    for C in (96, 192):
        m = mitr.CrossWindowAttention(7)
        x = torch.zeros(1, 56, 56, C)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            m(x)
        cost[C] = fc.get_total_flops() / 2
        hw, ws = 56 * 56, 7
        assert cost[C] == 4 * hw * ws * ws * C + 2 * hw * hw * C / (ws * ws)  # Eq. (9), corrected
    assert cost[192] == 2 * cost[96]
    assert mitr.num_params(mitr.CrossWindowAttention(7)) == 4 * 7**4 + 4 * 7**2  # Eq. (10): ws^4


def test_model_rejects_sizes_it_cannot_take():
    model = _model_tiny()
    with pytest.raises(ValueError, match="Sides that work: 96, 192"):
        model(torch.zeros(1, 3, 100, 100))
    model(torch.zeros(1, 3, 192, 96))  # rectangular multiples work


def test_model_bf16_autocast_runs():
    model = _model_tiny()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, counts = model(torch.randn(2, 3, 96, 96))
    assert torch.isfinite(logits.float()).all() and torch.isfinite(counts.float()).all()
    assert logits.dtype == torch.float32  # the arc head runs outside autocast


def test_model_arc_head_is_float32_under_bf16_autocast():
    torch.manual_seed(0)
    head = mitr.ArcHead(256, 80, s=8.0)
    x = torch.randn(4, 256)
    want = head(x)
    assert torch.equal(want, mitr.arc_logits(x, head.weight, 8.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head(x)
    # A bf16 matmul would be off by ~1e-2 here.
    assert got.dtype == torch.float32 and (got - want).abs().max() < 1e-6


def test_model_cli_prints_the_stage_table():
    out = subprocess.run(
        [sys.executable, "mitr.py", "--variant", "tiny"], capture_output=True, text=True, check=True
    ).stdout
    assert "stage4" in out and "GFLOPs(counted)" in out


@pytest.mark.parametrize(
    "argv,says",
    [
        (["--batch", "0"], "--batch 0: give 1 to 1024"),
        (["--bench", "--batch", "-4"], "--batch -4"),
        (["--num-classes", "-3"], "--num-classes -3: give 1 to 100000"),
        (["--num-classes", "0"], "--num-classes 0"),
        (["--img-size", "-96"], "--img-size -96: MITr-s takes sides"),
        (["--variant", "tiny", "--img-size", "100"], "--img-size 100: MITr-tiny takes sides"),
        (["--variant", "xl"], "invalid choice: 'xl'"),
        (["--batch", "two"], "invalid int value: 'two'"),
        (["--device", "nowhere"], "--device nowhere: give cpu, cuda or cuda:N"),
        (["--nonsense"], "unrecognized arguments: --nonsense"),
    ],
)
def test_model_cli_bad_values_give_one_line_and_exit_2(argv, says, capsys):
    with pytest.raises(SystemExit) as exit:
        mitr.main(argv)
    out, err = capsys.readouterr()
    assert exit.value.code == 2 and err.startswith("mitr.py: error: ") and err.count("\n") == 1
    assert says in err and out == "", (err, out)


# =============================================================================
# load_swin: ImageNet-pretrained Swin into MITr (Section 4.1)

_SWIN_T = dict(embed_dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24))
_SWIN_S = dict(embed_dim=96, depths=(2, 2, 18, 2), heads=(3, 6, 12, 24))
_SWIN_B = dict(embed_dim=128, depths=(2, 2, 18, 2), heads=(4, 8, 16, 32))
_SWIN_TINY = dict(embed_dim=32, depths=(2, 2, 2, 2), heads=(1, 2, 4, 8))  # matches MITr "tiny"


def _swin_rel_index(ws):
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(
        1
    )
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)  # (N, N, 2)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]  # (N, N)


def _swin_mask(res, ws, shift):
    """Official SW-MSA mask: 9 regions of the rolled map, -100 between different regions."""
    img = torch.zeros(1, res, res, 1)
    cnt = 0
    for h in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for w in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, h, w, :] = cnt
            cnt += 1
    win = (
        img.view(1, res // ws, ws, res // ws, ws, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws)
    )
    m = win[:, None, :] - win[:, :, None]
    return m.masked_fill(m != 0, -100.0)  # (nW, N, N)


def _swin_fake(embed_dim, depths, heads, ws=7, img=224, classes=1000, device="cpu", seed=0):
    """An official-layout Swin state dict with random (non-trivial) values, buffers included."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape, scale=0.05, mean=0.0, real=False):
        if device == "meta" and not real:
            return torch.empty(shape, device="meta")
        return mean + scale * torch.randn(shape, generator=g)

    C, sd = embed_dim, {}
    sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"] = t(C, 3, 4, 4, scale=0.2), t(C)
    sd["patch_embed.norm.weight"], sd["patch_embed.norm.bias"] = t(C, mean=1.0), t(C)
    res = img // 4
    for i, (d, h) in enumerate(zip(depths, heads, strict=True)):
        dim, w = C * 2**i, min(ws, res)
        for j in range(d):
            p = f"layers.{i}.blocks.{j}."
            sd[p + "norm1.weight"], sd[p + "norm1.bias"] = t(dim, mean=1.0), t(dim)
            # (real even on "meta": bicubic resizing of meta tensors is slow; these are small)
            sd[p + "attn.relative_position_bias_table"] = t(
                (2 * w - 1) ** 2, h, scale=0.5, real=True
            )
            sd[p + "attn.relative_position_index"] = _swin_rel_index(w).to(device)
            sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"] = t(3 * dim, dim), t(3 * dim)
            sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = t(dim, dim), t(dim)
            sd[p + "norm2.weight"], sd[p + "norm2.bias"] = t(dim, mean=1.0), t(dim)
            sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = t(4 * dim, dim), t(4 * dim)
            sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = t(dim, 4 * dim), t(dim)
            if j % 2 and res > w:
                sd[p + "attn_mask"] = _swin_mask(res, w, w // 2).to(device)
        if i < 3:
            sd[f"layers.{i}.downsample.norm.weight"] = t(4 * dim, mean=1.0)
            sd[f"layers.{i}.downsample.norm.bias"] = t(4 * dim)
            sd[f"layers.{i}.downsample.reduction.weight"] = t(2 * dim, 4 * dim)
            res //= 2
    sd["norm.weight"], sd["norm.bias"] = t(8 * C, mean=1.0), t(8 * C)
    sd["head.weight"], sd["head.bias"] = t(classes, 8 * C), t(classes)
    return sd


def _swin_to_timm(sd):
    """Official -> timm layout: patch merging moves to the start of the next stage; head -> head.fc.
    (timm's 4C order is the official one: tensors move unchanged.)"""
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        if p[0] == "layers" and p[2] == "downsample":
            p[1] = str(int(p[1]) + 1)
        if p[0] == "head":
            p.insert(1, "fc")
        out[".".join(p)] = v
    return out


def _swin_from_mitr(model):
    """The inverse of load_swin's mapping: a MITr state dict -> an official Swin checkpoint."""
    out = {}
    for k, v in model.state_dict().items():
        p = k.split(".")
        if p[0] == "stages" and p[2] == "units" and p[4] in ("w_msa", "sw_msa"):
            j = 2 * int(p[3]) + (p[4] == "sw_msa")  # Swin's blocks: W-MSA, SW-MSA, W-MSA, ...
            rest = ["attn" if q == "pixel_attention" else q for q in p[5:]]
            p = ["layers", p[1], "blocks", str(j), *rest]
        elif p[0] == "stages" and p[2] == "space_to_depth":
            p = ["layers", p[1], "downsample", *p[3:]]
        elif p[0] in ("head", "object_token", "count_head") or "cross_window" in p:
            continue
        out[".".join(p)] = v
    return out


def _swin_reference_features(sd, ws, x):
    """Official Swin V1 forward_features (norm, average pool) on an official-layout state dict:
    explicit softmax attention, -100 shift mask, patch merging by x0..x3 slicing."""
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4)
    B, C, H, W = x.shape
    x = F.layer_norm(
        x.flatten(2).transpose(1, 2),
        (C,),  # (B, C, H, W) -> (B, HW, C)
        sd["patch_embed.norm.weight"],
        sd["patch_embed.norm.bias"],
    )
    for i in range(4):
        w = min(ws, H)
        N, nW = w * w, (H // w) * (W // w)
        j = 0
        while f"layers.{i}.blocks.{j}.norm1.weight" in sd:
            p = f"layers.{i}.blocks.{j}."
            table = sd[p + "attn.relative_position_bias_table"]
            h, shift = table.shape[1], (w // 2 if j % 2 and H > w else 0)
            y = F.layer_norm(x, (C,), sd[p + "norm1.weight"], sd[p + "norm1.bias"]).view(B, H, W, C)
            if shift:
                y = torch.roll(y, (-shift, -shift), (1, 2))
            y = y.view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, N, C)
            qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
            q, k, v = qkv.view(-1, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
            attn = (q * (C // h) ** -0.5) @ k.transpose(-2, -1)
            attn = attn + table[_swin_rel_index(w).view(-1)].view(N, N, h).permute(2, 0, 1)
            if shift:
                attn = (attn.view(B, nW, h, N, N) + _swin_mask(H, w, shift)[None, :, None]).view(
                    -1, h, N, N
                )
            y = (attn.softmax(-1) @ v).transpose(1, 2).reshape(-1, N, C)
            y = F.linear(y, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
            y = y.view(B, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
            if shift:
                y = torch.roll(y, (shift, shift), (1, 2))
            x = x + y.reshape(B, H * W, C)
            z = F.layer_norm(x, (C,), sd[p + "norm2.weight"], sd[p + "norm2.bias"])
            z = F.linear(
                F.gelu(F.linear(z, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                sd[p + "mlp.fc2.weight"],
                sd[p + "mlp.fc2.bias"],
            )
            x = x + z
            j += 1
        if f"layers.{i}.downsample.reduction.weight" in sd:
            y = x.view(B, H, W, C)
            y = torch.cat(
                [y[:, 0::2, 0::2], y[:, 1::2, 0::2], y[:, 0::2, 1::2], y[:, 1::2, 1::2]], -1
            )
            y = F.layer_norm(
                y.reshape(B, -1, 4 * C),
                (4 * C,),
                sd[f"layers.{i}.downsample.norm.weight"],
                sd[f"layers.{i}.downsample.norm.bias"],
            )
            x = F.linear(y, sd[f"layers.{i}.downsample.reduction.weight"])
            H, W, C = H // 2, W // 2, 2 * C
    return F.layer_norm(x, (C,), sd["norm.weight"], sd["norm.bias"]).mean(1)


def _swin_plain(variant):
    """MITr with only the pixel-attention path: exactly a Swin."""
    return dataclasses.replace(
        VARIANTS[variant], cross_window=False, object_token=False, arc_sigmoid=False
    )


def test_swin_tiny_matches_reference_swin_both_layouts():
    torch.manual_seed(0)
    sd = _swin_fake(**_SWIN_TINY, ws=3, img=96)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        want = _swin_reference_features(sd, 3, x)
        models = []
        for ckpt in ({"model": sd}, _swin_to_timm(sd)):
            m = MITr(_swin_plain("tiny"), 5).eval()
            load_swin(m, ckpt)
            models.append(m)
            got = _features(m, x)
            # MITr masks with -inf where Swin adds -100: exp(-100) ~ 4e-44, below float32's reach.
            assert (got - want).abs().max() < 1e-5
    a, b = (m.state_dict() for m in models)
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("head."))


def test_swin_s_official_roundtrip_exact():
    """A Swin-T checkpoint made from a random MITr-s by renaming keys, loaded into a fresh MITr-s:
    the same weights, and the features of the official Swin-T forward."""
    torch.manual_seed(0)
    src = MITr(_swin_plain("s"), 80).eval()
    with torch.no_grad():
        for p in src.parameters():
            if p.dim() == 1:  # LN weights are 1 and biases 0 at init
                p.add_(0.05 * torch.randn_like(p))
    sd = _swin_from_mitr(src)
    ref = _swin_fake(**_SWIN_T, device="meta")  # the official Swin-T key set, no values
    params = {
        k
        for k in ref
        if not k.endswith(("relative_position_index", "attn_mask")) and k[:5] != "head."
    }
    assert params == set(sd)
    for k in ref:  # add buffers and a 1000-class head, as released
        if k not in sd:
            sd[k] = torch.zeros(ref[k].shape, dtype=ref[k].dtype)
    dst = copy.deepcopy(src)  # a fresh MITr-s, faster than building one:
    with torch.no_grad():  # every parameter redrawn
        for p in dst.parameters():
            p.normal_(0.0, 0.02)
    report = load_swin(dst, {"model": sd})
    assert report["layout"] == "official" and report["new"] == ["head.weight", "head.bias"]
    assert len(report["loaded"]) == 171 and not report["resized"] and not report["unexpected"]
    assert len(report["skipped"]) == 12 + 5 + 2  # 12 index buffers, 5 masks (1+1+3), head w/b
    s, d = src.state_dict(), dst.state_dict()
    assert all(torch.equal(s[k], d[k]) for k in report["loaded"])
    # Same weights, so compare with an independent Swin-T forward on the checkpoint instead of src.
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (_features(dst, x) - _swin_reference_features(sd, 7, x)).abs().max() < 1e-4


def test_swin_patch_merging_timm_layout_hand_built():
    """timm's layers.1.downsample is MITr's stages.0.space_to_depth, tensors unchanged, and it
    merges x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2] in that order."""
    sd = _swin_to_timm(_swin_fake(**_SWIN_TINY, ws=3, img=96))
    m = MITr(VARIANTS["tiny"], 5)
    load_swin(m, sd)
    s2d = m.stages[0].space_to_depth
    assert torch.equal(s2d.reduction.weight, sd["layers.1.downsample.reduction.weight"])
    assert torch.equal(s2d.norm.weight, sd["layers.1.downsample.norm.weight"])
    # Hand-built input: channel c of pixel (r, q) is 1000 r + q + c / 100: every slot is distinct.
    r, q, c = torch.meshgrid(
        torch.arange(4.0), torch.arange(4.0), torch.arange(32.0), indexing="ij"
    )
    x = (1000 * r + q + c / 100)[None]  # (1, 4, 4, 32)
    cat = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    assert (
        cat[0, 0, 0, 32] == 1000 and cat[0, 0, 0, 64] == 1
    )  # slot 1 is (dh, dw) = (1, 0), slot 2 (0, 1)
    p = "layers.1.downsample."
    want = F.linear(
        F.layer_norm(cat.reshape(1, 4, 128), (128,), sd[p + "norm.weight"], sd[p + "norm.bias"]),
        sd[p + "reduction.weight"],
    )
    with torch.no_grad():
        got = s2d(x.reshape(1, 16, 32), 4, 4)
    assert (got - want).abs().max() < 1e-5


@pytest.mark.filterwarnings(
    "ignore:.*meta parameter"
)  # copying real bias tables into meta: a no-op
@pytest.mark.parametrize(
    "variant,swin,ws,img,resized",
    [
        ("s", _SWIN_T, 7, 224, 0),  # MITr-s (1k / 22k) <- Swin-T
        ("m", _SWIN_S, 7, 224, 24),  # MITr-m <- Swin-S 22k: only at window 7, so 13^2 -> 23^2
        ("l", _SWIN_B, 12, 384, 0),  # MITr-l <- Swin-B 22k at 384, window 12
        ("l", _SWIN_B, 7, 224, 24),
    ],
)
def test_swin_every_variant_both_layouts(variant, swin, ws, img, resized):
    with torch.device("meta"):  # shapes only: no memory, no time
        model = MITr(VARIANTS[variant], 80)
    sd = _swin_fake(**swin, ws=ws, img=img, classes=21841, device="meta")
    for ckpt, layout in ((sd, "official"), (_swin_to_timm(sd), "timm")):
        report = load_swin(model, ckpt)
        assert report["layout"] == layout and len(report["resized"]) == resized
        assert all(n.endswith("relative_position_bias_table") for n in report["resized"])
        assert all(
            ".cross_window." in n or n.startswith(("head.", "object_token", "count_head."))
            for n in report["new"]
        )
        assert len(report["loaded"]) + len(report["new"]) == len(model.state_dict())
    if resized:
        assert any("window 7 -> 12" in n for n in report["notes"])
        table = model.stages[0].units[0].w_msa.pixel_attention.relative_position_bias_table
        assert table.shape[0] == 23**2


def test_swin_wrong_checkpoint_for_variant_raises():
    with torch.device("meta"):
        s, m = MITr(VARIANTS["s"], 80), MITr(VARIANTS["m"], 80)
    with pytest.raises(ValueError, match=r"no place.*layers\.2\.blocks\.6.*strict=False"):
        load_swin(s, _swin_fake(**_SWIN_S, device="meta"))  # Swin-S has 18 blocks in stage 3
    with pytest.raises(ValueError, match=r"lacks 156 pixel-path.*Swin-S"):
        load_swin(m, _swin_fake(**_SWIN_T, device="meta"))  # Swin-T: 6 of m's 18 blocks (12 x 13)
    with pytest.raises(ValueError, match=r"shape mismatch.*patch_embed"):
        load_swin(s, _swin_fake(**_SWIN_B, device="meta"))  # C = 128, not 96


def test_swin_window_resize_bicubic():
    cfg7 = MITrConfig(
        img_size=224, embed_dim=8, window_size=7, depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2)
    )
    sd = _swin_from_mitr(MITr(cfg7, 3))
    tables = [k for k in sd if k.endswith("relative_position_bias_table")]
    assert len(tables) == 8 and sd[tables[0]].shape == (13 * 13, 2)
    sd[tables[0]] = torch.full((169, 2), 0.75)  # constant: stays constant
    sd[tables[1]] = torch.randn(169, 2)
    m = MITr(dataclasses.replace(cfg7, img_size=384, window_size=12), 3)
    report = load_swin(m, sd)
    assert len(report["resized"]) == 8
    assert (
        report["resized"][0]
        == "stages.0.units.0.w_msa.pixel_attention.relative_position_bias_table"
    )
    t0 = m.stages[0].units[0].w_msa.pixel_attention.relative_position_bias_table
    t1 = m.stages[0].units[0].sw_msa.pixel_attention.relative_position_bias_table
    assert t0.shape == (23 * 23, 2) and torch.allclose(t0, torch.full_like(t0, 0.75), atol=1e-6)
    # align_corners=False maps output centre 11 to input (11 + 0.5) * 13/23 - 0.5 = 6 exactly, where
    # the bicubic kernel is (0, 1, 0, 0): the zero-offset bias (row 6*13+6) survives unchanged.
    assert torch.allclose(t1[11 * 23 + 11], sd[tables[1]][6 * 13 + 6], atol=1e-6)
    assert not torch.allclose(t1[0], sd[tables[1]][0])  # a corner is interpolated
    heads = dataclasses.replace(cfg7, img_size=384, window_size=12, num_heads=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="shape mismatch"):  # other head count: no resize
        load_swin(MITr(heads, 3), sd)


@pytest.mark.parametrize("shape", [(24, 1), (4, 1), (25,), (0, 1), (25, 1, 1)])
def test_swin_malformed_bias_table_is_one_line_even_nonstrict(shape):
    # A Swin bias table is ((2w-1)^2, heads); here rows that are no odd square, 1-D, empty, 3-D.
    sd = _swin_fake(**_SWIN_TINY, ws=3, img=96)
    key = "layers.0.blocks.1.attn.relative_position_bias_table"
    sd[key] = torch.zeros(shape)
    m = MITr(VARIANTS["tiny"], 5)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for strict in (True, False):
        with pytest.raises(ValueError, match=rf"^load_swin: {re.escape(key)} has shape") as error:
            load_swin(m, sd, strict=strict)
        assert "\n" not in str(error.value) and "no relative position bias" in str(error.value)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # untouched
    sd[key] = torch.randn(7 * 7, 1)  # a window of 4: well formed, resized
    resized = load_swin(m, sd)["resized"]
    assert resized == ["stages.0.units.0.sw_msa.pixel_attention.relative_position_bias_table"]


def test_swin_strict_and_nonstrict():
    sd = _swin_fake(**_SWIN_TINY, ws=3, img=96)
    sd["layers.0.blocks.0.attn.logit_scale"] = torch.zeros(1, 1, 1)  # a Swin V2 key
    sd["norm.weight"] = torch.ones(100)
    m = MITr(VARIANTS["tiny"], 5)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"logit_scale.*shape mismatch.*norm\.weight.*--init-nonstrict"
    ):
        load_swin(m, sd)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # untouched on error
    report = load_swin(m, sd, strict=False)
    assert report["unexpected"] == ["layers.0.blocks.0.attn.logit_scale"]
    assert report["mismatched"] == ["norm.weight (100,) vs norm.weight (256,)"]
    assert "norm.weight" in report["new"] and "norm.bias" in report["loaded"]
    assert torch.equal(m.patch_embed.proj.weight, sd["patch_embed.proj.weight"])


def test_swin_from_file_and_report(tmp_path):
    path = tmp_path / "swin_tiny.pth"
    torch.save(
        {"model": {"module." + k: v for k, v in _swin_fake(**_SWIN_TINY, ws=3, img=96).items()}},
        path,
    )
    m = MITr(VARIANTS["tiny"], 5)
    report = load_swin(m, str(path))
    text = format_swin_report(report)
    lines = text.splitlines()
    assert len(lines) <= 12 and lines[0].startswith(
        "Swin init (official layout): 119 tensors loaded"
    )
    assert "new:" in text and "stages.0.units.0.cross_window" in text and "skipped:" in text
    with pytest.raises(ValueError, match="cannot read"):
        load_swin(m, tmp_path / "missing.pth")


def test_swin_matches_timm_swin_t():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    with torch.no_grad():
        for n, p in swin.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if "relative_position_bias_table" in n else 0.05))
    m = MITr(_swin_plain("s"), 80).eval()
    report = load_swin(m, swin.state_dict())
    assert report["layout"] == "timm" and report["new"] == ["head.weight", "head.bias"]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = swin.forward_head(swin.forward_features(x), pre_logits=True)
        assert (_features(m, x) - want).abs().max() < 1e-4


# =============================================================================
# python mitr.py --bench: smoke test, no timing assertions


def test_model_bench_cli_prints_speed_and_cross_window_share():
    out = subprocess.run(
        [
            sys.executable,
            "mitr.py",
            "--bench",
            "--variant",
            "tiny",
            "--device",
            "cpu",
            "--batch",
            "2",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "MITr-tiny on cpu" in out and "GMACs per image" in out
    for step in ("forward", "training"):
        assert re.search(rf"^{step}\s+[\d.]+ img/s\s+[\d.]+ GFLOP/s achieved$", out, re.M), out
    assert re.search(
        r"cross-window attention: [\d.]+% of FLOPs, -?[\d.]+% of forward time, "
        r"-?[\d.]+% of training time",
        out,
    ), out


# =============================================================================
# losses.py (Section 3.2, Eqs. 12-18)


def _lg(p):
    """Logits of probabilities p, in float64 so that sigmoid(logit(p)) = p to ~1e-16."""
    return torch.logit(torch.as_tensor(p, dtype=torch.float64))


def test_losses_bce_hand():
    # p = [0.5, 0.75], y = [1, 0]: -ln 0.5 - ln(1 - 0.75) = ln 2 + ln 4 = 3 ln 2
    # second sample y = [-1, 1]: only -ln 0.75
    z = _lg([[0.5, 0.75], [0.5, 0.75]])
    y = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    out = bce_loss(z, y)
    assert out.shape == (2,)
    assert torch.allclose(
        out, torch.tensor([3 * math.log(2), -math.log(0.75)], dtype=torch.float64)
    )


def test_losses_asl_hand():
    # p = [0.8, 0.3, 0.04], y = [1, 0, 0], g+ = 0, g- = 4, m = 0.05
    # positive:       -ln 0.8                          = 0.2231436
    # negative p=0.3: p_m = 0.25, 0.25^4 = 0.00390625; -0.00390625 * ln(0.75) = 0.0011238
    # negative p=.04: p_m = max(-0.01, 0) = 0 -> 0  (the printed Eq. 16: -1e-8 ln 1.01 < 0)
    # total 0.2242674
    z = _lg([[0.8, 0.3, 0.04]])
    y = torch.tensor([[1.0, 0.0, 0.0]])
    expect = -math.log(0.8) - 0.25**4 * math.log(0.75)
    out = asymmetric_loss(z, y)
    assert out.shape == (1,)
    assert abs(out.item() - expect) < 1e-6
    # the two halves, Eqs. (15) and (16), entry by entry
    assert abs(asl_positive(z)[0, 0].item() - math.log(0.8)) < 1e-12
    assert abs(asl_negative(z)[0, 1].item() - 0.25**4 * math.log(0.75)) < 1e-12
    assert asl_negative(z)[0, 2].item() == 0.0
    # g+ = 1: the positive term becomes -(1 - 0.8) ln 0.8 = 0.0446287
    expect1 = -0.2 * math.log(0.8) - 0.25**4 * math.log(0.75)
    assert abs(asymmetric_loss(z, y, gamma_pos=1.0).item() - expect1) < 1e-6
    # with y = -1 on the positive, only the 0.0011238 remains
    assert (
        abs(asymmetric_loss(z, torch.tensor([[-1.0, 0.0, 0.0]])).item() + 0.25**4 * math.log(0.75))
        < 1e-7
    )
    # a negative below the margin never yields a negative loss (the clip of Eq. 16), even with
    # g- = 0, where the weight p_m^0 = 1 leaves only log(1 - p_m) = 0 to keep it there
    for gamma_neg in (0.0, 1.0):
        assert asymmetric_loss(_lg([[0.01]]), torch.tensor([[0.0]]), gamma_neg=gamma_neg) == 0.0
    # a non-integer g- (printed Eq. 16: (0.01 - 0.05)^2.5 = NaN): here p = 0.01 gives 0 and
    # p = 0.5 gives -(0.45^2.5) ln(0.55) = 0.0813; finite gradients also when differentiated
    zz = _lg([[0.01, 0.5]]).requires_grad_()
    out = asymmetric_loss(zz, torch.zeros(1, 2), gamma_neg=2.5, detach_focus=False)
    out.sum().backward()
    assert abs(out.item() + 0.45**2.5 * math.log(0.55)) < 1e-6 and torch.isfinite(zz.grad).all()


def _lm_literal_asl(z, y, gp, gn, m):
    """Eqs. (14)-(16) written out on p = sigmoid(z), one entry at a time (float64 oracle)."""
    out = []
    for zi, yi in zip(z.tolist(), y.tolist(), strict=True):
        total = 0.0
        for zij, yij in zip(zi, yi, strict=True):
            p = 1 / (1 + math.exp(-zij))
            p_m = max(p - m, 0.0)
            if yij == 1:
                total -= (1 - p) ** gp * math.log(p)  # Eq. (15)
            elif yij == 0:
                total -= p_m**gn * math.log(1 - p_m)  # Eq. (16)
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def test_losses_asl_equals_literal_formula():
    torch.manual_seed(1)
    z = torch.randn(4, 6, dtype=torch.float64) * 3
    y = torch.randint(-1, 2, (4, 6)).double()
    for gp, gn, m in ((0.0, 4.0, 0.05), (1.0, 4.0, 0.05), (2.0, 1.5, 0.2), (0.0, 0.0, 0.0)):
        assert torch.allclose(
            asymmetric_loss(z, y, gp, gn, m), _lm_literal_asl(z, y, gp, gn, m), atol=1e-10
        )


def test_losses_asl_reduces_to_bce():
    # g+ = g- = 0 and m = 0: Eqs. (14)-(16) are Eq. (12)
    torch.manual_seed(0)
    z = torch.randn(5, 7)
    y = torch.randint(-1, 2, (5, 7)).float()
    a = asymmetric_loss(z, y, 0.0, 0.0, 0.0)
    assert torch.allclose(a, bce_loss(z, y), atol=1e-6)
    ref = F.binary_cross_entropy_with_logits(
        z, y.clamp(min=0), weight=(y != -1).float(), reduction="none"
    ).sum(1)
    assert torch.allclose(a, ref, atol=1e-5)


def test_losses_otl_hand():
    # count logits [0, 0, ln 2] over z in {0, 1, 2}: softmax = [1, 1, 2] / 4
    # y = [1, 1] -> z = 2 -> -ln(2/4) = ln 2;  y = [1, -1] -> z = 1 -> -ln(1/4) = ln 4;
    # y = [0, 0] (no positive) -> z = 0 -> ln 4
    c = torch.tensor([[0.0, 0.0, math.log(2)]]).repeat(3, 1)
    y = torch.tensor([[1.0, 1.0], [1.0, -1.0], [0.0, 0.0]])
    out = object_token_loss(c, y)
    assert torch.allclose(out, torch.tensor([math.log(2), math.log(4), math.log(4)]))


def test_losses_mitr_loss_hand_and_composition():
    # sample 1: logits [ln 4, -ln 4] -> p = [0.8, 0.2], y = [1, 0]
    #   ASL = -ln 0.8 - 0.15^4 ln 0.85 = 0.2231436 + 0.0000821 = 0.2232257
    #   count logits [0, 0, 0] -> OTL = ln 3 = 1.0986123 (z = 1)
    # sample 2: same logits, y = [-1, -1] -> ASL = 0, z = 0 -> OTL = ln 3
    # loss = mean(0.2232257 + ln 3, ln 3) = 0.1116128 + 1.0986123 = 1.2102251
    z = torch.tensor([[math.log(4), -math.log(4)]] * 2, requires_grad=True)
    c = torch.zeros(2, 3, requires_grad=True)
    y = torch.tensor([[1.0, 0.0], [-1.0, -1.0]])
    asl1 = -math.log(0.8) - 0.15**4 * math.log(0.85)
    loss, parts = mitr_loss(z, c, y)
    assert loss.dim() == 0
    assert abs(loss.item() - (asl1 / 2 + math.log(3))) < 1e-6
    assert abs(parts["asl"].item() - asl1 / 2) < 1e-6
    assert abs(parts["otl"].item() - math.log(3)) < 1e-6
    # the parts are detached 0-d tensors: the caller decides when to copy them to the host
    for part in parts.values():
        assert isinstance(part, torch.Tensor) and part.dim() == 0 and part.grad_fn is None
    # without the object-aware token
    loss0, parts0 = mitr_loss(z, None, y)
    assert abs(loss0.item() - asl1 / 2) < 1e-6 and parts0["otl"].item() == 0.0
    # composition of the per-equation functions, Eq. (18): the batch mean of per-sample sums
    torch.manual_seed(2)
    z, c, y = torch.randn(6, 5), torch.randn(6, 6), torch.randint(-1, 2, (6, 5)).float()
    expect = (asymmetric_loss(z, y) + object_token_loss(c, y)).mean()
    assert torch.allclose(mitr_loss(z, c, y)[0], expect, atol=1e-5)


def test_losses_mitr_loss_casts_half_to_float32():
    z = torch.randn(3, 4).half()
    c = torch.randn(3, 5).bfloat16()
    y = torch.randint(0, 2, (3, 4)).float()
    loss, _ = mitr_loss(z, c, y)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, mitr_loss(z.float(), c.float(), y)[0])


def test_losses_extremes_finite():
    # logits +-100 with every label combination, a sample without positives
    z = torch.tensor(
        [[100.0, -100.0, 100.0, -100.0], [100.0, -100.0, 0.0, 3.0]], requires_grad=True
    )
    c = torch.tensor(
        [[100.0, -100.0, 0.0, 0.0, 0.0], [-100.0, 100.0, 0.0, 0.0, 0.0]], requires_grad=True
    )
    y = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    for detach in (True, False):
        z.grad = c.grad = None
        loss, parts = mitr_loss(z, c, y, detach_focus=detach)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(torch.stack(list(parts.values()))).all()
        assert torch.isfinite(z.grad).all() and torch.isfinite(c.grad).all()
    # the log-sigmoid form is exact: a positive at logit -100 costs exactly 100 (g+ = 0), and so
    # does a negative at +100 under BCE (m = 0, where 1 - p = 4e-44 would underflow a log(1 - p))
    one = mitr_loss(torch.tensor([[-100.0]]), None, torch.tensor([[1.0]]))[0]
    assert abs(one.item() - 100.0) < 1e-4
    assert abs(bce_loss(torch.tensor([[110.0]]), torch.tensor([[0.0]])).item() - 110.0) < 1e-4
    assert (
        abs(
            asymmetric_loss(torch.tensor([[110.0]]), torch.tensor([[0.0]]), 0.0, 0.0, 0.0).item()
            - 110.0
        )
        < 1e-4
    )


def test_losses_gradcheck_all():
    # the fully differentiated form (detach_focus=False) against finite differences
    torch.manual_seed(3)
    d64 = dict(dtype=torch.float64)
    y = torch.tensor([[1, 0, -1, 0, 1], [0, 0, 0, 0, 0], [1, 1, 0, -1, 0]], **d64)
    z = torch.randn(3, 5, **d64, requires_grad=True)  # away from the kink at p = m (z = -2.94)
    assert torch.autograd.gradcheck(lambda z: bce_loss(z, y), (z,))
    assert torch.autograd.gradcheck(
        lambda z: asymmetric_loss(z, y, 1.0, 4.0, 0.05, detach_focus=False), (z,)
    )
    assert torch.autograd.gradcheck(
        lambda z: asymmetric_loss(z, y, 0.0, 4.0, 0.05, detach_focus=False), (z,)
    )
    c = torch.randn(3, 6, **d64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: object_token_loss(c, y), (c,))
    assert torch.autograd.gradcheck(lambda z, c: mitr_loss(z, c, y, detach_focus=False)[0], (z, c))


def test_losses_detach_focus_is_the_default():
    # ASL's recipe: the focusing weights (1 - p)^g+, p_m^g- are constants of the backward pass.
    torch.manual_seed(4)
    z = (2 * torch.randn(4, 6, dtype=torch.float64)).requires_grad_()
    y = torch.randint(-1, 2, (4, 6)).double()
    (g_default,) = torch.autograd.grad(mitr_loss(z, None, y, gamma_pos=1.0)[0], z)
    (g_full,) = torch.autograd.grad(mitr_loss(z, None, y, gamma_pos=1.0, detach_focus=False)[0], z)
    # the detached computation written out: weights from a detached p, gradient through logs only
    p = torch.sigmoid(z.detach())
    p_m = (p - 0.05).clamp(min=0)
    log_1m_pm = torch.log((1 - torch.sigmoid(z) + 0.05).clamp(max=1))
    L = -((y == 1) * (1 - p) * F.logsigmoid(z)).sum(1) - ((y == 0) * p_m**4 * log_1m_pm).sum(1)
    (g_detached,) = torch.autograd.grad(L.mean(), z)
    assert torch.allclose(g_default, g_detached, atol=1e-12)
    assert not torch.allclose(g_default, g_full, atol=1e-4)
    assert torch.allclose(
        mitr_loss(z, None, y)[0], mitr_loss(z, None, y, detach_focus=False)[0]
    )  # same value


def test_losses_compose_with_model_head():
    # Eq. (13) lives in mitr.py; its logits s cos theta feed the losses, p = sigmoid(s cos theta).
    import mitr

    # x = [3, 4] (norm 5); W_1 = [1, 0] -> cos = 3/5; W_2 = [0, -2] -> cos = -4/5; s = 8: 4.8, -6.4
    x = torch.tensor([[3.0, 4.0]])
    W = torch.tensor([[1.0, 0.0], [0.0, -2.0]])
    logits = mitr.arc_logits(x, W, 8.0)
    assert torch.allclose(logits, torch.tensor([[4.8, -6.4]]))
    head = mitr.ArcHead(2, 2, s=8.0)
    with torch.no_grad():
        head.weight.copy_(W)
    assert torch.allclose(head(x), logits)
    # y = [1, 0]: p_2 = sigmoid(-6.4) = 0.0017 < m, so only -log sigmoid(4.8) remains (Eq. 14-16)
    loss, _ = mitr_loss(logits, None, torch.tensor([[1.0, 0.0]]))
    assert abs(loss.item() - math.log(1 + math.exp(-4.8))) < 1e-6
    # a zero feature vector: finite loss and gradients through head and loss
    x0 = torch.zeros(2, 3, requires_grad=True)
    W0 = torch.randn(4, 3, requires_grad=True)
    mitr_loss(mitr.arc_logits(x0, W0, 8.0), torch.zeros(2, 5), torch.ones(2, 4))[0].backward()
    assert torch.isfinite(x0.grad).all() and torch.isfinite(W0.grad).all()


# =============================================================================
# metrics.py (Section 4.1 metrics, Table 7)


def _lm_brute_ap(scores, targets):
    """Reference AP: walk the distinct thresholds (tie groups) one at a time, sklearn-style."""
    out = []
    for k in range(scores.shape[1]):
        keep = targets[:, k] != -1
        s, t = scores[keep, k], targets[keep, k]
        n_pos = (t == 1).sum()
        if n_pos == 0:
            out.append(np.nan)
            continue
        ap, prev = 0.0, 0
        for th in np.unique(s)[::-1]:
            sel = s >= th
            tp, fp = (t[sel] == 1).sum(), (t[sel] == 0).sum()
            ap += (tp - prev) / n_pos * tp / (tp + fp)
            prev = tp
        out.append(100 * ap)
    return np.array(out)


def _lm_devkit_voc11(scores, targets):
    """The VOC2007 devkit's VOCevalcls 11-point AP transcribed loop by loop (gt 1 / 0 / -1 there are
    1 / -1 / 0 here); its grid 0:0.1:1 as MATLAB produces it. For scores without ties."""
    grid = [0.0, 0.1, 0.2, 0.30000000000000004, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    out = []
    for k in range(scores.shape[1]):
        gt = targets[np.argsort(-scores[:, k], kind="stable"), k]
        tp, fp = np.cumsum(gt == 1), np.cumsum(gt == 0)
        rec = tp / (gt == 1).sum()
        with np.errstate(invalid="ignore"):
            prec = tp / (fp + tp)
        ap = 0.0
        for t in grid:
            p = prec[(rec >= t) & ~np.isnan(prec)]  # MATLAB's max skips NaN
            ap += (p.max() if p.size else 0.0) / 11
        out.append(100 * ap)
    return np.array(out)


def test_metrics_ap_hand():
    # ranked 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.6 (neg): precision at positives 1/1, 2/3
    # AP = (1 + 2/3) / 2 = 5/6 = 83.333 %
    s = np.array([0.9, 0.8, 0.7, 0.6])[:, None]
    t = np.array([1, 0, 1, 0])[:, None]
    assert np.allclose(average_precision(s, t), [500 / 6])
    # torch tensors are accepted
    assert np.allclose(average_precision(torch.tensor(s), torch.tensor(t)), [500 / 6])


def test_metrics_ap_perfect_and_reversed():
    # perfect: 100. reversed with N = 4, P = 2: positives at ranks 3, 4 -> (1/3 + 2/4) / 2 = 5/12
    s = np.array([4.0, 3.0, 2.0, 1.0])[:, None]
    assert np.allclose(average_precision(s, np.array([[1], [1], [0], [0]])), [100.0])
    assert np.allclose(average_precision(s, np.array([[0], [0], [1], [1]])), [100 * 5 / 12])
    # reversed in general: the j-th positive sits at rank N - P + j -> mean_j j / (N - P + j)
    N, P = 50, 7
    t = np.zeros((N, 1))
    t[-P:] = 1
    expect = 100 * np.mean([j / (N - P + j) for j in range(1, P + 1)])
    assert np.allclose(average_precision(-np.arange(N, dtype=float)[:, None], t), [expect])


def test_metrics_ap_ties_grouped_and_order_free():
    # scores 0.5, 0.5, 0.5, 0.1 with targets 1, 0, 1, 0: the tie group holds 2 TP, 1 FP, so both
    # positives get precision 2/3 -> AP 66.667 (a stable sort: 83.3 or 58.3 by input order)
    s = np.array([0.5, 0.5, 0.5, 0.1])[:, None]
    t = np.array([1, 0, 1, 0])[:, None]
    assert np.allclose(average_precision(s, t), [200 / 3])
    assert np.allclose(average_precision(s, t[[1, 0, 2, 3]]), [200 / 3])
    # random heavily tied matrices: independent of row order, equal to the brute-force reference
    rng = np.random.default_rng(0)
    s = rng.integers(0, 4, (40, 6)).astype(float)
    t = rng.integers(-1, 2, (40, 6))
    t[:, 5] = np.where(t[:, 5] == 1, 0, t[:, 5])  # a class without positives
    ap = average_precision(s, t)
    assert np.allclose(ap, _lm_brute_ap(s, t), equal_nan=True)
    assert np.isnan(ap[5]) and not np.isnan(ap[:5]).any()
    perm = rng.permutation(40)
    assert np.allclose(
        average_precision(s[perm], t[perm]), ap, rtol=1e-12, equal_nan=True
    )  # up to summation order


def test_metrics_ap_monotone_invariance():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(200, 5))
    t = (rng.random((200, 5)) < 0.3).astype(int)
    ap = average_precision(s, t)
    p = 1 / (1 + np.exp(-s))  # sigmoid
    assert np.allclose(average_precision(p, t), ap)
    assert np.allclose(average_precision(np.exp(3 * s) + 7, t), ap)
    assert np.allclose(average_precision(s.astype(np.float32), t), ap)
    assert not np.allclose(average_precision(-s, t), ap)


def test_metrics_ap_ignore_equals_removal():
    # a -1 entry is left out: same AP as deleting that sample from that class
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5])[:, None]
    t = np.array([-1, 0, 1, -1, 1])[:, None]
    keep = t[:, 0] != -1
    # without the ignored ones: 0.8 (neg), 0.7 (pos), 0.5 (pos) -> (1/2 + 2/3) / 2 = 58.333
    assert np.allclose(average_precision(s, t), [100 * 7 / 12])
    assert np.allclose(average_precision(s[keep], t[keep]), [100 * 7 / 12])
    # and so for every class of a random matrix, in both AP definitions
    rng = np.random.default_rng(5)
    s, t = rng.random((30, 4)), rng.integers(-1, 2, (30, 4))
    for voc11 in (False, True):
        for k in range(4):
            keep = t[:, k] != -1
            removed = average_precision(s[keep, k : k + 1], t[keep, k : k + 1], voc11)[0]
            assert np.isclose(average_precision(s, t, voc11)[k], removed)


def test_metrics_voc11_hand():
    # ranks: pos, neg, pos, neg -> (P, R) = (1, .5), (.5, .5), (2/3, 1), (.5, 1)
    # 11-point: t = 0 .. .5 (6 points, recall exactly .5 counts) -> max P = 1; t = .6 .. 1 -> 2/3
    #   AP = (6 + 5 * 2/3) / 11 = 84.848 %
    s = np.array([0.9, 0.8, 0.7, 0.6])[:, None]
    t = np.array([1, 0, 1, 0])[:, None]
    assert np.allclose(average_precision(s, t, voc11=True), [100 * (6 + 5 * 2 / 3) / 11])
    # ranks: neg, pos, pos, neg: the best precision at any recall is 2/3 -> 66.667
    assert np.allclose(average_precision(s, np.array([0, 1, 1, 0])[:, None], voc11=True), [200 / 3])
    # perfect ranking is 100, no positive is NaN
    assert np.allclose(average_precision(s, np.array([[1], [1], [0], [0]]), voc11=True), [100.0])
    assert np.isnan(average_precision(s, np.zeros((4, 1)), voc11=True)).all()


def test_metrics_voc11_matlab_grid():
    # MATLAB's 0:0.1:1 (symmetric colon): only the 4th point differs from k/10, and it is above 0.3
    assert VOC11_GRID[3] == 3 * 0.1 > 0.3
    assert [g for k, g in enumerate(VOC11_GRID) if k != 3] == [k / 10 for k in range(11) if k != 3]
    # 10 positives: 3 on top (recall exactly 0.3, precision 1), then 10 negatives, then 7 positives
    # (best precision at recall >= 0.4 is 10/20 = 0.5 at the end).
    # devkit: t = 0, .1, .2 -> 1; t = 0.30000000000000004 skips recall 0.3 -> 0.5; 7 more -> 0.5
    #   AP = (3 + 8 * 0.5) / 11 = 63.636 %  (an exact grid would give (4 + 7 * 0.5) / 11 = 68.182 %)
    t = np.array([1] * 3 + [0] * 10 + [1] * 7)[:, None]
    s = -np.arange(20.0)[:, None]
    assert np.allclose(average_precision(s, t, voc11=True), [100 * 7 / 11])
    # random untied data, with ignored labels: the devkit transcribed loop by loop
    rng = np.random.default_rng(2)
    t = rng.integers(-1, 2, (60, 8)) * (rng.random((60, 8)) < 0.7)
    s = rng.random((60, 8)) + 0.3 * t
    assert np.allclose(average_precision(s, t, voc11=True), _lm_devkit_voc11(s, t))


def test_metrics_input_errors():
    s, t = np.random.rand(4, 3), np.ones((4, 3))
    with pytest.raises(ValueError, match="NaN or inf"):
        average_precision(np.where(np.eye(4, 3) > 0, np.nan, s), t)
    with pytest.raises(ValueError, match="NaN or inf"):
        multilabel_report(np.where(np.eye(4, 3) > 0, np.inf, s), t)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        average_precision(s, np.ones((4, 2)))
    with pytest.raises(ValueError, match="targets must be"):
        average_precision(s, 2 * t)
    with pytest.raises(ValueError, match="sizes"):
        multilabel_report(s, t, sizes=np.full((4, 3), 4))
    with pytest.raises(ValueError, match="sizes"):
        multilabel_report(s, t, sizes=np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"predicted \(4, 2\) and targets \(4, 3\)"):
        label_report(np.ones((4, 2), bool), t)
    for bad in (1.5, -0.1, np.nan, [0.5, 0.5, 2.0]):
        with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
            multilabel_report(s, t, threshold=bad)


def _lm_logits(p):
    """The logits of probabilities p, in float64: what the metrics take as scores."""
    p = np.asarray(p, dtype=np.float64)
    return np.log(p / (1 - p))


def test_metrics_report_hand():
    # 4 images x 3 classes given by their probabilities p, threshold 0.5 (predicted = p >= 0.5)
    p = np.array([[0.9, 0.6, 0.1], [0.8, 0.2, 0.7], [0.3, 0.7, 0.2], [0.6, 0.1, 0.4]])
    t = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 1, -1]])
    # class 0: pred {0,1,3}, pos {0,1}: Nc 2, Np 3, Ng 2 -> P 2/3, R 1
    # class 1: pred {0,2},   pos {0,3}: Nc 1, Np 2, Ng 2 -> P 1/2, R 1/2
    # class 2: pred {1} (image 3 ignored), no positive -> left out of CP/CR and of mAP
    # CP = (2/3 + 1/2) / 2 = 7/12, CR = (1 + 1/2) / 2 = 3/4, CF1 = 2 CP CR / (CP + CR) = 21/32
    # pooled: Nc 3, Np 6, Ng 4 -> OP 1/2, OR 3/4, OF1 = 2 (1/2)(3/4) / (5/4) = 3/5
    # AP: class 0 ranks pos, pos, neg, neg -> 100; class 1 ranks neg(.7), pos(.6), neg(.2), pos(.1)
    #   -> (1/2 + 2/4) / 2 = 1/2; mAP = 75
    s = _lm_logits(p)
    r = multilabel_report(s, t)
    expect = {
        "mAP": 75.0,
        "CP": 700 / 12,
        "CR": 75.0,
        "CF1": 2100 / 32,
        "OP": 50.0,
        "OR": 75.0,
        "OF1": 60.0,
    }
    assert set(r) == set(expect) | {"AP_per_class"}
    for k, v in expect.items():
        assert abs(r[k] - v) < 1e-9, k
    assert np.allclose(r["AP_per_class"], [100, 50, np.nan], equal_nan=True)
    # the label counts are label_report's on the labels predicted (p >= 0.5 is logit >= 0)
    assert label_report(s >= 0, t) == {k: r[k] for k in expect if k != "mAP"}
    # an ignored label is no false positive: raise image 3's class-2 score above the threshold
    s2 = s.copy()
    s2[3, 2] = _lm_logits(0.9)
    assert {k: multilabel_report(s2, t)[k] for k in expect} == {k: r[k] for k in expect}
    # a class never predicted has precision 0 (0/0 -> 0): threshold above every score
    r0 = multilabel_report(s, t, threshold=0.95)
    assert r0["CP"] == 0 and r0["CR"] == 0 and r0["CF1"] == 0 and r0["OP"] == 0 and r0["OF1"] == 0


def test_metrics_report_equals_counting_loop():
    # CP, CR, OP, OR against a loop over every (image, class) decision on the probabilities, for
    # one threshold and for one per class
    rng = np.random.default_rng(3)
    p, t = rng.random((50, 7)), rng.integers(-1, 2, (50, 7))
    for threshold in (0.6, rng.random(7)):
        r = multilabel_report(_lm_logits(p), t, threshold=threshold)
        threshold = np.broadcast_to(threshold, (7,))
        Nc, Np, Ng = np.zeros(7), np.zeros(7), np.zeros(7)
        for i in range(50):
            for k in range(7):
                if t[i, k] != -1:
                    Nc[k] += p[i, k] >= threshold[k] and t[i, k] == 1
                    Np[k] += p[i, k] >= threshold[k]
                    Ng[k] += t[i, k] == 1
        precision = [c / n if n else 0 for c, n in zip(Nc, Np, strict=True)]
        assert np.isclose(r["CP"], 100 * np.mean(precision))
        assert np.isclose(r["CR"], 100 * np.mean(Nc / Ng))
        assert np.isclose(r["OP"], 100 * Nc.sum() / Np.sum())
        assert np.isclose(r["OR"], 100 * Nc.sum() / Ng.sum())


def test_metrics_size_ap_hand():
    # one class, 6 images ranked by score; sizes of positives: s = 1, m = 2, l = 3
    #   score  0.9  0.8  0.7  0.6  0.5  0.4
    #   target  1    0    1    1    0    1
    #   size    3    0    1    2    0    1
    # AP_s: positives of size 1 (0.7, 0.4), negatives (0.8, 0.5), others left out:
    #   ranking 0.8 neg, 0.7 pos, 0.5 neg, 0.4 pos -> (1/2 + 2/4) / 2 = 50
    # AP_m: 0.8 neg, 0.6 pos, 0.5 neg -> 1/2 = 50;  AP_l: 0.9 pos first -> 100
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])[:, None]
    t = np.array([1, 0, 1, 1, 0, 1])[:, None]
    z = np.array([3, 0, 1, 2, 0, 1])[:, None]
    expect = {"AP_s": 50.0, "AP_m": 50.0, "AP_l": 100.0}
    r = multilabel_report(s, t, sizes=z)
    assert {k: r[k] for k in expect} == expect
    # a second class with only large positives: AP_s and AP_m average over the first class only
    s2 = np.hstack([s, s[::-1]])
    t2 = np.hstack([t, np.array([[0, 0, 0, 0, 1, 1]]).T])  # its positives score 0.8, 0.9 -> 100
    z2 = np.hstack([z, np.array([[0, 0, 0, 0, 3, 3]]).T])
    r = multilabel_report(torch.tensor(s2), torch.tensor(t2), sizes=torch.tensor(z2))
    assert {k: r[k] for k in expect} == expect


def test_metrics_format_report():
    r = {
        "mAP": 86.8,
        "CP": 84.0,
        "CR": 80.1,
        "CF1": 81.7,
        "OP": 84.6,
        "OR": 82.5,
        "OF1": 83.5,
        "AP_s": 77.6,
        "AP_m": 90.2,
        "AP_l": 95.9,
        "AP_per_class": [86.0, 87.6],
    }
    line = format_report(r)
    assert "\n" not in line
    assert line == (
        "mAP 86.80 | CP 84.00 CR 80.10 CF1 81.70 | OP 84.60 OR 82.50 OF1 83.50 | "
        "AP_s 77.60 AP_m 90.20 AP_l 95.90"
    )
    assert format_report({"mAP": float("nan"), "loss": 0.5}) == "mAP nan | loss 0.50"


def test_metrics_logit_of_thresholds():
    # a probability threshold t is applied to logits as log(t / (1 - t)): 0.5 -> 0, 0.8 -> ln 4
    assert logit(0.5) == 0.0 and np.isclose(logit(0.8), math.log(4))
    assert np.allclose(logit([0.2, 0.5, 0.8]), [-math.log(4), 0.0, math.log(4)])
    # 0 and 1 are -inf and +inf; near them it stays exact and increasing: sigmoid(logit(t)) = t
    assert logit(0.0) == -np.inf and logit(1.0) == np.inf
    t = np.array([1e-300, 1e-12, 0.3, 1 - 1e-12])
    assert np.all(np.diff(logit(t)) > 0)
    assert np.allclose(1 / (1 + np.exp(-logit(t))), t, rtol=1e-9, atol=0)
    # threshold 0 predicts every label, 1 none
    z = np.array([[-30.0, 0.0, 30.0]]).T
    y = np.array([[0, 1, 1]]).T
    assert np.isclose(multilabel_report(z, y, threshold=0.0)["OP"], 200 / 3)
    assert multilabel_report(z, y, threshold=1.0)["OR"] == 0.0


def test_metrics_saturated_probabilities_tie_but_logits_rank():
    # Interpretation 27: above a logit of ~16.6, float32 sigmoid is exactly 1.0. Logits 20, 19, 18
    # (positives), 17.5 (negative), 17 (positive), 0 (negative):
    #   logits: precision at the positives 1, 1, 1, 4/5 -> AP (3 + 4/5) / 4 = 95
    #   float32 probabilities: the first five tie at 1.0 (4 TP, 1 FP) -> every positive 4/5 -> AP 80
    z = torch.tensor([[20.0, 19.0, 18.0, 17.5, 17.0, 0.0]]).T
    y = torch.tensor([[1, 1, 1, 0, 1, 0]]).T
    p = torch.sigmoid(z)
    assert (p[:5] == 1.0).all() and p.dtype == torch.float32
    assert np.allclose(average_precision(z, y), [95.0])
    assert np.allclose(average_precision(p, y), [80.0])
    # AUROC (8 pairs): logits lose one pair (17 < 17.5) -> 7/8; probabilities tie 4 -> 6/8
    assert np.allclose(auroc(z, y), [87.5]) and np.allclose(auroc(p, y), [75.0])


def test_metrics_label_report_hand():
    # labels from any decoding (predicted (N, K) bool), image 2's class 2 is ignored (-1)
    predicted = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1]], bool)
    t = np.array([[1, 1, 0], [0, 1, 0], [0, 0, -1]])
    # class 0: pred {0, 2}, pos {0}: Nc 1, Np 2, Ng 1 -> P 1/2, R 1
    # class 1: pred {1}, pos {0, 1}: Nc 1, Np 1, Ng 2 -> P 1, R 1/2
    # class 2: its one prediction ignored, no positive -> left out of CP and CR
    # CP = CR = 3/4 -> CF1 3/4; pooled Nc 2, Np 3, Ng 3 -> OP = OR = OF1 = 2/3
    expect = {"CP": 75.0, "CR": 75.0, "CF1": 75.0, "OP": 200 / 3, "OR": 200 / 3, "OF1": 200 / 3}
    r = label_report(predicted, t)
    assert r.keys() == expect.keys() and all(np.isclose(r[k], v) for k, v in expect.items())
    assert label_report(torch.tensor(predicted), torch.tensor(t)) == r


def _lm_cuts(values):
    """Every threshold (a logit) that separates distinct values: midway between neighbours, -inf."""
    v = np.unique(values)
    return [*((v[1:] + v[:-1]) / 2), -np.inf]


def test_metrics_choose_thresholds_hand():
    # class 0, logits 3, 1, 0, -2 with targets 1, 0, 1, 0. F1 = 2 TP / (predicted + positives):
    #   top 1: 2/3; top 2: 2/4; top 3: 4/5; all: 4/6 -> the top 3, midway between 0 and -2: logit -1
    # class 1, same logits, targets 1, 0, 0, 0: the top 1 (F1 1), midway between 3 and 1: logit 2
    # class 2 has no positive: it takes the overall threshold.
    # overall, CP and CR over classes 0 and 1 (P, R per class):
    #   top 1: (1, 1/2), (1, 1) -> CP 1, CR 3/4, CF1 6/7;  top 2: CP 1/2, CR 3/4, CF1 3/5
    #   top 3: (2/3, 1), (1/3, 1) -> CF1 2/3;  all: CP 3/8, CR 1, CF1 6/11 -> the top 1: logit 2
    z = np.array([[3.0, 1.0, 0.0, -2.0]] * 3).T
    t = np.array([[1, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]).T
    th = choose_thresholds(z, t)
    sigmoid = 1 / (1 + np.exp(-np.array([-1.0, 2.0, 2.0])))
    assert isinstance(th.overall, float) and np.isclose(th.overall, sigmoid[1])
    assert np.allclose(th.per_class, sigmoid)
    # a class whose best is every label gets 0; torch tensors are accepted
    th = choose_thresholds(torch.tensor([[2.0, 1.0, 0.0]]).T, torch.tensor([[0, 1, 1]]).T)
    assert th.overall == 0.0 and th.per_class.tolist() == [0.0]


def test_metrics_choose_thresholds_equal_brute_force():
    # tied logits, ignored labels, a class without positives: against every cut, one at a time
    rng = np.random.default_rng(6)
    for _ in range(10):
        z = np.round(2 * rng.normal(size=(30, 4)), 1)
        t = rng.integers(-1, 2, (30, 4))
        t[:, 3] = np.minimum(t[:, 3], 0)
        th = choose_thresholds(z, t)
        cf1 = [label_report(z >= cut, t)["CF1"] for cut in _lm_cuts(z)]
        assert np.isclose(label_report(z >= logit(th.overall), t)["CF1"], max(cf1))
        assert np.isclose(logit(th.overall), _lm_cuts(z)).any()  # midway, or every label
        for k in range(3):
            cuts = _lm_cuts(z[:, k])
            f1 = np.array([label_report(z[:, [k]] >= c, t[:, [k]])["CF1"] for c in cuts])
            highest_best = max(c for c, f in zip(cuts, f1, strict=True) if np.isclose(f, f1.max()))
            assert np.isclose(logit(th.per_class[k]), highest_best)
        assert th.per_class[3] == th.overall


def test_metrics_auroc_hand_and_pair_loop():
    # scores 0.9 (pos), 0.8 (neg), 0.8 (pos), 0.1 (neg): pairs (pos, neg) (.9, .8) won, (.9, .1)
    # won, (.8, .8) tied (1/2), (.8, .1) won -> 3.5 / 4 = 87.5; constant scores -> 50
    s = np.array([[0.9, 0.8, 0.8, 0.1]]).T
    t = np.array([[1, 0, 1, 0]]).T
    assert np.allclose(auroc(s, t), [87.5]) and np.allclose(auroc(np.zeros((4, 1)), t), [50.0])
    # random tied matrices with ignored labels against a loop over every (positive, negative) pair
    rng = np.random.default_rng(7)
    s = rng.integers(0, 5, (40, 6)).astype(float)
    t = rng.integers(-1, 2, (40, 6))
    t[:, 4] = np.minimum(t[:, 4], 0)  # no positive
    t[:, 5] = np.where(t[:, 5] == 0, 1, t[:, 5])  # no negative
    area = auroc(s, t)
    for k in range(4):
        pos, neg = s[t[:, k] == 1, k], s[t[:, k] == 0, k]
        wins = sum((a > b) + (a == b) / 2 for a in pos for b in neg)
        assert np.isclose(area[k], 100 * wins / (len(pos) * len(neg)))
    assert np.isnan(area[4:]).all()


def test_metrics_coco_sized_inputs():
    # COCO val2014 with annotations: 40,137 images x 80 classes, through every metric. No timing
    # is asserted (speed is for a benchmark); a Python loop over candidate thresholds would show
    # as minutes of suite time.
    rng = np.random.default_rng(0)
    N, K = 40137, 80
    t = (rng.random((N, K)) < 0.036).astype(np.int8)
    s = (rng.random((N, K)) + 0.5 * t).astype(np.float32)
    ap = average_precision(s, t)
    ap_voc11 = average_precision(s, t, voc11=True)
    report = multilabel_report(s, t)
    th = choose_thresholds(s, t)
    area = auroc(s, t)
    assert np.isfinite(ap_voc11).all() and report["mAP"] == pytest.approx(np.nanmean(ap))
    assert area.shape == (K,) and (area > 50).all()
    # the chosen thresholds at this size: per class = one class at a time, and no CF1 at 20 other
    # thresholds beats the overall one
    for k in range(3):
        assert th.per_class[k] == choose_thresholds(s[:, k : k + 1], t[:, k : k + 1]).per_class[0]
    best = label_report(s >= logit(th.overall), t)["CF1"]
    for cut in np.quantile(s, np.linspace(0, 1, 20)):
        assert best >= label_report(s >= cut, t)["CF1"]
    assert ap.shape == (K,) and np.isfinite(ap).all()
    # vectorised over classes = one class at a time; and, on a column without ties, the
    # rank-by-rank definition (precision at each positive, averaged)
    for k in range(3):
        assert np.allclose(ap[k], average_precision(s[:, k : k + 1], t[:, k : k + 1]))
    # (float32 columns of 40k random scores all hold a few ties; float64 ones have none)
    s64 = rng.random(N) + 0.5 * t[:, 0]
    assert len(np.unique(s64)) == N
    hits = t[np.argsort(-s64), 0] == 1
    precision_at_hits = np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)
    assert np.isclose(average_precision(s64[:, None], t[:, :1])[0], 100 * precision_at_hits.mean())


# =============================================================================
# data.py (Section 4.1 datasets, Shapes, augmentation)


def _data_jpeg(path, size=(16, 12), colour=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG", quality=95)


def _data_splits(name, root=None, **changes):
    """data.load_splits at 32 px, augmentation off, every image."""
    kw = dict(data_dir=root, img_size=32, randaug=(0, 9), cutout=0.0, seed=0)
    kw.update(num_train=0, num_val=0)
    kw.update(changes)
    return data.load_splits(name, **kw)


def _data_coco_fixture(root):
    """Two splits; train has gapped, unsorted category ids, an unannotated image and a crowd-only
    one."""
    cats = [
        {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 3, "name": "car", "supercategory": "vehicle"},
    ]
    images = [
        {"id": 11, "file_name": "COCO_train2014_000000000011.jpg", "width": 16, "height": 12},
        {"id": 12, "file_name": "COCO_train2014_000000000012.jpg", "width": 16, "height": 12},
        {"id": 13, "file_name": "COCO_train2014_000000000013.jpg", "width": 16, "height": 12},
        {"id": 14, "file_name": "COCO_train2014_000000000014.jpg", "width": 16, "height": 12},
    ]

    def ann(i, img, cat, area, crowd=0):
        return {
            "id": i,
            "image_id": img,
            "category_id": cat,
            "area": area,
            "iscrowd": crowd,
            "bbox": [0, 0, 1, 1],
            "segmentation": [],
        }

    anns = [
        ann(1, 11, 1, 5000.0),
        ann(2, 11, 1, 500.0),  # person medium + small -> medium
        ann(3, 13, 3, 20000.0, crowd=1),  # image 13: crowd only -> kept, car large
        ann(4, 14, 90, 9216.0),
        ann(5, 14, 3, 1023.9),
        ann(6, 14, 1, 1024.0),
    ]  # boundaries
    os.makedirs(os.path.join(root, "annotations"))
    with open(os.path.join(root, "annotations", "instances_train2014.json"), "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    for im in images:
        _data_jpeg(os.path.join(root, "train2014", im["file_name"]))
    val_img = {"id": 7, "file_name": "COCO_val2014_000000000007.jpg", "width": 16, "height": 12}
    with open(os.path.join(root, "annotations", "instances_val2014.json"), "w") as f:
        json.dump(
            {"images": [val_img], "annotations": [ann(9, 7, 90, 50.0)], "categories": cats}, f
        )
    _data_jpeg(os.path.join(root, "val2014", val_img["file_name"]))


_DATA_VOC_XML = """<annotation><folder>VOC2007</folder><filename>{id}.jpg</filename>
<size><width>16</width><height>12</height><depth>3</depth></size>{objects}</annotation>"""
_DATA_VOC_OBJ = """<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>
<difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"""


def _data_voc_fixture(root):
    """VOCdevkit/VOC2007 with difficult objects and the devkit's per-class list files."""
    base = os.path.join(root, "VOCdevkit", "VOC2007")
    objs = {  # id -> [(name, difficult, box)]
        "000001": [
            ("dog", 0, (1, 1, 200, 100)),
            ("person", 1, (1, 1, 10, 10)),
        ],  # person difficult-only
        "000002": [
            ("cat", 1, (1, 1, 300, 300)),
            ("cat", 0, (1, 1, 31, 32)),
        ],  # cat: non-difficult small
        "000005": [
            ("chair", 0, (5, 5, 100, 95)),
            ("chair", 0, (1, 1, 20, 20)),
            ("tvmonitor", 0, (1, 1, 96, 96)),
        ],
    }
    os.makedirs(os.path.join(base, "Annotations"))
    os.makedirs(os.path.join(base, "ImageSets", "Main"))
    for image_id, ob in objs.items():
        xml = _DATA_VOC_XML.format(
            id=image_id,
            objects="".join(
                _DATA_VOC_OBJ.format(name=n, difficult=d, x0=b[0], y0=b[1], x1=b[2], y1=b[3])
                for n, d, b in ob
            ),
        )
        with open(os.path.join(base, "Annotations", f"{image_id}.xml"), "w") as f:
            f.write(xml)
        _data_jpeg(os.path.join(base, "JPEGImages", f"{image_id}.jpg"))
    sets = {"trainval": ["000001", "000002"], "test": ["000005"]}
    for name, ids in sets.items():
        with open(os.path.join(base, "ImageSets", "Main", f"{name}.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
        for cls in data.VOC_CLASSES:  # the devkit's format: "<id> <1|0|-1>", 0 = only difficult
            with open(os.path.join(base, "ImageSets", "Main", f"{cls}_{name}.txt"), "w") as f:
                for image_id in ids:
                    mine = [d for n, d, _ in objs[image_id] if n == cls]
                    v = -1 if not mine else (1 if 0 in mine else 0)
                    f.write(f"{image_id} {v:2d}\n")
    return base


def _data_coco_json(root, split="train", **changes):
    """Rewrite ROOT/annotations/instances_<split>2014.json with some fields replaced."""
    path = os.path.join(root, "annotations", f"instances_{split}2014.json")
    with open(path) as f:
        d = json.load(f)
    d.update(changes)
    with open(path, "w") as f:
        json.dump(d, f)
    return d


# ---------------------------------------------------------------------------------------------
# COCO


def test_data_coco_labels_order_sizes_and_protocol(tmp_path):
    _data_coco_fixture(str(tmp_path))
    splits = _data_splits("coco", str(tmp_path))
    ds = splits.train
    assert splits.classes == ds.classes == ["person", "car", "toothbrush"]  # id order 1, 3, 90
    assert len(ds) == 3  # image 12 has no annotation: dropped (the paper's protocol)
    assert [os.path.basename(f) for f in ds.files] == [
        f"COCO_train2014_0000000000{i}.jpg" for i in (11, 13, 14)
    ]
    img, target, sizes = ds[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert target.dtype == torch.float32 and sizes.dtype == torch.int64
    assert target.tolist() == [1, 0, 0] and sizes.tolist() == [2, 0, 0]  # 5000 medium, 500 small
    _, target, sizes = ds[1]  # crowd-only image: counted, as in ASL
    assert target.tolist() == [0, 1, 0] and sizes.tolist() == [0, 3, 0]
    _, target, sizes = ds[2]  # 1024.0 = 32^2 is medium, 1023.9 small, 9216 = 96^2 large
    assert target.tolist() == [1, 1, 1] and sizes.tolist() == [2, 1, 3]
    val = splits.val
    assert len(val) == 1 and val.classes == ds.classes
    _, target, sizes = val[0]
    assert target.tolist() == [0, 0, 1] and sizes.tolist() == [0, 0, 1]
    anns = _data_coco_json(str(tmp_path))["annotations"]
    del anns[0]["area"]  # no area: the box's w * h = 1 (small) instead of 5000 (medium)
    _data_coco_json(str(tmp_path), annotations=anns)
    assert _data_splits("coco", str(tmp_path)).train.sizes[0].tolist() == [1, 0, 0]


def test_data_coco_missing_files(tmp_path):
    with pytest.raises(InputError, match="cocodataset.org"):
        _data_splits("coco", str(tmp_path / "nope"))
    os.makedirs(tmp_path / "train2014")
    with pytest.raises(InputError, match="instances_train2014.json") as e:
        _data_splits("coco", str(tmp_path))
    assert "\n" not in str(e.value) and "cocodataset.org" in str(e.value)
    _data_coco_fixture(str(tmp_path / "c"))
    os.remove(tmp_path / "c" / "train2014" / "COCO_train2014_000000000013.jpg")
    ds = _data_splits("coco", str(tmp_path / "c")).train  # train images: found when read
    with pytest.raises(InputError, match="COCO_train2014_000000000013.jpg"):
        ds[1]


def test_data_coco_val_maps_to_the_training_classes_by_name(tmp_path):
    """The class columns come from the training file; val's categories map to them by name, so
    the same ids with names in another order label val correctly; one split's extra or missing
    category is one line."""
    root = str(tmp_path)
    _data_coco_fixture(root)
    shuffled = [{"id": 90, "name": "car"}, {"id": 1, "name": "toothbrush"}]
    shuffled.append({"id": 3, "name": "person"})
    _data_coco_json(root, "val", categories=shuffled)  # val's annotation: id 90, here "car"
    splits = _data_splits("coco", root)
    assert splits.classes == splits.train.classes == splits.val.classes
    assert splits.classes == ["person", "car", "toothbrush"]
    assert splits.val[0][1].tolist() == [0, 1, 0]
    _data_coco_json(root, "val", categories=shuffled + [{"id": 7, "name": "bus"}])
    with pytest.raises(InputError) as e:
        _data_splits("coco", root)
    assert re.fullmatch(
        r".*instances_val2014.json: category 'bus' \(id 7\) is not a category of "
        r".*instances_train2014.json; both splits must name the same categories",
        str(e.value),
    )
    _data_coco_json(root, "val", categories=shuffled[:2])
    with pytest.raises(InputError, match="val2014.json: lacks category 'person' of .*train2014"):
        _data_splits("coco", root)


@pytest.mark.parametrize(
    "field, change, message",
    [
        (
            "annotations",
            lambda a: a.append(dict(a[0], id=99, image_id=404)),
            "annotation 99 names an unlisted image 404",
        ),
        (
            "annotations",
            lambda a: a.append(dict(a[0], id=98, category_id=2)),
            "annotation 98 names an unlisted category 2",
        ),
        (
            "annotations",
            lambda a: [x.pop(k) for x in a[:1] for k in ("area", "bbox")],
            "annotation 1: has neither an area nor a bbox",
        ),
        ("annotations", lambda a: a[0].update(area="big"), "annotation 1: area is 'big', not a"),
        ("annotations", lambda a: a[0].update(area="12345"), "annotation 1: area is '12345'"),
        ("annotations", lambda a: a[0].update(area=math.nan), "annotation 1: area is nan, not"),
        ("annotations", lambda a: a[0].update(area=math.inf), "annotation 1: area is inf, not"),
        ("annotations", lambda a: a[0].update(area=-5.0), "annotation 1: area is -5.0, not"),
        ("annotations", lambda a: a[0].update(area=True), "annotation 1: area is True, not"),
        (
            "annotations",
            lambda a: [a[0].pop("area"), a[0].update(bbox=["0", "0", "3", "4"])],
            r"annotation 1: bbox \['0', '0', '3', '4'\] is '0', not a finite number >= 0",
        ),
        (
            "annotations",
            lambda a: [a[0].pop("area"), a[0].update(bbox=[0, 0, -3, 4])],
            r"annotation 1: bbox \[0, 0, -3, 4\] is -3, not a finite number",
        ),
        (
            "images",
            lambda i: i.append(dict(i[0], file_name="other.jpg")),
            "image 11 is listed twice",
        ),
        (
            "images",
            lambda i: i[0].update(file_name="../../x.jpg"),
            r"image 11: image path '../../x.jpg' leaves .*train2014; give it relative to that",
        ),
        ("images", lambda i: i[0].update(file_name="/etc/hostname"), "'/etc/hostname' leaves"),
        ("images", lambda i: i[0].update(file_name=7), "image 11: image path 7 is not a file"),
        (
            "categories",
            lambda c: c.append({"id": 3, "name": "bus"}),
            r"category id 3 is listed twice \('car' and 'bus'\); give each category its own id",
        ),
        (
            "categories",
            lambda c: c.append({"id": 4, "name": "car"}),
            "category name 'car' is listed twice",
        ),
        ("categories", lambda c: c[0].update(id="90"), "category '90': the id must be an integer"),
        ("categories", lambda c: c[0].pop("name"), r"malformed \(KeyError: 'name'\)"),
    ],
)
def test_data_coco_refuses_bad_entries(tmp_path, field, change, message):
    """Each is one line naming the file and the entry: a duplicate image id would give one image's
    labels to another, a duplicate category id a phantom class, a string or NaN area a size."""
    _data_coco_fixture(str(tmp_path))
    d = _data_coco_json(str(tmp_path))
    change(d[field])
    _data_coco_json(str(tmp_path), **{field: d[field]})
    with pytest.raises(InputError, match=message) as e:
        _data_splits("coco", str(tmp_path))
    assert "\n" not in str(e.value) and "instances_train2014.json: " in str(e.value)


def test_data_coco_refuses_wrong_field_types_deep_nesting_and_no_classes(tmp_path):
    for i, changes in enumerate(
        ({"images": None}, {"annotations": {"1": 2}}, {"categories": "person"})
    ):
        _data_coco_fixture(str(tmp_path / str(i)))
        _data_coco_json(str(tmp_path / str(i)), **changes)
        with pytest.raises(
            InputError, match='"images", "annotations" and "categories" must be lists'
        ):
            _data_splits("coco", str(tmp_path / str(i)))
    _data_coco_fixture(str(tmp_path / "fresh"))
    _data_coco_json(str(tmp_path / "fresh"), categories=[], annotations=[])  # would train 0 classes
    with pytest.raises(InputError, match="0 classes and 0 train images"):
        _data_splits("coco", str(tmp_path / "fresh"))
    _data_coco_fixture(str(tmp_path))
    path = tmp_path / "annotations" / "instances_train2014.json"
    for text, message in (
        ("[1, 2", r"not JSON \(JSONDecodeError: Expecting .*line 1 column 6"),  # cut short
        ("[1, 2]", "must be lists"),
        ("[" * 200_000 + "]" * 200_000, r"nested too deeply to read \(RecursionError\)"),
    ):
        path.write_text(text)
        with pytest.raises(InputError, match=message) as e:
            _data_splits("coco", str(tmp_path))
        assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def _data_cvat_export(root):
    """Train: a "COCO 1.0" export as CVAT writes it (ids from 1, empty supercategories, licenses,
    info, attributes), images in subfolders and one image without annotations. Val: as Label
    Studio writes it (ids from 0, no supercategory), its categories in another order."""
    train = {
        "licenses": [{"name": "", "id": 0, "url": ""}],
        "info": {"contributor": "", "date_created": "", "description": "", "url": "", "year": ""},
        "categories": [
            {"id": 1, "name": "cat", "supercategory": ""},
            {"id": 2, "name": "dog", "supercategory": ""},
            {"id": 3, "name": "bird", "supercategory": ""},
        ],
        "images": [],
        "annotations": [],
    }
    labels = {"day1/img_0.jpg": [1, 1], "day1/img_1.jpg": [], "day2/img_2.jpg": [3, 2]}
    for i, (name, cats) in enumerate(labels.items(), 1):
        train["images"].append(
            {"id": i, "width": 16, "height": 12, "file_name": name, "license": 0}
            | {"flickr_url": "", "coco_url": "", "date_captured": 0}
        )
        for cat in cats:
            train["annotations"].append(
                {"id": len(train["annotations"]) + 1, "image_id": i, "category_id": cat}
                | {"segmentation": [[0, 0, 4, 0, 4, 4]], "area": 8.0, "bbox": [0, 0, 4, 4]}
                | {"iscrowd": 0, "attributes": {"occluded": False, "rotation": 0.0}}
            )
        _data_jpeg(os.path.join(root, "cvat", "images", name))
    val = {
        "images": [{"width": 16, "height": 12, "id": 0, "file_name": "images/v0.jpg"}],
        "categories": [
            {"id": 0, "name": "dog"},
            {"id": 1, "name": "bird"},
            {"id": 2, "name": "cat"},
        ],
        "annotations": [
            {"id": 0, "image_id": 0, "category_id": 0, "bbox": [1, 1, 20, 20], "ignore": 0}
            | {"iscrowd": 0, "area": 400}
        ],
        "info": {"year": 2024, "version": "1.0", "contributor": "Label Studio"},
    }
    _data_jpeg(os.path.join(root, "ls", "images", "v0.jpg"))
    os.makedirs(os.path.join(root, "cvat", "annotations"))
    for path, d in (("cvat/annotations/instances_default.json", train), ("ls/result.json", val)):
        with open(os.path.join(root, path), "w") as f:
            json.dump(d, f)
    return data.CocoFiles(
        os.path.join(root, "cvat", "annotations", "instances_default.json"),
        os.path.join(root, "cvat", "images"),
        os.path.join(root, "ls", "result.json"),
        os.path.join(root, "ls"),
    )


def test_data_coco_own_set_keeps_unannotated_images_and_maps_by_name(tmp_path):
    files = _data_cvat_export(str(tmp_path))
    splits = _data_splits("coco", coco_files=files)
    assert splits.classes == ["cat", "dog", "bird"]  # CVAT's id order 1, 2, 3
    assert splits.train.targets.tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 1]]  # img_1 kept
    assert splits.train.files[1] == os.path.join(tmp_path, "cvat", "images", "day1", "img_1.jpg")
    assert splits.val.targets.tolist() == [[0, 1, 0]]  # Label Studio's id 0 is "dog"
    assert splits.train[1][1].tolist() == [0, 0, 0]  # an all-negative example
    with pytest.raises(InputError, match="goes with --data coco alone"):
        _data_splits("coco", str(tmp_path), coco_files=files)
    with pytest.raises(InputError, match="goes with --data coco alone"):
        _data_splits("csv", coco_files=files)
    with pytest.raises(InputError, match="image folder .*nowhere.* not found; expected a COCO"):
        _data_splits("coco", coco_files=files._replace(val_images=str(tmp_path / "nowhere")))


def test_data_coco_own_set_drops_roboflows_root_category(tmp_path):
    """Roboflow's COCO export adds category 0, named after the project, as every class's
    supercategory, with no annotation: it is not a class. An annotated parent stays one."""
    root = str(tmp_path)
    for split in ("train", "valid"):
        d = {
            "categories": [
                {"id": 0, "name": "pets", "supercategory": "none"},
                {"id": 1, "name": "cat", "supercategory": "pets"},
                {"id": 2, "name": "dog", "supercategory": "pets"},
            ],
            "images": [{"id": 0, "file_name": "a_jpg.rf.0f3c.jpg", "width": 16, "height": 12}],
            "annotations": [{"id": 0, "image_id": 0, "category_id": 2, "bbox": [0, 0, 5, 5]}],
        }
        _data_jpeg(os.path.join(root, split, "a_jpg.rf.0f3c.jpg"))
        with open(os.path.join(root, split, "_annotations.coco.json"), "w") as f:
            json.dump(d, f)
    files = data.CocoFiles(
        os.path.join(root, "train", "_annotations.coco.json"),
        os.path.join(root, "train"),
        os.path.join(root, "valid", "_annotations.coco.json"),
        os.path.join(root, "valid"),
    )
    with pytest.raises(InputError, match="a_jpg.rf.0f3c.jpg is in both the train split"):
        _data_splits("coco", coco_files=files._replace(val_images=files.train_images))
    splits = _data_splits("coco", coco_files=files)
    assert splits.classes == ["cat", "dog"] and splits.train.targets.tolist() == [[0, 1]]
    d["annotations"].append({"id": 1, "image_id": 0, "category_id": 0, "bbox": [0, 0, 5, 5]})
    for split in ("train", "valid"):
        with open(os.path.join(root, split, "_annotations.coco.json"), "w") as f:
            json.dump(d, f)
    assert _data_splits("coco", coco_files=files).classes == ["pets", "cat", "dog"]


# ---------------------------------------------------------------------------------------------
# VOC


def test_data_voc_difficult_protocol_and_sizes(tmp_path):
    base = _data_voc_fixture(str(tmp_path))
    for root in (os.path.dirname(base), base):  # VOCdevkit or VOC2007
        splits = _data_splits("voc", root)
        ds = splits.train
        assert splits.classes == ds.classes == data.VOC_CLASSES and len(ds) == 2
    k = {c: i for i, c in enumerate(data.VOC_CLASSES)}
    # ML-GCN: per-class file value 1 -> 1, 0 (difficult only) -> -1 (ignore), -1 -> 0
    for i, image_id in enumerate(["000001", "000002"]):
        for cls in data.VOC_CLASSES:
            with open(os.path.join(base, "ImageSets", "Main", f"{cls}_trainval.txt")) as f:
                v = dict(line.split() for line in f)[image_id]
            assert ds.targets[i, k[cls]] == {"1": 1, "0": -1, "-1": 0}[v]
    _, target, sizes = ds[0]
    assert target[k["dog"]] == 1 and target[k["person"]] == -1 and sizes[k["person"]] == 0
    assert sizes[k["dog"]] == 3  # 200 x 100 box
    _, target, sizes = ds[1]  # the difficult 300x300 cat does not count for the size
    assert target[k["cat"]] == 1 and sizes[k["cat"]] == 1  # 31 x 32 = 992 < 1024
    test = splits.val
    assert len(test) == 1
    _, target, sizes = test[0]  # chair 96x91 (medium) then 20x20 (small): medium; tv 96x96 large
    assert target.sum() == 2 and sizes[k["chair"]] == 2 and sizes[k["tvmonitor"]] == 3


def test_data_voc_missing_test_set(tmp_path):
    base = _data_voc_fixture(str(tmp_path))
    os.remove(os.path.join(base, "ImageSets", "Main", "test.txt"))
    with pytest.raises(InputError, match="VOCtest_06-Nov-2007.tar") as e:
        _data_splits("voc", base)
    assert "test.txt" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "old, new, message",
    [
        (
            "<bndbox><xmin>5</xmin><ymin>5</ymin><xmax>100</xmax><ymax>95</ymax></bndbox>",
            "",
            "without a <bndbox>",
        ),
        ("<xmin>5</xmin>", "<xmin>five</xmin>", "without a <bndbox> of numeric"),
        ("<xmin>5</xmin>", "<xmin>nan</xmin>", "the 'chair' box's width is nan, not a finite"),
        ("<xmax>100</xmax>", "<xmax>-inf</xmax>", "the 'chair' box's width is -inf, not"),
        ("<name>chair</name>", "<name>chiar</name>", "unknown class 'chiar'"),
        (
            "<annotation>",
            '<!DOCTYPE a [<!ENTITY e SYSTEM "file:///etc/passwd">]><annotation>',
            "DOCTYPE",
        ),
        ("</annotation>", "", "not XML"),
    ],
)
def test_data_voc_refuses_bad_objects(tmp_path, old, new, message):
    base = _data_voc_fixture(str(tmp_path))
    path = os.path.join(base, "Annotations", "000005.xml")
    with open(path) as f:
        xml = f.read()
    assert old in xml
    with open(path, "w") as f:
        f.write(xml.replace(old, new, 1))
    with pytest.raises(InputError, match=message) as e:
        _data_splits("voc", base)
    assert "000005.xml" in str(e.value) and "\n" not in str(e.value)


def test_data_voc_refuses_repeated_and_escaping_ids(tmp_path):
    """An id listed twice would count twice; one in both lists would be validated on."""
    base = _data_voc_fixture(str(tmp_path))
    main = os.path.join(base, "ImageSets", "Main")
    for name, text, message in (
        ("trainval", "000001\n000002\n000001\n", r"000001.jpg is listed twice in the train "),
        ("test", "000005\n000002\n", r"000002.jpg is in both the train split .* and the val "),
        ("test", "../../../x\n", r"test.txt: id '../../../x': image path '../../../x.jpg' leaves"),
    ):
        with open(os.path.join(main, f"{name}.txt")) as f:
            kept = f.read()
        with open(os.path.join(main, f"{name}.txt"), "w") as f:
            f.write(text)
        with pytest.raises(InputError, match=message) as e:
            _data_splits("voc", base)
        assert "\n" not in str(e.value)
        with open(os.path.join(main, f"{name}.txt"), "w") as f:
            f.write(kept)
    assert len(_data_splits("voc", base).train) == 2


# ---------------------------------------------------------------------------------------------
# NUS-WIDE


def _data_nus_csv(root, rows, encoding="utf-8"):
    with open(os.path.join(root, "nus_wid_data.csv"), "w", encoding=encoding) as f:
        f.write("filepath,label,split_name\n" + "".join(r + "\n" for r in rows))


def test_data_nuswide_asl_csv(tmp_path):
    root = str(tmp_path)
    rows = [
        "images/a.jpg,\"['sky', 'clouds']\",train",
        "images/b.jpg,\"['water']\",train",
        "images/gone.jpg,\"['sky']\",train",
        "images/c.jpg,[],val",
        "images/d.jpg,\"['water', 'sky']\",val",
    ]
    _data_nus_csv(root, rows)
    for name in "abcd":
        _data_jpeg(os.path.join(root, "images", f"{name}.jpg"))
    with pytest.warns(UserWarning, match="1 of 3"):
        splits = _data_splits("nuswide", root)
    ds = splits.train
    assert splits.classes == ds.classes == ["clouds", "sky", "water"]  # sorted, from train
    assert len(ds) == 2
    assert ds[0][1].tolist() == [1, 1, 0] and ds[1][1].tolist() == [0, 0, 1]
    assert ds[0][2].tolist() == [0, 0, 0]  # no boxes: size unknown
    assert len(splits.val) == 2 and splits.val.targets.tolist() == [[0, 0, 0], [0, 1, 1]]
    present = [rows[0], rows[1], rows[3]]
    _data_nus_csv(root, present + ["images/d.jpg,\"['zebra', 'sky']\",val"])  # one class list
    with pytest.raises(InputError) as e:
        _data_splits("nuswide", root)
    assert re.fullmatch(r".*nus_wid_data.csv: line 5: label 'zebra' is not among .*", str(e.value))
    _data_nus_csv(root, present + ["images/a.jpg,\"['sky']\",val"])
    with pytest.raises(InputError, match=r"a.jpg is in both the train split .* and the val sp"):
        _data_splits("nuswide", root)


@pytest.mark.parametrize(
    "row, message",
    [
        ("images/a.jpg,sky,train", "line 2: ValueError: malformed node"),  # not a literal
        ("images/a.jpg,'sky',train", "not a list of names"),  # a string: must not become s, k, y
        ('images/a.jpg,"[1, 2]",train', "not a list of names"),
        ("images/a.jpg,\"['sky']\"", "line 2: 2 columns, expected filepath,label,split_name"),
        ("images/a.jpg,\"['" + "x" * 200000 + "']\",train", "field larger than field limit"),
        # ASL's names are train and val: "validation" or "test" would be silently dropped
        ("images/a.jpg,\"['sky']\",validation", "split_name 'validation' is neither train nor"),
        ("images/a.jpg,\"['sky']\",test", "line 2: split_name 'test' is neither train nor val"),
        ("../a.jpg,\"['sky']\",train", "line 2: image path '../a.jpg' leaves"),
    ],
)
def test_data_nuswide_refuses_bad_rows(tmp_path, row, message):
    root = str(tmp_path)
    _data_jpeg(os.path.join(root, "images", "a.jpg"))
    _data_nus_csv(root, [row])
    with pytest.raises(InputError, match=message) as e:
        _data_splits("nuswide", root)
    assert "nus_wid_data.csv" in str(e.value) and "\n" not in str(e.value)
    assert len(str(e.value)) < 600


def test_data_nuswide_non_utf8_and_nothing_usable(tmp_path):
    root = str(tmp_path)
    _data_nus_csv(root, ["images/caf\xe9.jpg,\"['sky']\",train"], encoding="latin-1")
    with pytest.raises(InputError, match="line 2: byte 0xe9 is not UTF-8") as e:
        _data_splits("nuswide", root)
    assert "nus_wid_data.csv" in str(e.value)
    _data_nus_csv(root, ["x.jpg,\"['sky']\",train"])
    with pytest.raises(InputError, match="1 classes and 0 train images"):
        _data_splits("nuswide", root)
    _data_jpeg(os.path.join(root, "x.jpg"))
    _data_nus_csv(root, ["x.jpg,[],train"])  # no label anywhere: a 0-class model
    with pytest.raises(InputError, match="0 classes"):
        _data_splits("nuswide", root)
    _data_nus_csv(root, ["x.jpg,\"['sky']\",train"])  # no val row
    with pytest.raises(InputError, match="1 classes and 0 val images"):
        _data_splits("nuswide", root)


# ---------------------------------------------------------------------------------------------
# CSV: your own set


def _data_csv(root, name, rows, header="image,labels", encoding="utf-8"):
    with open(os.path.join(root, name), "w", encoding=encoding, newline="") as f:
        f.write("".join(r + "\r\n" for r in [header, *rows]))  # csv.writer's line ends


def _data_csv_fixture(root):
    for name in ("a", "b", "c", "d"):
        _data_jpeg(os.path.join(root, "photos", f"{name}.jpg"))
    _data_csv(root, "train.csv", ["photos/a.jpg,dog cat", "photos/b.jpg,", 'photos/c.jpg," bird"'])
    _data_csv(root, "val.csv", ["photos/d.jpg,cat"])


def test_data_csv_layout(tmp_path):
    root = str(tmp_path)
    _data_csv_fixture(root)
    splits = _data_splits("csv", root)
    assert splits.classes == splits.val.classes == ["bird", "cat", "dog"]  # sorted, from train
    assert splits.train.targets.tolist() == [[0, 1, 1], [0, 0, 0], [1, 0, 0]]  # b: no label
    assert splits.val.targets.tolist() == [[0, 1, 0]]
    assert splits.train.files[0] == os.path.join(root, "photos", "a.jpg")
    image, target, sizes = splits.val[0]
    assert image.shape == (3, 32, 32) and target.tolist() == [0, 1, 0] and sizes.sum() == 0
    assert len(_data_splits("csv", root, num_train=2).train) == 2  # the first N


@pytest.mark.parametrize(
    "name, rows, message",
    [
        ("val.csv", ["photos/d.jpg,zebra"], r"val.csv: line 2: label 'zebra' is not among the"),
        ("train.csv", ["photos/a.jpg,cat", "photos/gone.jpg,cat"], "line 3: image file not found"),
        ("train.csv", ["photos,cat"], "line 2: image file .*photos is a directory"),
        ("train.csv", ["photos/a.jpg,cat,extra"], "line 2: 3 columns, expected 2"),
        ("train.csv", ["photos/a.jpg"], "line 2: 1 columns, expected 2"),
        ("train.csv", ["../x.jpg,cat"], "line 2: image path '../x.jpg' leaves"),
        ("val.csv", ["/etc/hostname,cat"], "line 2: image path '/etc/hostname' leaves"),
        ("train.csv", ["photos/a.jpg,cat", "photos/a.jpg,dog"], "a.jpg is listed twice in the t"),
        ("val.csv", ["photos/a.jpg,cat"], "a.jpg is in both the train split .* and the val"),
        ("train.csv", ['photos/a.jpg,"' + "x" * 200000 + '"'], "line 2: field larger than field"),
        ("header", ["photos/a.jpg,cat"], "line 1 names an image; the first line is a header"),
        ("latin-1", ["photos/caf\xe9.jpg,cat"], "train.csv: line 3: byte 0xe9 is not UTF-8"),
    ],
)
def test_data_csv_refuses_bad_rows(tmp_path, name, rows, message):
    """Each row problem is one line naming the file and the line."""
    root = str(tmp_path)
    _data_csv_fixture(root)
    if name == "header":  # no header: the first image would be lost
        _data_csv(root, "train.csv", rows[1:], header=rows[0])
    elif name == "latin-1":
        _data_csv(root, "train.csv", ["photos/a.jpg,cat", *rows], encoding="latin-1")
    else:
        _data_csv(root, name, rows)
    with pytest.raises(InputError, match=message) as e:
        _data_splits("csv", root)
    assert "\n" not in str(e.value) and ".csv" in str(e.value)


# ---------------------------------------------------------------------------------------------
# files: regular ones only, bounded reads


def test_data_refuses_fifos_devices_and_folders_without_opening_them(tmp_path):
    """Opening a fifo waits for a writer forever, and /dev/zero never ends: each is refused from
    its os.stat. The alarm turns a hang into a failure."""
    import signal

    def hang(*_):
        raise TimeoutError("a read hung")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(30)
    try:
        fifo = str(tmp_path / "pipe")
        os.mkfifo(fifo)
        with pytest.raises(InputError, match=r"^checkpoint .*pipe is a fifo \(named pipe\), not a"):
            data.check_regular_file(fifo, "checkpoint")
        with pytest.raises(InputError, match="^checkpoint .* is a directory, not a regular file"):
            data.check_regular_file(tmp_path, "checkpoint")
        with pytest.raises(InputError, match="^checkpoint /dev/null is a device, not a regular"):
            data.check_regular_file("/dev/null", "checkpoint")
        with pytest.raises(InputError, match="^checkpoint not found: .*absent.pt$"):
            data.check_regular_file(tmp_path / "absent.pt", "checkpoint")
        assert data.check_regular_file(__file__, "x").st_size > 0
        with pytest.raises(InputError, match=r"^image file .*pipe is a fifo"):
            data.load_image(fifo)
        os.makedirs(tmp_path / "coco")
        _data_coco_fixture(str(tmp_path / "coco"))
        _data_voc_fixture(str(tmp_path / "voc"))
        os.makedirs(tmp_path / "csv")
        _data_csv_fixture(str(tmp_path / "csv"))
        os.makedirs(tmp_path / "nuswide")
        for name, data_dir, target in (
            ("coco", "coco", "coco/annotations/instances_train2014.json"),
            ("voc", "voc/VOCdevkit", "voc/VOCdevkit/VOC2007/Annotations/000002.xml"),
            ("nuswide", "nuswide", "nuswide/nus_wid_data.csv"),
            ("csv", "csv", "csv/val.csv"),
        ):
            for special, kind in ((fifo, r"a fifo \(named pipe\)"), ("/dev/zero", "a device")):
                if os.path.lexists(tmp_path / target):
                    os.remove(tmp_path / target)
                os.symlink(special, tmp_path / target)
                with pytest.raises(InputError, match=f"{target} is {kind}, not a regular") as e:
                    _data_splits(name, str(tmp_path / data_dir))
                assert "\n" not in str(e.value)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_data_annotation_reads_are_bounded(tmp_path, monkeypatch):
    _data_coco_fixture(str(tmp_path))
    size = os.path.getsize(tmp_path / "annotations" / "instances_train2014.json")
    monkeypatch.setattr(data, "MAX_ANNOTATION_BYTES", size - 1)
    with pytest.raises(InputError, match=f"has {size} bytes, over the {size - 1} that are read"):
        _data_splits("coco", str(tmp_path))
    monkeypatch.setattr(data, "MAX_ANNOTATION_BYTES", size)
    assert len(_data_splits("coco", str(tmp_path)).train) == 3


# ---------------------------------------------------------------------------------------------
# image decoding


def _data_save(img, path, fmt, **kw):
    img.save(path, fmt, **kw)
    return path


def test_data_image_modes(tmp_path):
    """Every mode comes out as the RGB a viewer shows. Hand-worked values in the comments."""

    def p(name):
        return str(tmp_path / name)

    grey = _data_save(Image.new("L", (4, 4), 100), p("l.png"), "PNG")
    assert data.load_image(grey).getpixel((0, 0)) == (100, 100, 100)
    cmyk = _data_save(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), p("c.jpg"), "JPEG", quality=95)
    assert np.allclose(data.load_image(cmyk).getpixel((4, 4)), (0, 255, 255), atol=8)  # cyan
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    assert data.load_image(_data_save(pal, p("p.png"), "PNG")).getpixel((0, 0)) == (255, 0, 0)
    pal.putpixel((0, 0), 0)
    out = data.load_image(
        _data_save(pal, p("pt.png"), "PNG", transparency=0)
    )  # index 0 transparent
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (255, 0, 0)
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    out = data.load_image(_data_save(rgba, p("a.png"), "PNG"))
    # transparent red shows the white background, not red;
    # half-transparent black: 255 * (1 - 128/255) = 127
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 0, 255)
    assert np.allclose(out.getpixel((2, 0)), (127, 127, 127), atol=1)
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (0, 255)])
    out = data.load_image(_data_save(la, p("la.png"), "PNG"))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 0, 0)
    keyed = _data_save(Image.new("L", (2, 1), 7), p("lt.png"), "PNG", transparency=7)  # grey key
    assert data.load_image(keyed).getpixel((0, 0)) == (255, 255, 255)
    sixteen = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))  # I;16
    assert sixteen.mode == "I;16"
    out = data.load_image(_data_save(sixteen, p("16.png"), "PNG"))
    assert [out.getpixel((x, 0)) for x in range(3)] == [(0,) * 3, (128,) * 3, (255,) * 3]  # /257
    bilevel = Image.new("1", (2, 2), 1)
    assert data.load_image(_data_save(bilevel, p("1.png"), "PNG")).getpixel((0, 0)) == (
        255,
        255,
        255,
    )
    for path in (grey, cmyk):
        assert data.load_image(path).mode == "RGB"


def test_data_exif_rotation(tmp_path):
    """Orientation 6 = rotate 90 degrees clockwise for display: the stored left half goes on top."""
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6
    path = str(tmp_path / "rot.jpg")
    img.save(path, "JPEG", exif=exif, quality=95)
    out = data.load_image(path)
    assert out.size == (20, 40)
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_data_corrupt_truncated_and_draft(tmp_path):
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 800, 3), dtype=np.uint8))
    path = str(tmp_path / "big.jpg")
    big.save(path, "JPEG", quality=90)
    assert data.load_image(path).size == (800, 600)
    drafted = data.load_image(
        path, draft_size=96
    )  # 1/4 scale keeps both sides >= 96 (1/8 would be 75)
    assert drafted.size == (200, 150)
    raw = open(path, "rb").read()
    trunc = tmp_path / "truncated.jpg"
    trunc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="truncated.jpg") as e:
        data.load_image(str(trunc))
    assert "\n" not in str(e.value)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(InputError, match="junk.png"):
        data.load_image(str(junk))
    with pytest.raises(InputError, match="not found: .*absent.jpg"):
        data.load_image(str(tmp_path / "absent.jpg"))
    with pytest.raises(InputError, match="is a directory"):
        data.load_image(str(tmp_path))


def _data_png_header(path, width, height):
    """A PNG whose header claims width x height (8-bit grey); Pillow reads only the header."""

    def chunk(kind, body):
        crc = struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 8))
            + chunk(b"IEND", b"")
        )
    return str(path)


def test_data_refuses_huge_and_foreign_images(tmp_path):
    """13000 x 13000 would take 1.3 GB decoded (Pillow only warns below 2 x its limit); an EPS
    named .jpg must not reach Ghostscript."""
    with pytest.raises(InputError, match="huge.png is too large .*169000000 pixels") as e:
        data.load_image(_data_png_header(tmp_path / "huge.png", 13000, 13000))
    assert "\n" not in str(e.value)
    eps = tmp_path / "photo.jpg"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n")
    with pytest.raises(InputError, match="photo.jpg: UnidentifiedImageError"):
        data.load_image(str(eps))


def test_data_val_images_are_verified_up_front(tmp_path):
    _data_coco_fixture(str(tmp_path))
    splits = _data_splits("coco", str(tmp_path))
    data.verify_images(splits.train.files)
    bad = splits.val.files[0]
    with open(bad, "rb") as f:
        raw = f.read()
    with open(bad, "wb") as f:
        f.write(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="cannot decode image .*COCO_val2014_000000000007.jpg"):
        _data_splits("coco", str(tmp_path))


def test_data_error_from_a_worker_is_one_line(tmp_path):
    """A DataLoader worker re-raises InputError in the main process with the worker's whole
    traceback in the message (torch's ExceptionWrapper, as the worker loop uses it)."""
    _data_coco_fixture(str(tmp_path))
    os.remove(tmp_path / "train2014" / "COCO_train2014_000000000011.jpg")
    ds = _data_splits("coco", str(tmp_path)).train
    try:
        ds[0]
    except InputError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    assert "Traceback" in wrapped.exc_msg
    with pytest.raises(InputError) as e:
        wrapped.reraise()
    assert str(e.value).startswith("image file not found: ") and "\n" not in str(e.value)
    assert str(InputError(str(e.value))) == str(e.value)  # a message of one line is kept as it is


def test_data_newline_in_a_path_stays_one_line(tmp_path):
    path = tmp_path / "a\nb.jpg"
    with pytest.raises(InputError) as e:
        data.load_image(path)
    assert str(e.value) == f"image file not found: {tmp_path}/a\\nb.jpg"
    try:
        data.load_image(path)
    except InputError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 1")
    with pytest.raises(InputError) as e:
        wrapped.reraise()
    assert str(e.value) == f"image file not found: {tmp_path}/a\\nb.jpg"


def test_data_bad_names_and_roots(tmp_path):
    for name in ("coco", "voc", "nuswide", "csv"):
        for root in (str(tmp_path / "missing"), None):
            with pytest.raises(InputError, match="data-dir") as e:
                _data_splits(name, root)
            assert "\n" not in str(e.value) and data.LAYOUTS[name] in str(e.value)
    with pytest.raises(InputError, match="missing.* not found"):
        _data_splits("coco", str(tmp_path / "missing"))
    with pytest.raises(InputError, match="unknown dataset 'imagenet'"):
        _data_splits("imagenet")
    # Shapes has no end: 0 images is refused, not read as "all"
    with pytest.raises(InputError, match="--num-train 0 .* give each at least 1"):
        _data_splits("shapes", num_train=0, num_val=10)


def test_data_size_category():
    assert [data.size_category(a) for a in (0, 1023.9, 1024, 9215, 9216)] == [1, 1, 2, 2, 3]
    # scaled to a 96x96 image: 1024 * 9216 / 307200 = 30.72, 9216 * 9216 / 307200 = 276.48
    assert [data.size_category(a, 96 * 96) for a in (30.7, 30.8, 276.4, 276.5)] == [1, 2, 2, 3]


# ---------------------------------------------------------------------------------------------
# predict's images


def test_data_list_images_and_predict_images(tmp_path):
    """Folders recursively (JPEG and PNG, any case, sorted), files as given; a bad or missing
    image is (zeros, one line naming it), and the others are still read."""
    _data_jpeg(str(tmp_path / "dir" / "b.jpg"))
    os.makedirs(tmp_path / "dir" / "sub")
    Image.new("RGB", (9, 9), (0, 90, 0)).save(tmp_path / "dir" / "sub" / "a.PNG")
    (tmp_path / "dir" / "notes.txt").write_text("not an image")
    (tmp_path / "dir" / "bad.jpeg").write_bytes(b"not an image either")
    _data_jpeg(str(tmp_path / "one.jpg"))
    given = [tmp_path / "one.jpg", tmp_path / "dir", tmp_path / "gone.jpg"]
    files = data.list_images(given)
    names = ["one.jpg", "dir/b.jpg", "dir/bad.jpeg", "dir/sub/a.PNG", "gone.jpg"]
    assert files == [str(tmp_path / n) for n in names]
    loader = torch.utils.data.DataLoader(data.PredictImages(files, 32), batch_size=5)
    images, errors = next(iter(loader))
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.float32
    assert [errors[i] for i in (0, 1, 3)] == ["", "", ""] and images[3].abs().sum() > 0
    assert errors[2].startswith(f"cannot decode image {tmp_path}/dir/bad.jpeg: ")
    assert "\n" not in errors[2] and images[2].abs().sum() == 0
    assert errors[4] == f"image file not found: {tmp_path}/gone.jpg"
    os.makedirs(tmp_path / "empty")
    with pytest.raises(InputError, match="no JPEG or PNG images in .*empty"):
        data.list_images([tmp_path / "empty"])


# ---------------------------------------------------------------------------------------------
# Shapes


def test_data_shapes_determinism_and_disjoint_splits():
    a, b = data.Shapes(20, seed=3), data.Shapes(20, seed=3)
    x1, t1, s1 = a[7]
    x2, t2, s2 = b[7]
    assert torch.equal(x1, x2) and torch.equal(t1, t2) and torch.equal(s1, s2)
    assert torch.equal(a[7][0], x1)  # repeated access
    assert not torch.equal(data.Shapes(20, seed=4)[7][0], x1)
    assert x1.shape == (3, 96, 96) and t1.shape == (12,) and s1.dtype == torch.int64
    assert ((t1 == 1) == (s1 > 0)).all()  # every present label has a size, absent ones none
    splits = _data_splits("shapes", img_size=96, num_train=30, num_val=30)
    train, val = splits.train, splits.val
    assert splits.classes == data.SHAPE_CLASSES and len(train) == len(val) == 30
    assert val.index_offset == data.SHAPES_VAL_OFFSET >= 10**9
    tr = {train.image(i).tobytes() for i in range(30)}
    assert not tr & {val.image(i).tobytes() for i in range(30)}
    with pytest.raises(IndexError):
        train[30]


def _data_shapes_stats(ds, n):
    """Label statistics over the first n images, from the layouts (nothing is drawn)."""
    T, S = (
        np.zeros((n, len(ds.classes)), np.int64),
        np.zeros((n, len(ds.classes)), np.int64),
    )  # (n, K)
    objects = [ds.layout(i) for i in range(n)]
    for i, objs in enumerate(objects):
        for o in objs:
            T[i, o["k"]], S[i, o["k"]] = 1, max(S[i, o["k"]], o["size"])
    cooc = {}
    for a, b, _ in data.COOCCURRENCE:
        has_a, kb = T[:, ds.classes.index(a)] == 1, ds.classes.index(b)
        cooc[f"{b}|{a}"], cooc[f"{b}|not {a}"] = T[has_a, kb].mean(), T[~has_a, kb].mean()
    pos = S[T == 1]
    return dict(
        cooccurrence=cooc,
        size_fraction={c: (pos == v).mean() for v, c in enumerate(("small", "medium", "large"), 1)},
        labels_per_image=T.sum(1).mean(),
        objects_per_image=max(len(o) for o in objects),
        class_freq=T.mean(0),
        objects=objects,
    )


def test_data_shapes_fresh_images_every_epoch():
    """set_epoch(e) draws another stream slice: epoch 1's image i is image num_images + i of epoch
    0's stream, so no two epochs repeat an image and each epoch is reproducible."""
    shapes = data.Shapes(4, img_size=32)
    first = [shapes[i][0] for i in range(4)]
    shapes.set_epoch(1)
    second = [shapes[i][0] for i in range(4)]
    longer = data.Shapes(8, img_size=32)
    assert all(not torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert all(torch.equal(second[i], longer[4 + i][0]) for i in range(4))
    shapes.set_epoch(0)
    assert all(torch.equal(first[i], shapes[i][0]) for i in range(4))


def test_data_shapes_counterfactual_leaves_out_only_that_object():
    """image(i, leave_out) is image i without those classes' objects: the same pixels outside
    their boxes (objects are pasted after every random draw), the background inside."""
    shapes = data.Shapes(400, img_size=96)
    i = next(i for i in range(400) if {"bar", "dot"} <= {o["name"] for o in shapes.layout(i)})
    full = np.asarray(shapes.image(i))
    boxes = {o["name"]: o["box"] for o in shapes.layout(i)}
    for name in ("bar", "dot"):
        without = np.asarray(shapes.image(i, leave_out=(name,)))
        x0, y0, x1, y1 = boxes[name]
        inside = np.zeros(full.shape[:2], bool)
        inside[y0:y1, x0:x1] = True
        assert (without[~inside] == full[~inside]).all()
        assert (without[inside] != full[inside]).any()
    assert (np.asarray(shapes.image(i, leave_out=())) == full).all()


def test_data_shapes_statistics():
    ds = data.Shapes(1500, seed=0)
    st = _data_shapes_stats(ds, 1500)
    # designed P(B | A) = 0.8; sd of the estimate with ~240 A-images is ~0.026, placement may
    # drop a few
    assert abs(st["cooccurrence"]["dot|bar"] - 0.8) < 0.08
    assert abs(st["cooccurrence"]["moon|star"] - 0.8) < 0.08
    assert st["cooccurrence"]["dot|not bar"] < 0.35 and st["cooccurrence"]["moon|not star"] < 0.35
    assert 0.12 <= st["size_fraction"]["small"] <= 0.32  # designed ~20%
    assert st["size_fraction"]["large"] > 0.25
    assert abs(sum(st["size_fraction"].values()) - 1) < 1e-9
    assert 1.6 <= st["labels_per_image"] <= 3.0 and st["objects_per_image"] <= 4
    assert st["class_freq"].min() > 0.08
    n_small_dot = 0
    for objs in st["objects"][:200]:
        assert 1 <= len(objs) <= 4
        for o in objs:
            if o["name"] == "dot":  # the small-object class: below one 4x4 patch
                assert o["area"] < 16 and o["size"] == 1
                n_small_dot += 1
    assert n_small_dot > 20
    # the label's size is the larger of its instances' sizes
    for i, objs in enumerate(st["objects"][:200]):
        _, _, sizes = ds[i]
        for o in objs:
            assert sizes[o["k"]] == max(p["size"] for p in objs if p["k"] == o["k"])


def test_data_shapes_similar_pairs_differ_by_a_hole():
    """circle/ring and square/dotted_square: same outline, the second with its centre empty."""
    for full, holed in data.SIMILAR_PAIRS:
        a, b = (np.asarray(data._shape_mask(n, 40.0, 0.0), np.float64) for n in (full, holed))
        assert a[21, 21] == 255 and b[21, 21] == 0  # the centre of the 42-pixel canvas
        assert np.abs(a - b)[:, :5].max() == 0 and 0.1 < (a - b).sum() / a.sum() < 0.45


# ---------------------------------------------------------------------------------------------
# transforms and loading


def test_data_transforms_shape_dtype_and_seed():
    """A training sample's augmentation is a function of (seed, epoch, index) alone: the global
    generators of torch, numpy and Python are neither read nor moved."""
    import random

    img = data.Shapes(1).image(0)
    train = data.build_transform(64, True, seed=5)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    torch.manual_seed(0)
    a = train(img, 3, 7)
    torch.manual_seed(1)
    assert torch.equal(train(img, 3, 7), a)
    torch.set_rng_state(before[0])
    assert torch.equal(data.build_transform(64, True, seed=5)(img, 3, 7), a)
    train(img, 1, 2)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert (np.random.get_state()[1] == before[1]).all() and random.getstate() == before[2]
    assert a.shape == (3, 64, 64) and a.dtype == torch.float32
    others = [train(img, 3, 8), train(img, 4, 7), data.build_transform(64, True, seed=6)(img, 3, 7)]
    assert all(not torch.equal(a, o) for o in others)  # another index, epoch or seed
    ev = data.build_transform(48, False)
    assert torch.equal(ev(img), ev(img, 5, 5)) and ev(img).shape == (3, 48, 48)
    mean_img = Image.new("RGB", (10, 7), tuple(round(255 * m) for m in data.IMAGENET_MEAN))
    assert ev(mean_img).abs().max() < 0.02  # the ImageNet mean colour normalises to ~0
    for name, op in data.RANDAUG_OPS.items():  # all 14 keep size and mode
        for v in (-0.5, 1.0):
            out = op(img.copy(), v)
            assert out.size == img.size and out.mode == "RGB", name
    assert len(data.RANDAUG_OPS) == 14
    cut = data.cutout(img.copy(), data.augmentation_generator(0, 0, 1), p=1.0)
    changed = (np.asarray(cut) != np.asarray(img)).any(axis=2).sum()
    assert 0 < changed <= 49 * 49  # a rectangle of at most (96/2 + 1)^2 pixels
    off = data.build_transform(96, True, randaug=(0, 9), cutout=0.0)  # train.py's Shapes setting
    assert torch.equal(off(img, 1, 1), data.build_transform(96, False)(img))


def test_data_augmentation_does_not_depend_on_the_worker_count():
    """With the paper's augmentation on, 0 and 2 DataLoader workers give bitwise the same
    batches; set_epoch gives each epoch its own augmentation."""
    splits = _data_splits(
        "shapes", img_size=64, randaug=(2, 9), cutout=0.5, num_train=12, num_val=1
    )
    ds = splits.train
    assert ds.transform.randaug == (2, 9) and ds.transform.cutout == 0.5

    def epoch(e, workers):
        ds.set_epoch(e)
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers)
        return list(loader)

    zero = epoch(1, 0)
    two = epoch(1, 2)
    x, t, s = zero[0]
    assert x.shape == (4, 3, 64, 64) and t.shape == (4, 12) and s.shape == (4, 12)
    assert x.dtype == torch.float32 and t.dtype == torch.float32 and s.dtype == torch.int64
    for (x0, t0, s0), (x2, t2, s2) in zip(zero, two, strict=True):
        assert torch.equal(x0, x2) and torch.equal(t0, t2) and torch.equal(s0, s2)
    next_epoch = epoch(2, 2)
    assert all(
        not torch.equal(a[0][i], b[0][i])
        for a, b in zip(zero, next_epoch, strict=True)
        for i in range(4)
    )
    plain = _data_splits("shapes", img_size=64, num_train=12, num_val=1).train
    assert not any(
        torch.equal(x, plain[4 * b + i][0]) for b in range(3) for i, x in enumerate(zero[b][0])
    )


# =============================================================================
# train.py (Section 4.1 recipe)

_TRAIN_REPO = os.path.dirname(os.path.abspath(train.__file__))
# Small, quick settings shared by the runs below: 12 Shapes classes, tiny model, CPU.
_TRAIN_TINY = ["--workers", "0", "--device", "cpu"]
# 40 images of batch 8: 5 steps per epoch.
_TRAIN_40 = ["--num-train", "40", "--num-val", "8", "--batch-size", "8", *_TRAIN_TINY]


def _train_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _train_cli(*args, env=None, wait=True):
    """Run `python train.py ARGS` in a subprocess (Popen when wait is False)."""
    cmd = [sys.executable, os.path.join(_TRAIN_REPO, "train.py"), *map(str, args)]
    p = subprocess.Popen(
        cmd,
        cwd=_TRAIN_REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    return p.communicate(timeout=120) + (p.returncode,) if wait else p


def _train_exit(argv, capsys):
    """train.main(argv) in this process -> (exit code, stderr); 0 when it returns."""
    try:
        train.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _train_check_error(msg, err, code):
    assert code == 2, (msg, err)
    assert err.count("\n") == 1 and err.startswith("train.py: error: ") and msg in err, (msg, err)
    assert "Traceback" not in err


def _train_losses_failing_at(monkeypatch, n, exc):
    """Make the n-th training step (1-based) raise exc, or return a NaN loss when exc is None."""
    calls, real = {"n": 0}, train.mitr_loss

    def loss(*a, **k):
        calls["n"] += 1
        value, parts = real(*a, **k)
        if calls["n"] == n:
            if exc is not None:
                raise exc
            value = value * float("nan")
        return value, parts

    monkeypatch.setattr(train, "mitr_loss", loss)


def _train_fork(argv, setup=None, stderr=os.devnull):
    """train.main(argv) in a forked copy of this process (no start-up cost), after setup() there;
    its stderr to the file `stderr` -> its pid. Exit status: main's."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os.dup2(os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            torch.set_num_threads(1)
            if setup is not None:
                setup()
            train.main([str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code
        except KeyboardInterrupt:  # Ctrl-C before main took it over
            code = 130
        finally:
            os._exit(code)
    return pid


def _train_wait(pid):
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _train_same_state(a, b):
    """Whether two checkpoints hold bitwise the same model, EMA and Adam state."""
    for part in ("model", "ema"):
        if a[part].keys() != b[part].keys():
            return False
        if not all(torch.equal(a[part][k], b[part][k]) for k in a[part]):
            return False
    for i, moments in a["optimizer"]["state"].items():
        other = b["optimizer"]["state"][i]
        if not all(torch.equal(moments[k], other[k]) for k in ("step", "exp_avg", "exp_avg_sq")):
            return False
    return a["step"] == b["step"] and a["epoch"] == b["epoch"]


def _train_csv(root, n_train, n_val, bad=()):
    """A set in the csv layout (ROOT/train.csv, ROOT/val.csv, images under ROOT/img/): random
    PNGs with 1-2 of 3 labels each; the files named in `bad` are not PNGs."""
    rng = np.random.default_rng(0)
    os.makedirs(root / "img", exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        rows = ["image,labels"]
        for i in range(n):
            name = f"img/{split}{i}.png"
            pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name)
            if name in bad:
                (root / name).write_bytes(b"\x89PNG not really")
            labels = rng.choice(["cat", "dog", "owl"], size=1 + i % 2, replace=False)
            rows.append(f"{name},{' '.join(labels)}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def _train_run(tmp_path_factory):
    """One short real run (768 Shapes images, 2 epochs of 48 steps, no augmentation: it only slows
    learning this short): its folder, shared by the tests below; its stdout in ../stdout.txt."""
    out = tmp_path_factory.mktemp("run") / "shapes"
    with open(out.parent / "stdout.txt", "w") as f, contextlib.redirect_stdout(f):
        train.main(
            [
                "--num-train",
                "768",
                "--num-val",
                "200",
                "--batch-size",
                "16",
                "--epochs",
                "2",
                "--lr",
                "1e-3",
                "--randaug",
                "0",
                "0",
                "--cutout",
                "0",
                "--out",
                str(out),
                *_TRAIN_TINY,
            ]
        )
    return out


@pytest.mark.slow
def test_train_short_run_learns(_train_run):
    log = _train_log(_train_run)
    assert log[0]["kind"] == "config" and log[0]["args"]["variant"] == "tiny"
    epochs = [r for r in log if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert epochs[-1]["train_loss"] < 0.95 * epochs[0]["train_loss"]  # measured: 3.79 -> 3.55
    # Chance. A random ranking has AP equal to the class's positive rate in expectation over many
    # images (18.5% here: 2.2 labels per image over 12 classes); with 200 images it is a little
    # higher (20.5 +- 1.0 over random score matrices). Calibrated on the same val images: the run
    # must beat chance by 4 standard deviations (measured: 26.4 after these 96 steps of 16 images;
    # 47 after 156 steps of 64).
    val = data.load_splits(
        "shapes", img_size=96, randaug=(0, 0), cutout=0, seed=0, num_train=1, num_val=200
    ).val
    targets = np.stack([val[i][1].numpy() for i in range(len(val))])
    rng = np.random.default_rng(0)
    chance = [np.nanmean(average_precision(rng.random(targets.shape), targets)) for _ in range(100)]
    assert abs(np.mean(chance) - 100 * targets.mean()) < 4
    best = max(r["mAP"] for r in epochs)
    assert best > np.mean(chance) + 4 * np.std(chance), (best, np.mean(chance), np.std(chance))
    for r in epochs:  # the full table, both models, every epoch
        assert r["val_rows"] == 200 and r["best_of"] in ("model", "ema")
        for name in ("model", "ema"):
            assert {"mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", "AP_s", "AP_m", "AP_l"} <= set(
                r[name]
            )
            ap = r[name]["AP_per_class"]  # K floats, in the checkpoint's class order
            assert len(ap) == len(data.SHAPE_CLASSES) and all(isinstance(x, float) for x in ap)
            assert np.nanmean(ap) == pytest.approx(r[name]["mAP"])
        # every decoding of the better model; the one threshold chosen for CF1 beats 0.5 on CF1
        rows = r[r["best_of"]]["decodings"]
        assert set(rows) == {"threshold", "overall", "per_class", "count"}
        assert rows["threshold"]["CF1"] == pytest.approx(r[r["best_of"]]["CF1"])
        assert rows["overall"]["CF1"] >= rows["threshold"]["CF1"] - 1e-9
    assert sorted(os.listdir(_train_run)) == ["best.pt", "last.pt", "log.jsonl", "samples.png"]
    ck = torch.load(_train_run / "best.pt", weights_only=True)
    assert ck["best_map"] == pytest.approx(best) and ck["classes"] == data.SHAPE_CLASSES
    assert set(train.CKPT_KEYS) <= set(ck)
    thresholds = ck["thresholds"]  # chosen on validation for the better model, as probabilities
    assert 0 <= thresholds["overall"] <= 1 and len(thresholds["per_class"]) == 12
    assert all(0 <= t <= 1 for t in thresholds["per_class"])
    stdout = (_train_run.parent / "stdout.txt").read_text()
    # the first progress line after the first step; at the end each class's AP and the picture
    assert re.search(r"^epoch 1/2 step 1/96 \| loss ", stdout, re.M)
    assert "p >= 0.5 (Section 4.1)" in stdout and "top z, z from the count head" in stdout
    closing = stdout.split("AP per class")[-1]
    assert all(f" {c} " in closing for c in data.SHAPE_CLASSES)
    assert f"samples: {_train_run / 'samples.png'}" in closing
    assert Image.open(_train_run / "samples.png").size[0] > 4 * 96


def test_train_eval_only_reproduces_logged_metrics(_train_run, capsys):
    """Evaluating last.pt again gives the metrics logged when it was written; nothing is written."""
    before = sorted(os.listdir(_train_run))
    reports = train.main(["--resume", str(_train_run / "last.pt"), "--eval-only", *_TRAIN_TINY])
    logged = [r for r in _train_log(_train_run) if r["kind"] == "epoch"][-1]
    for name in ("model", "ema"):
        for k in ("mAP", "CF1", "OF1", "AP_s"):
            assert reports[name][k] == pytest.approx(logged[name][k], abs=1e-6)
    assert "mAP" in capsys.readouterr().out
    assert sorted(os.listdir(_train_run)) == before


def test_train_resume_is_exact_and_writes_a_new_folder(tmp_path, monkeypatch, capsys):
    """2 epochs in one go == 1 epoch, Ctrl-C in the 2nd, --resume last.pt: bitwise-equal model, EMA
    and optimizer state on CPU (and best.pt is always written first). The resumed run writes into a
    new folder and nothing into the old one, not even on read-only storage, and removes nothing
    there: not a user's file of a temporary name, nor another writer's temporary file."""
    common = [*_TRAIN_40, "--epochs", "2"]
    writes, save = [], train.save_checkpoint

    def recording_save(state, path):
        writes.append((os.path.basename(path), state["best_map"]))
        save(state, path)

    monkeypatch.setattr(train, "save_checkpoint", recording_save)
    train.main([*common, "--out", str(tmp_path / "a")])
    # best.pt is written before last.pt: a kill between any two writes leaves last.pt recording
    # no better mAP than best.pt holds (replay every prefix of the writes)
    assert [w for w, _ in writes].count("last.pt") == 2
    for n in range(len(writes) + 1):
        on_disk = dict(writes[:n])  # the newest write of each file
        if "last.pt" in on_disk:
            assert "best.pt" in on_disk and on_disk["last.pt"] <= on_disk["best.pt"], writes[:n]
    monkeypatch.undo()
    _train_losses_failing_at(monkeypatch, 6, KeyboardInterrupt)  # 5 steps per epoch: epoch 2
    code, err = _train_exit([*common, "--out", tmp_path / "b"], capsys)
    assert code == 130 and f"--resume {tmp_path / 'b' / 'last.pt'}" in err
    monkeypatch.undo()
    half = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert half["epoch"] == 1 and half["step"] == 5
    (tmp_path / "b" / ".checkpoint.tmp").write_text("a user's notes")
    (tmp_path / "b" / ".last.pt.999-abcd1234.tmp").write_bytes(b"another writer's save")
    before = {f: (tmp_path / "b" / f).read_bytes() for f in os.listdir(tmp_path / "b")}
    os.chmod(tmp_path / "b", 0o555)  # read-only (as root it stops nothing: the bytes are compared)
    try:
        resume = ["--resume", tmp_path / "b" / "last.pt", *_TRAIN_TINY]
        train.main([str(a) for a in [*resume, "--out", tmp_path / "c"]])
        assert {f: (tmp_path / "b" / f).read_bytes() for f in os.listdir(tmp_path / "b")} == before
        a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
        c = torch.load(tmp_path / "c" / "last.pt", weights_only=True)
        assert a["step"] == c["step"] == 10 and a["epoch"] == c["epoch"] == 2
        assert _train_same_state(a, c)
        assert [r["kind"] for r in _train_log(tmp_path / "c")] == ["resume", "epoch"]
        assert not torch.equal(half["model"]["head.weight"], a["model"]["head.weight"])
        # without --out, a resumed run takes a fresh default folder
        monkeypatch.chdir(tmp_path)
        train.main([str(a) for a in resume])
        assert len(os.listdir(tmp_path / "runs")) == 1
        assert {f: (tmp_path / "b" / f).read_bytes() for f in os.listdir(tmp_path / "b")} == before
    finally:
        os.chmod(tmp_path / "b", 0o755)


def test_train_resume_with_other_workers_is_exact_with_augmentation(tmp_path, monkeypatch, capsys):
    """With Cutout and RandAugment on, 1 epoch plus a resume with another --workers equals 2 epochs
    in one go, bitwise: each image's augmentation draws from (seed, epoch, index), whichever worker
    decodes it."""
    root = _train_csv(tmp_path / "set", 16, 4)
    common = ["--data", "csv", "--data-dir", root, "--variant", "tiny", "--img-size", "96"]
    common += ["--batch-size", "8", "--randaug", "2", "9", "--cutout", "0.5", "--epochs", "2"]
    common += ["--ema-decay", "0.9", "--device", "cpu"]
    splits = data.load_splits(
        "csv",
        data_dir=root,
        img_size=96,
        randaug=(2, 9),
        cutout=0.5,
        seed=0,
        num_train=0,
        num_val=0,
    )
    first = splits.train[0][0]
    splits.train.set_epoch(1)
    assert not torch.equal(first, splits.train[0][0])  # augmentation is on, and epoch-dependent
    train.main([str(a) for a in [*common, "--workers", "0", "--out", tmp_path / "a"]])
    _train_losses_failing_at(monkeypatch, 3, KeyboardInterrupt)  # 2 steps per epoch: epoch 2
    code, err = _train_exit([*common, "--workers", "0", "--out", tmp_path / "b"], capsys)
    assert code == 130 and f"--data-dir {root}" in err  # the hint names the data again
    monkeypatch.undo()
    resume = ["--resume", tmp_path / "b" / "last.pt", "--data-dir", root, "--workers", "2"]
    train.main([str(a) for a in [*resume, "--device", "cpu", "--out", tmp_path / "c"]])
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    c = torch.load(tmp_path / "c" / "last.pt", weights_only=True)
    assert _train_same_state(a, c)


def test_train_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A save that dies half-way leaves the previous file intact and no temporary file behind, and
    whatever torch.save raises is one line (a full disk is a RuntimeError of its zip writer, not an
    OSError). Each writer's temporary file is its own: two saves at once never share one."""
    path = tmp_path / "last.pt"
    train.save_checkpoint({"x": torch.ones(3)}, str(path))
    full_zip = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 320 vs 252")
    for error in (OSError(28, "No space left on device"), full_zip):

        def dying_save(obj, f, error=error):
            f.write(b"partial")
            raise error

        monkeypatch.setattr(train.torch, "save", dying_save)
        with pytest.raises(data.InputError, match="cannot write") as info:
            train.save_checkpoint({"x": torch.zeros(3)}, str(path))
        line = str(info.value)
        assert "\n" not in line and ("No space" in line or "pos 320" in line), line
        assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(3))
        assert os.listdir(tmp_path) == ["last.pt"]
    monkeypatch.undo()
    with train.atomic_write(path) as a, train.atomic_write(path) as b:
        names = {os.path.basename(a.name), os.path.basename(b.name)}
        assert len(names) == 2 and all(n.startswith(".last.pt.") for n in names), names


def test_train_full_disk_is_one_line_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch, capsys
):
    real, calls = torch.save, {"n": 0}

    def save(obj, f):  # epoch 1: best.pt, last.pt; epoch 2 fails as torch's zip writer does
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("[enforce fail at inline_container.cc:664] unexpected pos 64 vs 32")
        real(obj, f)

    monkeypatch.setattr(train.torch, "save", save)
    code, err = _train_exit([*_TRAIN_40, "--epochs", "2", "--out", tmp_path / "run"], capsys)
    _train_check_error("unexpected pos 64 vs 32", err, code)
    assert f"--resume {tmp_path / 'run' / 'last.pt'}" in err
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1
    assert sorted(os.listdir(tmp_path / "run")) == ["best.pt", "last.pt", "log.jsonl"]


def test_train_ctrl_c_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the 2nd epoch: exit 130, last.pt still the end of epoch 1. Ctrl-C in the 1st: no
    --resume suggested (nothing is on disk), the message says what to do. Ctrl-C between epoch 1's
    best.pt and last.pt: best.pt is a finished epoch, and the line says to resume it."""
    _train_losses_failing_at(monkeypatch, 5, KeyboardInterrupt)  # 3 steps per epoch: epoch 2
    out = tmp_path / "run"
    args = [
        "--num-train",
        "24",
        "--num-val",
        "4",
        "--batch-size",
        "8",
        "--epochs",
        "3",
        *_TRAIN_TINY,
    ]
    code, err = _train_exit([*args, "--out", out], capsys)
    assert code == 130 and "--resume" in err and err.count("\n") == 1
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["step"] == 3
    assert sorted(os.listdir(out)) == ["best.pt", "last.pt", "log.jsonl"]
    _train_losses_failing_at(monkeypatch, 1, KeyboardInterrupt)
    code, err = _train_exit([*args, "--out", tmp_path / "early"], capsys)
    assert code == 130 and "--resume" not in err and "new --out" in err and err.count("\n") == 1
    assert os.listdir(tmp_path / "early") == ["log.jsonl"]
    monkeypatch.undo()
    real = train.save_checkpoint

    def save(state, path):
        if path.endswith("last.pt"):
            raise KeyboardInterrupt
        real(state, path)

    monkeypatch.setattr(train, "save_checkpoint", save)
    code, err = _train_exit([*args, "--out", tmp_path / "between"], capsys)
    assert code == 130 and f"--resume {tmp_path / 'between' / 'best.pt'}" in err


def test_train_nonfinite_loss_and_scores_stop_the_run(tmp_path, monkeypatch, capsys):
    """A NaN loss in step 7 (epoch 2) stops the run there with one line; epoch 1's checkpoints
    stay. Weights made non-finite by an epoch's last step (its loss was finite) give non-finite
    validation scores: the same line, and epoch 1's checkpoints stay too."""
    _train_losses_failing_at(monkeypatch, 7, None)
    code, err = _train_exit([*_TRAIN_40, "--epochs", "3", "--out", tmp_path / "run"], capsys)
    _train_check_error("the loss is nan at step 7 (epoch 2); lower --lr", err, code)
    assert "--resume" in err
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1
    assert [r["kind"] for r in _train_log(tmp_path / "run")] == ["config", "epoch"]
    monkeypatch.undo()
    calls, real = {"n": 0}, train.ema_update

    def update(ema, model, decay):  # after step 10, the last of epoch 2, the weights are NaN
        calls["n"] += 1
        if calls["n"] == 10:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
        real(ema, model, decay)

    monkeypatch.setattr(train, "ema_update", update)
    code, err = _train_exit([*_TRAIN_40, "--epochs", "3", "--out", tmp_path / "w"], capsys)
    message = "validation scores are not finite at step 10 (epoch 2); lower --lr"
    _train_check_error(message, err, code)
    assert torch.load(tmp_path / "w" / "last.pt", weights_only=True)["epoch"] == 1


def test_train_killed_save_leaves_no_visible_junk(tmp_path):
    """SIGKILL inside a checkpoint write (epoch 2's best.pt): the folder shows only the good files;
    the hidden temporary file stays, and a resume (another run, in another folder) leaves it be."""
    out = tmp_path / "run"

    def die_in_third_save():
        real, n = torch.save, [0]

        def save(obj, f):
            n[0] += 1
            if n[0] == 3:
                f.write(b"partial")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            real(obj, f)

        torch.save = save

    pid = _train_fork([*_TRAIN_40, "--epochs", "2", "--out", out], setup=die_in_third_save)
    assert _train_wait(pid) == -signal.SIGKILL
    visible = sorted(f for f in os.listdir(out) if not f.startswith("."))
    assert visible == ["best.pt", "last.pt", "log.jsonl"]
    hidden = [f for f in os.listdir(out) if f.startswith(".best.pt.")]
    assert len(hidden) == 1 and (out / hidden[0]).read_bytes() == b"partial"
    train.main(["--resume", str(out / "last.pt"), "--out", str(tmp_path / "more"), *_TRAIN_TINY])
    assert sorted(os.listdir(out)) == sorted(visible + hidden)


@pytest.mark.slow
def test_train_random_kills_leave_resumable_checkpoints(tmp_path):
    """10 kills at random moments (seeded), by SIGKILL, SIGTERM or SIGINT, of a run of 2 epochs of
    one step (so most of the time goes to writing checkpoints): every checkpoint left loads and
    passes the checks, last.pt never records a better mAP than best.pt, no visible file is half
    written, Ctrl-C exits 130 (even inside torch.save), and resuming from what is on disk (last.pt,
    else best.pt) ends bit for bit where the uninterrupted run ends."""
    args = ["--num-train", "8", "--num-val", "4", "--batch-size", "8", "--epochs", "2"]
    args += _TRAIN_TINY
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # its lazy imports, before the forks
    start = time.time()
    assert _train_wait(_train_fork([*args, "--out", tmp_path / "ref"])) == 0
    duration = time.time() - start
    ref = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)
    rng = np.random.default_rng(0)
    kinds = [signal.SIGKILL, signal.SIGTERM, signal.SIGINT]
    resumed = 0
    for trial in range(10):
        out = tmp_path / f"kill{trial}"
        pid = _train_fork([*args, "--out", out])
        time.sleep(rng.uniform(0, duration))
        os.kill(pid, kinds[trial % 3])
        expected = {signal.SIGINT: 130}.get(kinds[trial % 3], -kinds[trial % 3])
        assert _train_wait(pid) in (0, expected), trial  # 0: it had finished
        on_disk = os.listdir(out) if os.path.exists(out) else []
        visible = {f for f in on_disk if not f.startswith(".")}
        assert visible <= {"best.pt", "last.pt", "log.jsonl", "samples.png"}, on_disk
        assert all(f.endswith(".tmp") for f in set(on_disk) - visible), on_disk
        names = [f for f in ("last.pt", "best.pt") if f in visible]
        cks = {f: train.load_checkpoint(str(out / f)) for f in names}
        assert "best.pt" in cks or "last.pt" not in cks
        if "last.pt" in cks:
            assert cks["last.pt"]["best_map"] <= cks["best.pt"]["best_map"]
            # killed between an epoch's best.pt and last.pt, best.pt is one epoch ahead
            assert cks["best.pt"]["epoch"] <= cks["last.pt"]["epoch"] + 1
        if not cks:
            continue
        ck = cks.get("last.pt", cks.get("best.pt"))
        if ck["epoch"] < 2:  # continue it as the line after the kill says
            name = "last.pt" if "last.pt" in cks else "best.pt"
            resume = ["--resume", out / name, *_TRAIN_TINY, "--out", tmp_path / f"resumed{trial}"]
            assert _train_wait(_train_fork(resume)) == 0  # one thread, as the reference ran
            ck = torch.load(tmp_path / f"resumed{trial}" / "last.pt", weights_only=True)
            resumed += 1
        assert _train_same_state(ck, ref), trial
    assert resumed >= 2  # measured: 6 of the 10


def test_train_out_is_claimed_exclusively(tmp_path, monkeypatch):
    """The run folder is made by os.mkdir: an existing path is refused, and two runs racing for
    one name cannot both get it."""
    args = argparse.Namespace(out=str(tmp_path / "race"), data="shapes", variant="tiny")
    train.claim_out(args)
    with pytest.raises(data.InputError, match="already exists"):
        train.claim_out(args)
    monkeypatch.setattr(train.os.path, "lexists", lambda p: False)  # the other run was faster
    with pytest.raises(data.InputError, match="File exists"):
        train.claim_out(args)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)  # the default name: time and process id
    auto = argparse.Namespace(out=None, data="shapes", variant="tiny")
    first = train.claim_out(auto)
    monkeypatch.setattr(train.os, "getpid", lambda: 1)  # another process in the same second
    assert train.claim_out(auto) != first


def test_train_exactly_5_steps_and_one_cycle_matches_torch(tmp_path):
    """The one-cycle schedule equals torch's OneCycleLR (lr and Adam's beta1, every step), and a run
    of exactly 5 steps, where OneCycleLR divides by zero, trains."""
    for total in (6, 20, 37):
        opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=1e-3, total_steps=total, pct_start=0.2
        )
        for step in range(total):
            lr, beta1 = train.one_cycle(step, total, 1e-3)
            assert lr == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
            assert beta1 == pytest.approx(opt.param_groups[0]["betas"][0], rel=1e-12)
            opt.step()
            sched.step()
    assert train.one_cycle(0, 5, 1e-3)[0] == pytest.approx(1e-3)  # no warm-up left: the peak
    train.main([*_TRAIN_40, "--epochs", "1", "--out", str(tmp_path / "run")])
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 5


def test_train_param_groups_decay_weights_only():
    model = mitr.MITr(mitr.VARIANTS["tiny"], 5)
    decay, no_decay = train.param_groups(model, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    dn = {names[id(p)] for p in decay["params"]}
    nn_ = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0
    assert "head.weight" in dn and "patch_embed.proj.weight" in dn
    assert "object_token" in nn_ and "norm.weight" in nn_ and "patch_embed.proj.bias" in nn_
    assert any("relative_position_bias_table" in n for n in nn_)
    assert not any(
        "relative_position_bias_table" in n or n.endswith(".bias") or "norm" in n for n in dn
    )
    assert len(dn) + len(nn_) == len(names)


def test_train_ema_update_moves_towards_model():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.no_grad():
        a.weight.fill_(0.0)
        b.weight.fill_(1.0)
    train.ema_update(a, b, 0.9)  # 0.9 * 0 + 0.1 * 1
    assert torch.allclose(a.weight, torch.full((2, 2), 0.1))


@pytest.mark.parametrize("layout", ["csv", "cvat"])
def test_train_own_data_trains_evaluates_and_predicts(tmp_path, layout):
    """Both layouts of your own data (README, "Your own data"): a run of one step, --eval-only on
    its checkpoint, and predict over the image folder writing one CSV row per image."""
    if layout == "csv":
        _data_csv_fixture(str(tmp_path))
        flags = ["--data", "csv", "--data-dir", tmp_path]
        images, classes = tmp_path / "photos", ["bird", "cat", "dog"]
    else:
        files = _data_cvat_export(str(tmp_path))
        flags = ["--data", "coco", "--train-json", files.train_json, "--train-images"]
        flags += [
            files.train_images,
            "--val-json",
            files.val_json,
            "--val-images",
            files.val_images,
        ]
        images, classes = tmp_path / "cvat" / "images", ["cat", "dog", "bird"]
    common = [*flags, "--variant", "tiny", "--img-size", "96", "--randaug", "2", "9", *_TRAIN_TINY]
    with contextlib.redirect_stdout(None):
        train.main(
            [str(a) for a in [*common, "--epochs", "1", "--batch-size", "2"]]
            + ["--out", str(tmp_path / "run")]
        )
        reports = train.main(
            [
                str(a)
                for a in [
                    *flags,
                    "--resume",
                    tmp_path / "run" / "last.pt",
                    "--eval-only",
                    *_TRAIN_TINY,
                ]
            ]
        )
    assert set(reports) == {"model", "ema"} and len(reports["model"]["AP_per_class"]) == 3
    out = tmp_path / "labels.csv"
    argv = [
        "predict",
        "--checkpoint",
        tmp_path / "run" / "best.pt",
        images,
        "--out",
        out,
        "--workers",
        "0",
    ]
    with contextlib.redirect_stdout(None):
        train.main([str(a) for a in argv])
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "labels", "count", *classes]
    assert len(rows) - 1 == len(data.list_images([images]))


def _train_adam_step(cfg, images, targets, objective):
    """The weights (flat) of a fresh tiny model after one Adam step on one batch: "ours" through
    train.py's accumulate_gradients (micro-batches of cfg.batch_size / cfg.accum_steps); "sum"
    and "mean" with Eq. 18 reduced by hand, as ASL's code (sum) or as the logged value (mean)."""
    model = train.build_model(cfg, targets.shape[1])
    optimizer = torch.optim.Adam(train.param_groups(model, cfg.weight_decay), lr=cfg.lr)
    optimizer.zero_grad()
    if objective == "ours":
        micro = cfg.batch_size // cfg.accum_steps
        batches = list(zip(images.split(micro), targets.split(micro), strict=True))
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        train.accumulate_gradients(model, scaler, batches, cfg, torch.device("cpu"), None)
    else:
        class_logits, count_logits = model(images)
        L = asymmetric_loss(class_logits, targets) + object_token_loss(count_logits, targets)
        (L.sum() if objective == "sum" else L.mean()).backward()  # Eq. (18) per image
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    optimizer.step()
    return grads, torch.cat([p.detach().flatten() for p in model.parameters()])


def test_train_one_adam_step_equals_asls():
    """Eq. 18 summed over the batch, as ASL's training script sums it, with Adam's coupled L2 decay
    (1e-4) on the same groups: one step of train.py's set-up equals one of ASL's. The batch mean,
    the value train.py logs, would not: its data gradient is B times smaller against the decay."""
    torch.manual_seed(0)
    images = torch.randn(8, 3, 96, 96)
    targets = (torch.rand(8, 12) < 0.3).float()
    cfg = train.TrainConfig(variant="tiny", img_size=96, batch_size=8)
    _, ours = _train_adam_step(cfg, images, targets, "ours")
    _, asl = _train_adam_step(cfg, images, targets, "sum")
    _, mean = _train_adam_step(cfg, images, targets, "mean")
    torch.testing.assert_close(ours, asl, rtol=0, atol=1e-7)
    assert (mean - asl).abs().max() > 100 * cfg.lr / 1e4  # measured: 2e-4, twice the lr


def test_train_accum_steps_equal_one_big_batch():
    """--accum-steps 2 at micro-batch 32 takes the step of one batch of 64: the same gradient and,
    after Adam's step, the same weights, to float tolerance."""
    torch.manual_seed(0)
    images = torch.randn(64, 3, 96, 96)
    targets = (torch.rand(64, 12) < 0.3).float()
    one = train.TrainConfig(variant="tiny", img_size=96, batch_size=64)
    two = dataclasses.replace(one, accum_steps=2)
    grad_one, weights_one = _train_adam_step(one, images, targets, "ours")
    grad_two, weights_two = _train_adam_step(two, images, targets, "ours")
    torch.testing.assert_close(grad_two, grad_one, rtol=1e-4, atol=1e-5 * grad_one.abs().max())
    torch.testing.assert_close(weights_two, weights_one, rtol=0, atol=0.2 * one.lr)
    cfg, _ = train.parse_args(["--accum-steps", "2", "--grad-checkpoint", "--no-cross-window"])
    config = train.model_config(cfg)
    assert cfg.accum_steps == 2 and config.grad_checkpoint and not config.cross_window


def test_train_decode_labels_threshold_and_top_z():
    """Threshold decoding compares logits with the probability's logit (>=; 0 takes every label);
    count decoding takes the z labels of highest logit, z the count head's argmax (Eq. 17)."""
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0], [1.0, 2.0, 3.0]])
    counts = torch.tensor([[0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 0.0, 9.0], [7.0, 0.0, 0.0, 0.0]])
    top_z = train.decode_labels(logits, counts, "count", None)
    assert top_z.tolist() == [[True, False, True], [True, True, True], [False, False, False]]
    one = train.decode_labels(logits, None, "threshold", 0.6)  # logit 0.405
    assert one.tolist() == [[True, False, True], [False, True, False], [True, True, True]]
    per_class = train.decode_labels(logits, None, "threshold", [0.9, 0.5, 0.01])  # 2.2, 0, -4.6
    assert per_class.tolist() == [[False, False, True], [False, True, True], [False, True, True]]
    assert train.decode_labels(torch.tensor([[0.0, -50.0]]), None, "threshold", [0.5, 0.0]).all()


@pytest.mark.slow
def test_train_ddp_two_cpu_processes(tmp_path):
    """torchrun with 2 gloo processes: trains, and evaluation gathers exactly len(val) rows (25 is
    odd, so one rank pads) in dataset order, i.e. the metrics equal a 1-process evaluation. A bad
    training image on rank 1 only: rank 1 says so in one line with its rank and exits 2, rank 0 says
    in one line that another process failed; no traceback of theirs (torchrun adds its own)."""
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ddp += [os.path.join(_TRAIN_REPO, "train.py")]
    out = tmp_path / "ddp"
    good = [*ddp, "--num-train", "64", "--num-val", "25", "--batch-size", "16", "--epochs", "1"]
    # rank 1's first image of epoch 1 is not an image (DistributedSampler's order, seed 0)
    first_of_rank1 = list(torch.utils.data.DistributedSampler(range(8), 2, 1, seed=0))[0]
    bad = f"img/train{first_of_rank1}.png"
    root = _train_csv(tmp_path / "set", 8, 4, bad=[bad])
    failing = [*ddp, "--data", "csv", "--data-dir", root, "--variant", "tiny", "--img-size", "96"]
    failing += ["--batch-size", "4", "--out", tmp_path / "failing", *_TRAIN_TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [str(a) for a in cmd],
            cwd=_TRAIN_REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for cmd in ([*good, "--out", out, *_TRAIN_TINY], failing)
    ]
    results = [p.communicate(timeout=180) for p in procs]
    assert procs[0].returncode == 0, results[0][1][-2000:]
    stdout = results[0][0]
    assert stdout.count("epoch 1 val model") == 1  # only rank 0 prints
    log = _train_log(out)
    assert log[0]["world_size"] == 2
    ep = [r for r in log if r["kind"] == "epoch"]
    assert len(ep) == 1 and ep[0]["val_rows"] == 25 and ep[0]["step"] == 4  # 64 / 16 steps
    single = train.main(["--resume", str(out / "last.pt"), "--eval-only", *_TRAIN_TINY])
    for name in ("model", "ema"):
        assert single[name]["mAP"] == pytest.approx(ep[0][name]["mAP"], abs=1e-4)
        assert single[name]["OF1"] == pytest.approx(ep[0][name]["OF1"], abs=1e-4)
    err = results[1][1]
    ours = [line for line in err.splitlines() if line.startswith("train.py")]
    assert procs[1].returncode != 0 and len(ours) == 2, err[-3000:]
    assert ours[0].startswith("train.py (rank 1): error: ") and bad in ours[0]
    assert ours[1].startswith("train.py (rank 0): error: another process of the job failed")
    assert "[rank0]" not in err and "[rank1]" not in err  # torch's prefix of a rank's traceback
    assert "exitcode: 2" in err


def _train_coco(root, bad=None):
    """A tiny COCO 2014 folder in the real layout: 8 train and 4 val JPEGs, 3 categories; the
    image named `bad` is not a JPEG."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        os.makedirs(root / f"{split}2014", exist_ok=True)
        images, anns = [], []
        for i in range(n):
            name = f"COCO_{split}2014_{i:012d}.jpg"
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
                root / f"{split}2014" / name
            )
            if name == bad:
                (root / f"{split}2014" / name).write_bytes(b"\xff\xd8 not really a jpeg")
            images.append({"id": i + 1, "file_name": name, "width": 48, "height": 40})
            anns.append(
                {
                    "id": i + 1,
                    "image_id": i + 1,
                    "category_id": 1 + i % 3,
                    "area": 300.0,
                    "bbox": [1, 1, 20, 15],
                    "iscrowd": 0,
                }
            )
        os.makedirs(root / "annotations", exist_ok=True)
        with open(root / "annotations" / f"instances_{split}2014.json", "w") as f:
            json.dump(
                {
                    "images": images,
                    "annotations": anns,
                    "categories": [
                        {"id": c, "name": f"class{c}", "supercategory": "x"} for c in (1, 2, 3)
                    ],
                },
                f,
            )


@pytest.mark.slow
def test_train_worker_errors_are_the_same_one_line(tmp_path, monkeypatch, capsys):
    """A corrupt training image: the same one line with --workers 2 as with --workers 0 (not the
    DataLoader's re-raised traceback). A corrupt validation image stops the run before training.
    A stop after an epoch names the command that continues it, --data-dir included, and it works."""
    _train_coco(tmp_path / "coco", bad="COCO_train2014_000000000005.jpg")
    coco = ["--data", "coco", "--variant", "tiny", "--img-size", "96", "--batch-size", "4"]
    coco += ["--device", "cpu"]
    errs = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        argv = [*coco, "--data-dir", tmp_path / "coco", "--epochs", "1", "--workers", workers]
        code, err = _train_exit([*argv, "--out", out], capsys)
        _train_check_error("COCO_train2014_000000000005.jpg", err, code)
        errs.append(err.replace(str(out), "OUT"))
    assert errs[0] == errs[1]
    _train_coco(tmp_path / "coco2", bad="COCO_val2014_000000000002.jpg")
    argv = [*coco, "--data-dir", tmp_path / "coco2", "--workers", "0", "--out", tmp_path / "v"]
    code, err = _train_exit(argv, capsys)
    _train_check_error("COCO_val2014_000000000002.jpg", err, code)
    assert not os.path.exists(tmp_path / "v")  # stopped before the run folder was made
    _train_coco(tmp_path / "coco3")
    _train_losses_failing_at(monkeypatch, 3, KeyboardInterrupt)  # 2 steps per epoch: epoch 2
    argv = [*coco, "--data-dir", tmp_path / "coco3", "--epochs", "2", "--workers", "0"]
    code, err = _train_exit([*argv, "--out", tmp_path / "stopped"], capsys)
    monkeypatch.undo()
    last = tmp_path / "stopped" / "last.pt"
    hint = f"python train.py --resume {last} --data-dir {tmp_path / 'coco3'}"
    assert code == 130 and err.rstrip().endswith(hint), err
    rest = ["--workers", "0", "--device", "cpu", "--out", tmp_path / "continued"]
    train.main([str(a) for a in [*hint.split()[2:], *rest]])
    assert _train_log(tmp_path / "continued")[-1]["epoch"] == 2


def _train_bad_cases(run, tmp_path):
    """{expected message: argv} for every bad input (files made in tmp_path)."""
    ck = torch.load(run / "last.pt", weights_only=True)
    reordered = [*ck["classes"][1:], ck["classes"][0]]
    torch.save(dict(ck, classes=reordered), tmp_path / "reordered.pt")
    torch.save(dict(ck, epoch=1, step=40), tmp_path / "half.pt")
    torch.save({k: v for k, v in ck.items() if k != "optimizer"}, tmp_path / "noopt.pt")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    (tmp_path / "notackpt.pt").write_bytes(b"hello")
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    os.mkfifo(tmp_path / "fifo.pt")
    last = run / "last.pt"
    eval_init = ["--eval-only", "--num-val", "4"]
    return {
        "unrecognized arguments: --bogus": ["--bogus"],
        "invalid choice: 'xl'": ["--variant", "xl"],
        "invalid int value": ["--epochs", "ten"],
        "--epochs 0 must be in [1, 100000]": ["--epochs", "0"],
        "--epochs 99999999999999999999999 must be in": ["--epochs", "99999999999999999999999"],
        "--workers 1000000000000 must be in [0, 256]": ["--workers", "1000000000000"],
        "--num-train -1 must be in [0, 1000000000]": ["--num-train", "-1"],
        "--seed -1 must be in [0, 4294967296)": ["--seed", "-1"],
        "--lr nan must be in (0, 1]": ["--lr", "nan"],
        "--lr inf must be in (0, 1]": ["--lr", "inf"],
        "--lr 1e+39 must be in (0, 1]": ["--lr", "1e39"],
        "--weight-decay 1e+300 must be in [0, 1]": ["--weight-decay", "1e300"],
        "--threshold 1.5 must be in (0, 1)": ["--threshold", "1.5"],
        "--cutout 2.0 must be in [0, 1]": ["--cutout", "2"],
        "--randaug [-1, 9] must be in": ["--randaug", "-1", "9"],
        "--randaug [2, 31] must be in": ["--randaug", "2", "31"],
        "--randaug [100000000, 9] must be in [0, 16]": ["--randaug", str(10**8), "9"],
        "--ema-decay 1.0 must be in [0, 1)": ["--ema-decay", "1"],
        "--img-size 3840 does not fit": ["--img-size", "3840"],
        "--img-size 100 does not fit": ["--img-size", "100"],
        "--img-size -96 does not fit": ["--img-size", "-96"],
        "make it divisible by 1 process(es) x --accum-steps 3": ["--accum-steps", "3"],
        "--decode count reads the object token": ["--decode", "count", "--no-object-token"],
        "go together": ["--data", "coco", "--train-json", tmp_path / "afile"],
        "shapes generates --num-train 0": ["--num-train", "0"],
        "COCO annotation file not found": ["--data", "coco", "--data-dir", tmp_path / "empty"],
        "VOC": ["--data", "voc", "--data-dir", tmp_path / "empty"],
        "--data-dir": ["--data", "nuswide"],
        "--variant s differs from checkpoint": ["--resume", last, "--variant", "s"],
        "--lr 1.0 differs from checkpoint": ["--resume", last, "--lr", "1"],
        "--no-shift differs from checkpoint": ["--resume", last, "--no-shift"],
        f"{last} has finished its 2 epochs": ["--resume", last],
        "classes in another order (column 0: 'ring' there, 'circle' here)": [
            "--resume",
            tmp_path / "reordered.pt",
            "--eval-only",
        ],
        "took 40 steps in 1 epochs, this data makes 48 per": ["--resume", tmp_path / "half.pt"],
        "lacks optimizer": ["--resume", tmp_path / "noopt.pt"],
        "cannot read checkpoint": ["--resume", tmp_path / "notackpt.pt"],
        "is a fifo (named pipe), not a regular file": ["--resume", tmp_path / "fifo.pt"],
        "--init " + str(tmp_path / "fifo.pt") + " is a fifo": ["--init", tmp_path / "fifo.pt"],
        "already exists": ["--out", tmp_path / "empty", "--num-val", "4"],
        "--out '' is empty": ["--out", "", "--num-val", "4"],
        "cannot write --out": ["--out", tmp_path / "afile" / "run", "--num-val", "4"],
        "cannot read --init": ["--init", tmp_path / "notackpt.pt", *eval_init],
        "--init " + str(tmp_path / "list.pth"): ["--init", tmp_path / "list.pth", *eval_init],
        "--init not found: " + str(tmp_path) + "/new\\nline.pth": [
            "--init",
            tmp_path / "new\nline.pth",
            *eval_init,
        ],
        "--eval-only needs a model": ["--eval-only"],
        "no CUDA device": ["--device", "cuda"],
    }


@pytest.mark.slow
def test_train_bad_inputs_one_line_exit_2(_train_run, tmp_path, capsys):
    """Each bad input: one line on stderr saying what to do, exit code 2, no traceback, no run
    folder, and no file already on disk changed. Three run as real subprocesses (concurrently:
    each is mostly `import torch`), the others through train.main in this process (the same code
    up to the exit)."""
    stamp = {f: os.stat(_train_run / f).st_mtime_ns for f in os.listdir(_train_run)}
    cases = _train_bad_cases(_train_run, tmp_path)
    if torch.cuda.is_available():
        del cases["no CUDA device"]
    sub = [
        "unrecognized arguments: --bogus",
        "COCO annotation file not found",
        "--lr 1.0 differs from checkpoint",
    ]
    procs = {msg: _train_cli(*cases.pop(msg), wait=False) for msg in sub}
    os.chdir(tmp_path)  # a default run folder would land in tmp_path/runs
    try:
        for msg, args in cases.items():
            code, err = _train_exit(args, capsys)
            _train_check_error(msg, err, code)
    finally:
        os.chdir(_TRAIN_REPO)
    assert not os.path.exists(tmp_path / "runs")
    for msg, p in procs.items():
        out, err = p.communicate(timeout=120)
        _train_check_error(msg, err, p.returncode)
    assert {f: os.stat(_train_run / f).st_mtime_ns for f in os.listdir(_train_run)} == stamp


def test_train_tampered_checkpoints_are_one_line(_train_run, tmp_path, monkeypatch, capsys):
    """A checkpoint that torch.load(weights_only=True) accepts but whose contents do not fit: one
    line naming the field, before anything is built or written. Values that would hang (a side of
    3840, RandAugment's N of 1e8) are refused by the same ranges as the command line's."""
    ck = torch.load(_train_run / "last.pt", weights_only=True)
    opt = ck["optimizer"]

    def args(**changes):
        return dict(ck, args={**ck["args"], **changes})

    extra_group = {**opt, "param_groups": [*opt["param_groups"], opt["param_groups"][0]]}
    state = {**opt["state"], 0: {**opt["state"][0], "exp_avg": torch.zeros(3)}}
    cases = {
        "args is [1, 2] (a list), not a dict of settings": dict(ck, args=[1, 2]),
        "args is None (a NoneType)": dict(ck, args=None),
        "--variant 'xl': choose one of": args(variant="xl"),
        "args epochs is '3' (a str), not int": args(epochs="3"),
        "args epochs is 2.5 (a float), not int": args(epochs=2.5),
        "args img_size is '96' (a str)": args(img_size="96"),
        "args randaug is 5 (a int)": args(randaug=5),
        "args lr is a Tensor": args(lr=torch.tensor(1e-3)),
        "--img-size 3840 does not fit": args(img_size=3840),
        "--randaug [100000000, 9] must be in": args(randaug=[10**8, 9]),
        "classes is 5 (a int), not a list of class names": dict(ck, classes=5),
        "classes names a class twice": dict(ck, classes=["circle"] * 12),
        "epoch is -2 (a int), not an integer in [1, 2]": dict(ck, epoch=-2),
        "epoch is 1.5 (a float)": dict(ck, epoch=1.5),
        "epoch is '1' (a str)": dict(ck, epoch="1"),
        "best_of is 'nope' (a str)": dict(ck, best_of="nope"),
        "thresholds is": dict(ck, thresholds={"overall": 2.0, "per_class": []}),
        "model is None": dict(ck, model=None),
        "ema is [1] (a list), not a state dict": dict(ck, ema=[1]),
        "model head.weight is a Tensor of shape (13, 256)": dict(
            ck, model={**ck["model"], "head.weight": torch.zeros(13, 256)}
        ),
        "optimizer is None": dict(ck, optimizer=None),
        "optimizer is [] (a list)": dict(ck, optimizer=[]),
        "the model needs 2 groups": dict(ck, optimizer=extra_group),
        "exp_avg is not a tensor of shape": dict(ck, optimizer={**opt, "state": state}),
        "lacks thresholds": {k: v for k, v in ck.items() if k != "thresholds"},
    }
    (tmp_path / "tampered.pt").write_bytes(b"")  # a regular file; torch.load returns the case
    for message, tampered in cases.items():
        monkeypatch.setattr(train.torch, "load", lambda *a, tampered=tampered, **k: tampered)
        code, err = _train_exit(["--resume", tmp_path / "tampered.pt", *_TRAIN_TINY], capsys)
        _train_check_error(message, err, code)
        assert f"checkpoint {tmp_path / 'tampered.pt'}" in err
    assert os.listdir(tmp_path) == ["tampered.pt"]


def test_train_resume_takes_the_checkpoints_settings(_train_run, tmp_path, capsys):
    """A resumed run keeps the checkpoint's settings; RESUME_FLAGS (where and how it runs) may
    differ, others only if equal to the checkpoint's. The command line is TrainConfig's fields, a
    bool one as --X / --no-X."""
    code, err = _train_exit(["--resume", _train_run / "last.pt", "--lr", "1"], capsys)
    assert code == 2 and "--lr 1.0 differs" in err
    args, ck = train.parse_args(
        [
            "--workers",
            "3",
            "--accum-steps",
            "2",
            "--grad-checkpoint",
            "--resume",
            str(_train_run / "last.pt"),
            "--eval-only",
            "--lr",
            "1e-3",
            "--shift",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert (args.workers, args.accum_steps, args.grad_checkpoint) == (3, 2, True)
    assert args.lr == 1e-3 and args.num_train == 768 and args.out == str(tmp_path / "x")
    assert args.data_dir is None  # the data's paths come from the command line, not the checkpoint
    args, _ = train.parse_args(["--data", "coco", "--data-dir", "d"])
    assert (args.variant, args.lr, args.img_size, args.ema_decay) == ("s", 1e-4, 224, 0.9997)
    assert (args.epochs, args.batch_size, args.randaug, args.cutout) == (200, 128, [2, 9], 0.5)
    args, _ = train.parse_args(["--no-cross-window", "--no-object-token", "--decode", "threshold"])
    assert not args.cross_window and not args.object_token and args.variant == "tiny"
    assert {f.name for f in dataclasses.fields(train.TrainConfig)} <= set(train.HELP)


def test_train_init_from_swin(tmp_path, capsys):
    """--init loads Swin weights through mitr.load_swin and prints its report; a checkpoint with a
    key that has no place stops (exit 2) unless --init-nonstrict; a malformed bias table (rows not
    a square, 1-D, no rows, 3-D) is one line, with --init-nonstrict too."""
    donor = mitr.MITr(mitr.VARIANTS["tiny"], 12, seed=123)
    sd = _swin_from_mitr(donor)
    torch.save({"model": sd}, tmp_path / "swin.pth")
    torch.save({"model": {**sd, "layers.7.blocks.0.extra": torch.zeros(2)}}, tmp_path / "odd.pth")
    tiny = ["--num-val", "4", "--eval-only", *_TRAIN_TINY]
    train.main(["--init", str(tmp_path / "swin.pth"), *tiny])
    expected = mitr.format_swin_report(
        mitr.load_swin(mitr.MITr(mitr.VARIANTS["tiny"], 12), {"model": sd})
    )
    assert expected in capsys.readouterr().out
    code, err = _train_exit(["--init", tmp_path / "odd.pth", *tiny], capsys)
    assert code == 2 and err.count("\n") == 1 and "--init" in err
    train.main(["--init", str(tmp_path / "odd.pth"), "--init-nonstrict", *tiny])
    # the weights really arrive: a model built the way train.py builds it, then loaded
    cfg, _ = train.parse_args(["--init", str(tmp_path / "swin.pth"), *tiny])
    got = train.build_models(cfg, None, 12, torch.device("cpu"))["model"].state_dict()
    want = donor.state_dict()
    shared = [
        k
        for k in want
        if k in got
        and "cross_window" not in k
        and not k.startswith(("head", "object_token", "count_head"))
    ]
    assert shared and all(torch.equal(got[k], want[k]) for k in shared)
    key = next(k for k in sd if k.endswith("relative_position_bias_table"))
    rows, heads = sd[key].shape
    for table in (torch.zeros(rows - 1, heads), torch.zeros(rows), torch.zeros(0, heads)):
        torch.save({"model": {**sd, key: table}}, tmp_path / "bad.pth")
        for strict in ([], ["--init-nonstrict"]):
            code, err = _train_exit(["--init", tmp_path / "bad.pth", *strict, *tiny], capsys)
            _train_check_error("--init", err, code)
    torch.save({"model": {**sd, key: torch.zeros(rows, heads, 1)}}, tmp_path / "bad.pth")
    code, err = _train_exit(["--init", tmp_path / "bad.pth", "--init-nonstrict", *tiny], capsys)
    _train_check_error("--init", err, code)


def test_train_killed_dataloader_worker_is_one_line(tmp_path, monkeypatch, capsys):
    """A DataLoader worker killed by SIGKILL, as the out-of-memory killer does: one line with a
    hint, exit 2, and the line names the last good checkpoint."""
    main_process = os.getpid()
    real = data.Shapes.__getitem__

    def getitem(self, i):  # in epoch 2, in a worker
        if os.getpid() != main_process and self.epoch == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, i)

    monkeypatch.setattr(data.Shapes, "__getitem__", getitem)
    argv = ["--num-train", "16", "--num-val", "4", "--batch-size", "8", "--epochs", "2"]
    argv += ["--workers", "1", "--device", "cpu", "--out", tmp_path / "run"]
    code, err = _train_exit(argv, capsys)
    _train_check_error("a DataLoader worker died (DataLoader worker (pid", err, code)
    assert "use fewer --workers" in err and f"--resume {tmp_path / 'run' / 'last.pt'}" in err


def test_train_second_ctrl_c_during_cleanup_is_one_line(tmp_path):
    """Ctrl-C, and a second one while the DataLoader's workers are being shut down: one line,
    exit 130 (not -2, not the workers' "Exception ignored" lines)."""

    def two_interrupts():
        iterator = torch.utils.data.dataloader._MultiProcessingDataLoaderIter
        shutdown, loss, calls = iterator._shutdown_workers, train.mitr_loss, [0]

        def interrupted_shutdown(self):
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C
            shutdown(self)

        def interrupting_loss(*a, **k):
            calls[0] += 1
            if calls[0] == 2:
                os.kill(os.getpid(), signal.SIGINT)  # the first
            return loss(*a, **k)

        iterator._shutdown_workers = interrupted_shutdown
        train.mitr_loss = interrupting_loss

    argv = ["--num-train", "32", "--num-val", "4", "--batch-size", "8", "--epochs", "1"]
    argv += ["--workers", "1", "--device", "cpu", "--out", tmp_path / "run"]
    pid = _train_fork(argv, setup=two_interrupts, stderr=tmp_path / "stderr.txt")
    assert _train_wait(pid) == 130
    err = (tmp_path / "stderr.txt").read_text()
    assert err.count("\n") == 1 and err.startswith("train.py: interrupted; no epoch finished"), err


# --- train.py predict, and samples.png


@pytest.fixture(scope="module")
def _predict_runs(tmp_path_factory):
    """Two 1-step runs on 8 Shapes images, with the object token ("token") and without ("plain")."""
    root = tmp_path_factory.mktemp("predict")
    tiny = ["--epochs", "1", "--num-train", "8", "--num-val", "8", "--batch-size", "8"]
    train.main([*tiny, *_TRAIN_TINY, "--out", str(root / "token")])
    train.main([*tiny, *_TRAIN_TINY, "--no-object-token", "--out", str(root / "plain")])
    return root


def _predict_images(folder, n, bad=()):
    """n Shapes images as PNGs in two subfolders of `folder`, a corrupt PNG for each name in bad
    and a text file -> the images' paths, sorted (data.list_images' order)."""
    shapes = data.Shapes(n)
    paths = []
    for i in range(n):
        path = folder / f"part{i % 2}" / f"img{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        shapes.image(i).save(path)
        paths.append(str(path))
    for name in bad:
        (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (folder / "notes.txt").write_text("not an image")
    return sorted(paths)


def _predict_reference(checkpoint, paths):
    """The checkpoint's model on the images, in one batch -> (ck, class logits, count logits)."""
    ck = train.load_checkpoint(checkpoint)
    model = train.build_model(train.TrainConfig(**ck["args"]), len(ck["classes"]))
    model.load_state_dict(ck[ck["best_of"]])
    transform = data.build_transform(96, train=False)
    with torch.no_grad():
        class_logits, count_logits = model.eval()(
            torch.stack([transform(data.load_image(p)) for p in paths])
        )
    return ck, class_logits, count_logits


def test_predict_folder_to_csv_is_the_model_and_names_a_bad_file(_predict_runs, tmp_path, capsys):
    """A folder (recursive) with one corrupt PNG, at batch 16: one CSV row per good image in
    list_images' order, equal to the model run directly; labels at the checkpoint's per-class
    thresholds, most probable first; the bad file is one line, then exit code 2."""
    paths = _predict_images(tmp_path / "in", 40, bad=["bad.png"])
    out = tmp_path / "out" / "pred.csv"
    out.parent.mkdir()
    checkpoint = _predict_runs / "token" / "best.pt"
    argv = ["predict", "--checkpoint", checkpoint, tmp_path / "in", "--out", out]
    code, err = _train_exit([*argv, "--batch-size", "16", *_TRAIN_TINY], capsys)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 2, err
    assert lines[0].startswith("train.py: skipped: ") and "bad.png" in lines[0]
    assert lines[1].startswith("train.py: error: 1 of 41 images skipped") and str(out) in lines[1]
    assert os.listdir(out.parent) == ["pred.csv"]  # its temporary file renamed
    rows = [line.split(",") for line in out.read_text().splitlines()]  # no commas in the names
    ck, class_logits, count_logits = _predict_reference(checkpoint, paths)
    assert rows[0] == ["image", "labels", "count", *ck["classes"]]
    assert [r[0] for r in rows[1:]] == paths
    probabilities = np.array([[float(q) for q in r[3:]] for r in rows[1:]])
    np.testing.assert_allclose(probabilities, torch.sigmoid(class_logits).numpy(), atol=2e-6)
    cut = train.metrics.logit(ck["thresholds"]["per_class"])  # (K,)
    for row, logits in zip(rows[1:], class_logits.double().numpy(), strict=True):
        order = np.argsort(-logits, kind="stable")
        assert row[1].split() == [ck["classes"][j] for j in order if logits[j] >= cut[j]]
    assert [int(r[2]) for r in rows[1:]] == count_logits.argmax(-1).tolist()


def test_predict_count_decode_jsonl_and_stdout(_predict_runs, tmp_path, capsys):
    """--decode count: each image's labels are its `count` most probable classes (Eq. 17), here
    in JSONL; without --out a line per image on stdout (--threshold 0: every class). A model
    without the object token cannot count: one line."""
    paths = _predict_images(tmp_path / "in", 6)
    base = ["predict", "--checkpoint", _predict_runs / "token" / "best.pt", *_TRAIN_TINY]
    out = tmp_path / "pred.jsonl"
    assert train.main([*base, "--decode", "count", "--out", out, *paths]) == 6
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in records] == paths
    for r in records:
        assert list(r["probabilities"]) == data.SHAPE_CLASSES
        top = sorted(r["probabilities"], key=r["probabilities"].get, reverse=True)
        assert 0 <= r["count"] <= len(top) and r["labels"] == top[: r["count"]]
    capsys.readouterr()
    assert train.main([*base, "--threshold", "0", *paths]) == 6
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == paths
    for line, r in zip(lines, records, strict=True):
        assert line.count(", ") == len(data.SHAPE_CLASSES) - 1
        assert line.endswith(f" | count {r['count']}")
    plain = ["predict", "--checkpoint", _predict_runs / "plain" / "best.pt", *paths]
    code, err = _train_exit([*plain, "--decode", "count"], capsys)
    _train_check_error("trained without it (--no-object-token)", err, code)


def test_predict_refuses_before_work_and_never_leaves_half_a_file(
    _predict_runs, tmp_path, capsys, monkeypatch
):
    """An existing --out is refused and kept as it was; bad flags: one line each. Ctrl-C in the
    middle of writing leaves neither --out nor its temporary file."""
    paths = _predict_images(tmp_path / "in", 20)
    base = ["predict", "--checkpoint", _predict_runs / "token" / "best.pt", *_TRAIN_TINY, *paths]
    (tmp_path / "old.csv").write_text("kept")
    cases = {
        "already exists": ["--out", tmp_path / "old.csv"],
        "name a .csv or .jsonl file": ["--out", tmp_path / "pred.txt"],
        "--batch-size 0 must be in": ["--batch-size", "0"],
        "--threshold 1.5 must be in": ["--threshold", "1.5"],
        "--threshold applies to --decode threshold": ["--threshold", "0.5", "--decode", "count"],
    }
    for msg, extra in cases.items():
        code, err = _train_exit([*base, *extra], capsys)
        _train_check_error(msg, err, code)
    assert (tmp_path / "old.csv").read_text() == "kept"
    real = train.decode_labels
    batches = []

    def decode_then_stop(*args):
        batches.append(1)
        if len(batches) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train, "decode_labels", decode_then_stop)
    code, err = _train_exit([*base, "--batch-size", "8", "--out", tmp_path / "new.csv"], capsys)
    assert code == 130 and "interrupted" in err and len(batches) == 2
    assert sorted(os.listdir(tmp_path)) == ["in", "old.csv"]


def test_predict_draw_samples_colours_and_size(tmp_path):
    """16 images of 96 px, shown at 192 px: a PNG of the layout's size; each picture is its image
    de-normalised; under it right labels in green, wrong in red, missed in grey and struck
    through. 5 images: 2 rows."""
    classes = ["circle", "square", "star"]
    images = torch.stack([data.to_tensor(Image.new("RGB", (96, 96), (200, 40, 220)))] * 16)
    targets = torch.zeros(16, 3)
    predicted = torch.zeros(16, 3, dtype=torch.bool)
    targets[0, 0] = 1  # right
    predicted[0, 0] = True
    predicted[1, 1] = True  # wrong
    targets[2, 2] = 1  # missed
    path = tmp_path / "samples.png"
    train.draw_samples(images, targets, predicted, classes, path)
    assert os.listdir(tmp_path) == ["samples.png"]  # its temporary file renamed
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    pad, line_h, side = 8, 15, 192  # as draw_samples lays it out
    cell_w = side + pad
    cell_h = side + 2 * pad + 2 * line_h  # two lines of labels each
    assert img.shape == (pad + line_h + 4 * cell_h, 4 * cell_w + pad, 3)

    def part(i, what):
        left = pad + i % 4 * cell_w
        top = pad + line_h + i // 4 * cell_h
        if what == "image":
            return img[top : top + side, left : left + side]
        return img[top + side : top + cell_h - pad, left : left + side]  # its labels

    def shows(region, kind):  # green or red text; for grey, the line striking a missed label
        tolerance = 0 if kind == "missed" else 40
        return (np.abs(region - train.SAMPLE_COLOURS[kind]).max(-1) <= tolerance).sum() >= 10

    assert np.abs(part(5, "image") - (200, 40, 220)).max() <= 1
    shown = [[shows(part(i, "text"), k) for k in ("right", "wrong", "missed")] for i in range(4)]
    assert shown == [
        [True, False, False],  # image 0: a right label
        [False, True, False],  # 1: a wrong one
        [False, False, True],  # 2: a missed one
        [False, False, False],  # 3: none
    ]
    train.draw_samples(images[:5], targets[:5], predicted[:5], classes, path)  # replaces it
    assert Image.open(path).size == (4 * cell_w + pad, pad + line_h + 2 * cell_h)


# =============================================================================
# notebooks/: executed headlessly in fast mode

_NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parent / "notebooks"
_NOTEBOOKS_NAMES = [
    "01_tensor_shapes_through_the_hierarchy.ipynb",
    "02_cost_analysis.ipynb",
    "03_losses.ipynb",
    "04_train_measure_look.ipynb",
    "05_does_cross_window_attention_help.ipynb",
]


def _notebooks_load(name):
    with open(_NOTEBOOKS_DIR / name, encoding="utf-8") as f:
        return json.load(f)


def test_notebooks_all_present():
    found = sorted(p.name for p in _NOTEBOOKS_DIR.glob("*.ipynb"))
    assert found == sorted(_NOTEBOOKS_NAMES), (
        f"notebooks/ holds {found}, expected {_NOTEBOOKS_NAMES}"
    )


@pytest.mark.parametrize("name", _NOTEBOOKS_NAMES)
def test_notebooks_committed_with_outputs(name):
    """Readable on a code host without running: every code cell was executed, in order, without
    an error, and the file stays small (figures at low dpi)."""
    nb = _notebooks_load(name)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, f"{name} has no code cells"
    counts = [c.get("execution_count") for c in code]
    assert all(isinstance(n, int) for n in counts), f"{name}: some code cells were never executed"
    assert counts == sorted(counts), f"{name}: cells were executed out of order {counts}"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{name}: stored outputs contain an error: {errors[0].get('ename')}"
    assert sum(bool(c.get("outputs")) for c in code) >= len(code) // 2, (
        f"{name}: most cells have no output"
    )
    size = (_NOTEBOOKS_DIR / name).stat().st_size
    assert size < 600_000, (
        f"{name} is {size // 1000} KB; keep figures small (dpi ~80, JPEG for images)"
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", _NOTEBOOKS_NAMES)
def test_notebooks_execute_in_fast_mode(name, monkeypatch):
    """Run the notebook headlessly in notebooks/ (its working directory when opened in Jupyter);
    any cell error fails the test with that cell's traceback."""
    monkeypatch.setenv("MITR_NB_FAST", "1")  # the kernel inherits the environment
    nb = nbformat.read(str(_NOTEBOOKS_DIR / name), as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(_NOTEBOOKS_DIR)}},
    )
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]


# ---------------------------------------------------------------------------------------------
# Style: the field's formatting rules (pyproject.toml), checked by the same command as the tests


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]])
def test_style_ruff(command):
    """`ruff format --check` and `ruff check` (line length 100; rules E, W, F, B, I) pass on every
    Python file, so README's test command and .ci/run enforce them."""
    root = pathlib.Path(__file__).parent
    run = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "."], cwd=root, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
