"""The test suite: model (Section 3.1), losses and metrics (Section 3.2, 4.1), data, training,
pretrained loading, notebooks. Run: python -m pytest -q"""
import dataclasses
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import mitr
from mitr import MITr, VARIANTS

# =============================================================================
# mitr.py


def _model_tiny(**changes):
    torch.manual_seed(0)
    return MITr(dataclasses.replace(VARIANTS["tiny"], **changes), num_classes=5).eval()


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
        feats = model.forward_features(x)
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
    y[0, pixel[0] * W + pixel[1]] += 5.0 * torch.randn(x.shape[-1])   # not constant: LN removes that
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
    mask = mitr.shifted_window_mask(H, W, ws, 1)                  # (nW, N, N)
    windows = torch.randn(B * 4, ws * ws, C)
    token = torch.randn(B, 1, C)
    with torch.no_grad():
        out, tok = attn(windows, B, mask, token)
        # naive: each image, window and head on its own, the token appended to each window
        N, d = ws * ws, C // heads
        bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(N, N, heads)
        ref, ref_tok = torch.zeros_like(out), torch.zeros(B, 1, C)
        for b in range(B):
            for w in range(4):
                seq = torch.cat([windows[b * 4 + w], token[b]], 0)          # (N+1, C)
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
                tokens = torch.stack([x[b, i:i + ws, j:j + ws, c].reshape(-1)
                                      for i in range(0, H, ws) for j in range(0, W, ws)])
                q, k, v = cwa.qkv(tokens).chunk(3, -1)
                o = cwa.proj((q @ k.T / ws).softmax(-1) @ v)       # scale 1/sqrt(ws^2)
                for n, (i, j) in enumerate((i, j) for i in range(0, H, ws) for j in range(0, W, ws)):
                    ref[b, i:i + ws, j:j + ws, c] = o[n].view(ws, ws)
    assert torch.allclose(out, ref, atol=1e-5)


def test_model_space_to_depth_matches_swin_slices():
    torch.manual_seed(0)
    m = mitr.SpaceToDepth(4)
    x = torch.randn(2, 6, 8, 4)
    xs = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]   # Swin's order
    ref = m.reduction(m.norm(torch.cat(xs, -1).view(2, 12, 16)))
    assert torch.allclose(m(x.view(2, 48, 4), 6, 8), ref, atol=1e-6)


def test_model_gradients_reach_every_parameter():
    model = _model_tiny().train()
    logits, counts = model(torch.randn(2, 3, 96, 96))
    (logits.square().sum() + counts.square().sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_model_ablation_switches_remove_their_parts():
    full = _model_tiny()
    n_full = mitr.num_params(full)
    names = {n for n, _ in full.named_parameters()}
    assert any("relative_position_bias_table" in n for n in names)
    assert any("cross_window_blocks" in n for n in names)
    assert "object_token" in names and isinstance(full.head, mitr.ArcHead)

    no_pos = _model_tiny(pos_embed=False)
    tables = sum(p.numel() for n, p in full.named_parameters() if "relative_position_bias_table" in n)
    assert mitr.num_params(no_pos) == n_full - tables

    no_shift = _model_tiny(shift=False)
    assert mitr.num_params(no_shift) == n_full
    assert all(b.shift == 0 for s in no_shift.stages for b in s.pixel_blocks)
    assert sum(b.shift > 0 for s in full.stages for b in s.pixel_blocks) == 3   # stages 1-3
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert not torch.allclose(full(x)[0], no_shift(x)[0])   # same weights, different windows

    no_cwa = _model_tiny(cross_window=False)
    cwa = sum(mitr.num_params(s.cross_window_blocks) for s in full.stages)
    assert cwa > 0 and mitr.num_params(no_cwa) == n_full - cwa

    linear = _model_tiny(arc_sigmoid=False)
    assert isinstance(linear.head, torch.nn.Linear) and linear.head.bias is not None

    no_token = _model_tiny(object_token=False)
    assert no_token(x)[1] is None and no_token.object_token is None
    assert mitr.num_params(no_token) == n_full - 256 - (256 * 6 + 6)   # token + count head


def test_model_arc_head_is_scaled_cosine():
    torch.manual_seed(0)
    head = mitr.ArcHead(16, 3, s=8.0)
    x = torch.randn(5, 16)
    logits = head(x)
    cos = torch.stack([torch.stack([torch.dot(xi, wj) / (xi.norm() * wj.norm()) for wj in head.weight])
                       for xi in x])
    assert torch.allclose(logits, 8.0 * cos, atol=1e-5)
    assert logits.abs().max() <= 8.0 + 1e-5                     # "within [-s, s]"


def test_model_object_token_sees_the_image():
    model = _model_tiny()
    with torch.no_grad():
        a = model(torch.zeros(1, 3, 96, 96))[1]
        b = model(torch.randn(1, 3, 96, 96))[1]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("variant", ["s", "m", "l"])
def test_model_parameter_counts_match_table2(variant):
    with torch.device("meta"):                                   # counts only: no memory, no init
        model = MITr(VARIANTS[variant], num_classes=80)
    params = mitr.num_params(model) / 1e6
    assert abs(params - mitr.TABLE2_PARAMS_M[variant]) / mitr.TABLE2_PARAMS_M[variant] < 0.10


def test_model_pixel_path_is_swin():
    # Cross-window blocks and the object token off, a linear head for 1000 classes: MITr-s is
    # Swin-T (28,288,354 parameters, the relative_position_index buffers aside). MITr-m and -l are
    # Swin-S (49,606,258) and Swin-B (87,768,224) with ws 12 instead of 7: each block's bias table
    # grows from 13^2 to 23^2 rows per head, i.e. 360 * sum(depth * heads) parameters.
    published = {"s": 28_288_354,
                 "m": 49_606_258 + 360 * (2 * 3 + 2 * 6 + 18 * 12 + 2 * 24),
                 "l": 87_768_224 + 360 * (2 * 4 + 2 * 8 + 18 * 16 + 2 * 32)}
    for variant, n in published.items():
        cfg = dataclasses.replace(VARIANTS[variant], cross_window=False, object_token=False,
                                  arc_sigmoid=False)
        with torch.device("meta"):
            model = MITr(cfg, num_classes=1000)
        assert mitr.num_params(model) == n, variant


@pytest.mark.parametrize("variant", ["tiny", "s"])
def test_model_analytic_flops_match_counted(variant):
    model = MITr(VARIANTS[variant], num_classes=80)
    analytic = sum(mitr.analytic_flops(VARIANTS[variant], 80).values())
    counted = mitr.count_flops(model)["MITr"]
    # Eq. 7 and Eq. 9 count every matmul; norms, softmax, GELU and additions are left out by both.
    assert abs(analytic - counted) / counted < 0.01


def test_model_eq9_cross_window_cost_is_linear_in_channels():
    cfg = VARIANTS["s"]
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
        assert cost[C] == 4 * hw * ws * ws * C + 2 * hw * hw * C / (ws * ws)   # Eq. (9), corrected
    assert cost[192] == 2 * cost[96]
    assert mitr.num_params(mitr.CrossWindowAttention(7)) == 4 * 7 ** 4 + 4 * 7 ** 2   # Eq. (10): ws^4


def test_model_rejects_sizes_it_cannot_take():
    model = _model_tiny()
    with pytest.raises(ValueError, match="Sides that work: 96, 192"):
        model(torch.zeros(1, 3, 100, 100))
    model(torch.zeros(1, 3, 192, 96))                            # rectangular multiples work


def test_model_bf16_autocast_runs():
    model = _model_tiny()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, counts = model(torch.randn(2, 3, 96, 96))
    assert torch.isfinite(logits.float()).all() and torch.isfinite(counts.float()).all()


def test_model_cli_prints_the_stage_table():
    out = subprocess.run([sys.executable, "mitr.py", "--variant", "tiny"], capture_output=True,
                         text=True, check=True).stdout
    assert "stage4" in out and "GFLOPs(counted)" in out
