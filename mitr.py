"""MlTr, the Multi-label Transformer of Cheng et al., 2021, as one readable file. The paper spells
it MlTr (lower-case L); its extracted text, and this code, say MITr. Read it beside the paper:

    Table 1 ............ MITrConfig, VARIANTS
    Fig. 3(a), Eq. 1-2 . window_partition, PixelAttention, PixelBlock   (in-window attention, shift)
    Fig. 3(b), Eq. 3-4 . CrossWindowAttention, CrossWindowBlock        (windows are the tokens)
    Fig. 3 ............. Unit, the "MITr block": W-MSA -> cross-window -> SW-MSA
    Fig. 2 ............. PatchEmbed -> Stage x4 (SpaceToDepth between) -> object token -> heads
    Eq. 11, 13, 17 ..... the class head, linear or arc (arc_logits: s cos theta); the count head
    Table 5 ............ MITrConfig: pos_embed, shift, cross_window, arc_sigmoid, object_token
    Eq. 5-10 ........... analytic_flops; below the banner count_flops, summary (`python mitr.py`)
    Section 4.1 ........ load_swin: ImageNet-pretrained Swin into the pixel-attention path
    speed .............. bench  (`python mitr.py --bench --variant tiny`)

The block layout is the paper's silent part. One "block" of Table 1 is a Unit: a Swin block with
plain windows (W-MSA), a cross-window block, a Swin block with shifted windows (SW-MSA); the last
stage's units hold only the two pixel blocks, which the object-aware token joins. This reproduces
Table 2's parameter counts (33 / 62 / 108 M; here 31.6 / 61.0 / 107.5 M) and makes the pixel path
of s, m, l exactly Swin-T, -S, -B: `stages[i].units[u]` `.w_msa`, `.sw_msa` are Swin's
`layers[i].blocks[2u]`, `[2u+1]`."""

import argparse
import functools
import itertools
import math
import re
import sys
import zlib
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# -- Table 1: the variants -------------------------------------------------------------------------
@dataclass
class MITrConfig:
    img_size: int = 224  # input resolution (Table 1)
    patch_size: int = 4  # P
    embed_dim: int = 96  # C, channels of stage 1; doubled by every space-to-depth
    window_size: int = 7  # w_s
    depths: tuple = (1, 1, 3, 1)  # Table 1's "block numbers in four layer": units (see above)
    num_heads: tuple = (3, 6, 12, 24)  # pixel-attention heads per stage (Swin's; not in the paper)
    mlp_ratio: float = 4.0
    drop_path: float = 0.2  # stochastic depth, the last block's rate (Interpretations 8, 26)
    arc_scale: float = 8.0  # s of Eq. 13 (Section 4.1, Table 6)
    cross_window_between: bool = True  # unit order W-MSA, CWA, SW-MSA; False: W-MSA, SW-MSA, CWA
    # Table 5's ablation steps, all on by default ("fixed window" = all off):
    pos_embed: bool = True  # relative position bias in pixel attention
    shift: bool = True  # shifted windows in every second pixel block
    cross_window: bool = True  # cross-window blocks (Eq. 3-4)
    arc_sigmoid: bool = True  # class head s * cos(theta) (Eq. 13) instead of linear (Eq. 11)
    object_token: bool = True  # object-aware token and its count head (Eq. 17)
    # Not in the paper:
    cross_window_attention: bool = True  # False: cross-window blocks keep only Eq. 4's LayerNorm +
    # MLP residual, their attention branch removed: a capacity control (Interpretation 31)
    grad_checkpoint: bool = False  # training recomputes each unit in backward: less memory


VARIANTS = {
    # Not from the paper: a CPU-sized model for demos, tests and Shapes, MITr-s's 8/4/2/1 windows.
    "tiny": MITrConfig(
        img_size=96,
        embed_dim=32,
        window_size=3,
        depths=(1, 1, 1, 1),
        num_heads=(1, 2, 4, 8),
        drop_path=0.0,
    ),
    # Table 1; stochastic depth 0.2 for all three (Interpretation 26).
    "s": MITrConfig(
        img_size=224, embed_dim=96, window_size=7, depths=(1, 1, 3, 1), num_heads=(3, 6, 12, 24)
    ),
    "m": MITrConfig(
        img_size=384, embed_dim=96, window_size=12, depths=(1, 1, 9, 1), num_heads=(3, 6, 12, 24)
    ),
    "l": MITrConfig(
        img_size=384, embed_dim=128, window_size=12, depths=(1, 1, 9, 1), num_heads=(4, 8, 16, 32)
    ),
}


class StageGeometry(NamedTuple):
    resolution: int  # tokens per side
    channels: int
    window: int  # w_s, never larger than the map
    shift: int  # of every second pixel block; 0: none
    cross_window: bool  # whether the stage's units hold a cross-window block


def stage_geometry(config: MITrConfig, img_size: int | None = None) -> list[StageGeometry]:
    """The four stages' geometry. Swin's rule: a window never exceeds the feature map, and a map
    that fits in one window is not shifted."""
    side = (img_size or config.img_size) // config.patch_size
    stages = []
    for i in range(4):
        res = side // 2**i
        ws = min(config.window_size, res)
        shift = ws // 2 if config.shift and res > ws else 0
        # Paper: silent on the last stage. Here: no cross-window block there, because Table 2's
        # parameter counts fit only without it (Interpretation 2).
        cross_window = config.cross_window and i < 3
        stages.append(StageGeometry(res, config.embed_dim * 2**i, ws, shift, cross_window))
    return stages


# -- Windows (Fig. 3): partition, reverse, relative positions, the shifted-window mask -------------
def window_partition(x, ws):
    """(B, H, W, C) -> (B*nW, ws*ws, C), windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C)  # (B, nH, ws, nW_, ws, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, nH, nW_, ws, ws, C)
    return x.reshape(-1, ws * ws, C)  # (B*nW, ws*ws, C)


def window_reverse(windows, ws, H, W):
    """(B*nW, ws*ws, C) -> (B, H, W, C); the inverse of window_partition."""
    C = windows.shape[-1]
    x = windows.view(-1, H // ws, W // ws, ws, ws, C)  # (B, nH, nW_, ws, ws, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, nH, ws, nW_, ws, C)
    return x.reshape(-1, H, W, C)  # (B, H, W, C)


def relative_position_index(ws):
    """(ws*ws, ws*ws) index into a ((2ws-1)^2, heads) bias table, as Swin builds it."""
    grid = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    coords = torch.stack(grid).flatten(1)  # (2, N): each token's row and column
    rel = coords[:, :, None] - coords[:, None, :] + (ws - 1)  # (2, N, N), each in [0, 2ws-2]
    return rel[0] * (2 * ws - 1) + rel[1]  # (N, N)


@functools.lru_cache
def shifted_window_mask(H, W, ws, shift, device=None):
    """(nW, ws*ws, ws*ws) additive mask, -inf between tokens that the cyclic shift made neighbours
    (cached: do not modify). After torch.roll by -shift the last windows of each row and column hold
    pixels of both borders: label the rolled map's 3x3 regions; different labels may not attend."""
    labels = torch.zeros(1, H, W, 1, device=device)
    cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    for n, (rows, cols) in enumerate(itertools.product(cuts, cuts)):  # 9 regions, not windows
        labels[:, rows, cols, :] = n
    labels = window_partition(labels, ws).squeeze(-1)  # (nW, ws*ws)
    differ = labels[:, None, :] != labels[:, :, None]  # (nW, N, N)
    return torch.zeros(differ.shape, device=device).masked_fill(differ, float("-inf"))


# -- Pixel attention (Fig. 3a, Eq. 1-2) ------------------------------------------------------------
class PixelAttention(nn.Module):
    """Multi-head self-attention inside each ws x ws window, with Swin's relative position bias.
    Paper: "+position embedding [10]" (Table 5). Here: Swin's relative position bias only, no
    absolute embedding (the authors' sibling code CAT adds one), because [10] is Swin and a Swin
    without it is what load_swin can initialise (Interpretation 5).
    The object-aware token joins every window as one more query and key; its outputs averaged."""

    def __init__(self, dim, window_size, num_heads, pos_embed=True):
        super().__init__()
        self.ws = window_size
        self.heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = None
        if pos_embed:
            rows = (2 * window_size - 1) ** 2
            self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))
            index = relative_position_index(window_size)
            self.register_buffer("relative_position_index", index, persistent=False)  # not saved

    def attention_bias(self, mask, nW, token, dtype):
        """Relative position bias + shift mask -> (1, nW*heads, L, L); None when neither is used."""
        if self.relative_position_bias_table is None and mask is None:
            return None
        N = self.ws * self.ws
        bias = torch.zeros(1, 1, N, N, device=self.qkv.weight.device)
        if self.relative_position_bias_table is not None:
            table = self.relative_position_bias_table[self.relative_position_index.view(-1)]
            bias = bias + table.view(N, N, self.heads).permute(2, 0, 1)[None]  # (1, heads, N, N)
        if mask is not None:
            bias = bias + mask[:, None]  # (nW, heads or 1, N, N)
        if token:  # Paper: silent on its position. Here: no bias to or from it (Interpretation 3)
            bias = F.pad(bias, (0, 1, 0, 1))  # (.., N+1, N+1)
        L = bias.shape[-1]
        return bias.expand(nW, self.heads, L, L).reshape(1, nW * self.heads, L, L).to(dtype)

    def forward(self, windows, batch, mask=None, token=None):
        """windows (B*nW, N, C), mask (nW, N, N) | None, token (B, 1, C) | None -> the same two."""
        BnW, N, C = windows.shape
        nW = BnW // batch
        h = self.heads
        d = C // h
        if token is not None:
            copies = token[:, None].expand(batch, nW, 1, C).reshape(BnW, 1, C)  # one per window
            windows = torch.cat([windows, copies], dim=1)  # (B*nW, N+1, C)
        L = windows.shape[1]
        # Windows are folded into the head axis so that one (1, nW*heads, L, L) bias broadcasts
        # over the batch: a single fused attention call for all windows, heads and images.
        qkv = self.qkv(windows).view(batch, nW, L, 3, h, d)  # (B, nW, L, 3, h, d)
        qkv = qkv.permute(3, 0, 1, 4, 2, 5).reshape(3, batch, nW * h, L, d)  # (3, B, nW*h, L, d)
        q, k, v = qkv.unbind(0)
        bias = self.attention_bias(mask, nW, token is not None, q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # softmax(qk^T/sqrt(d) + B) v
        x = x.view(batch, nW, h, L, d).transpose(2, 3).reshape(BnW, L, C)  # (B*nW, L, C)
        x = self.proj(x)  # (B*nW, L, C): pixels, then the token
        if token is None:
            return x, None
        token = x[:, N:].reshape(batch, nW, 1, C).mean(1)  # (B, 1, C), the mean over windows
        return x[:, :N], token


class MLP(nn.Module):
    def __init__(self, dim, ratio):
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * ratio))
        self.fc2 = nn.Linear(int(dim * ratio), dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class PixelBlock(nn.Module):
    """Eq. 1-2 (a Swin block): x' = x + PA(LN(x)); x'' = x' + MLP(LN(x')); shifted when shift > 0.
    The object-aware token, when given, takes the same two steps, with the same stochastic depth."""

    def __init__(self, dim, heads, ws, shift, cfg: MITrConfig, dpr=0.0):
        super().__init__()
        self.ws = ws
        self.shift = shift
        self.dpr = dpr  # stochastic-depth rate
        self.norm1 = nn.LayerNorm(dim)
        self.pixel_attention = PixelAttention(dim, ws, heads, cfg.pos_embed)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, cfg.mlp_ratio)

    def forward(self, x, H, W, token=None):
        """x (B, H*W, C), token (B, 1, C) or None -> the same shapes."""
        B, L, C = x.shape
        keep_attention = stochastic_depth(x, self.dpr, self.training)  # (B, 1, 1) or None
        keep_mlp = stochastic_depth(x, self.dpr, self.training)
        y = self.norm1(x).view(B, H, W, C)  # (B, H*W, C) -> (B, H, W, C)
        mask = None
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
            mask = shifted_window_mask(H, W, self.ws, self.shift, x.device)  # (nW, ws*ws, ws*ws)
        windows = window_partition(y, self.ws)  # (B*nW, ws*ws, C)
        normed_token = None if token is None else self.norm1(token)
        windows, t = self.pixel_attention(windows, B, mask, normed_token)
        y = window_reverse(windows, self.ws, H, W)  # (B, H, W, C)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + drop_path(y.reshape(B, L, C), keep_attention)  # Eq. (1)
        x = x + drop_path(self.mlp(self.norm2(x)), keep_mlp)  # Eq. (2)
        if token is None:
            return x, None
        token = token + drop_path(t, keep_attention)  # Eq. (1) for the token
        token = token + drop_path(self.mlp(self.norm2(token)), keep_mlp)  # Eq. (2) for the token
        return x, token


# -- Cross-window attention (Fig. 3b, Eq. 3-4) -----------------------------------------------------
class CrossWindowAttention(nn.Module):
    """Self-attention among the windows of one channel.
    Each ws x ws window of a channel is unfolded into one token of length ws^2; the nW tokens of a
    channel attend to each other (one head, embedding ws^2, shared by all channels, no position
    bias, as in the authors' CAT: what other windows hold, not where; Interpretations 4, 5). Its
    weights are ws^2 x ws^2: parameters scale with ws^4 (Eq. 10), cost is linear in C (Eq. 9)."""

    def __init__(self, window_size):
        super().__init__()
        self.ws = window_size
        n = window_size * window_size
        self.qkv = nn.Linear(n, 3 * n)
        self.proj = nn.Linear(n, n)

    def forward(self, x, attn_mask=None):
        """x (B, H, W, C) -> (B, H, W, C). attn_mask, None in the model: an additive mask
        broadcastable to (B, C, nW, nW), to cut windows out of the keys (notebook 05)."""
        B, H, W, C = x.shape
        ws = self.ws
        nh = H // ws
        nw = W // ws
        t = x.view(B, nh, ws, nw, ws, C)  # (B, nh, ws, nw, ws, C)
        # One sequence per (image, channel); the head axis of 1 keeps q, k, v 4-D, which the fused
        # attention kernels require (3-D input falls back to the slow math path).
        t = t.permute(0, 5, 1, 3, 2, 4).reshape(B * C, 1, nh * nw, ws * ws)  # (B*C, 1, nW, ws*ws)
        q, k, v = self.qkv(t).chunk(3, dim=-1)  # 3 x (B*C, 1, nW, ws*ws)
        if attn_mask is not None:
            attn_mask = attn_mask.expand(B, C, nh * nw, nh * nw).reshape(B * C, 1, nh * nw, -1)
        t = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # windows to windows
        t = self.proj(t)  # (B*C, 1, nW, ws*ws)
        t = t.view(B, C, nh, nw, ws, ws).permute(0, 2, 4, 3, 5, 1)  # (B, nh, ws, nw, ws, C)
        return t.reshape(B, H, W, C)


class CrossWindowBlock(nn.Module):
    """Eq. 3-4: x' = x + CWA(LN(x)); x'' = x' + MLP(LN(x')). With cross_window_attention=False
    (not in the paper; Interpretation 31) Eq. 3's branch is gone: x'' = x + MLP(LN(x))."""

    def __init__(self, dim, ws, cfg: MITrConfig, dpr=0.0):
        super().__init__()
        self.dpr = dpr
        attention = cfg.cross_window_attention  # False: the capacity control
        self.norm1 = nn.LayerNorm(dim) if attention else None
        self.cross_window_attention = CrossWindowAttention(ws) if attention else None
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, cfg.mlp_ratio)

    def forward(self, x, H, W):
        """x (B, H*W, C) -> (B, H*W, C)."""
        B, L, C = x.shape
        if self.cross_window_attention is not None:
            y = self.cross_window_attention(self.norm1(x).view(B, H, W, C))  # (B, H, W, C)
            keep = stochastic_depth(x, self.dpr, self.training)
            x = x + drop_path(y.view(B, L, C), keep)  # Eq. (3)
        keep = stochastic_depth(x, self.dpr, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), keep)  # Eq. (4)


# -- Fig. 2: patch embedding, units and stages, space-to-depth, object-aware token, heads ----------
class PatchEmbed(nn.Module):
    """Convolutional projection of P x P patches to C channels: (B, 3, H, W) -> (B, H/P*W/P, C)."""

    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.proj(x)  # (B, C, H/P, W/P)
        return self.norm(x.flatten(2).transpose(1, 2))  # (B, H/P*W/P, C)


class SpaceToDepth(nn.Module):
    """Resolution / 2 each side, channels x 2 (Section 3.1.1).
    Paper: cites PiT's pooling [11]. Here: Swin's patch merging (2x2 neighbours concatenated to 4C,
    LayerNorm, linear 4C -> 2C without bias), as Table 2 and Section 4.1 imply (Interpretation 6)"""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x, H, W):
        B, _, C = x.shape
        x = x.view(B, H // 2, 2, W // 2, 2, C)  # (B, H/2, dh, W/2, dw, C)
        # Swin's concat order is (dh, dw) = (0,0), (1,0), (0,1), (1,1): dw is the slower index.
        x = x.permute(0, 1, 3, 4, 2, 5).reshape(B, H * W // 4, 4 * C)  # (B, H/2*W/2, 4C)
        return self.reduction(self.norm(x))  # (B, H/2*W/2, 2C)


class Unit(nn.Module):
    """Fig. 3's "MITr block", one of Table 1's "block numbers": W-MSA -> cross-window -> SW-MSA.
    Paper: "alternate between pixel attention and cross-window attention", local judgment first.
    Here: cross-window between the plain and the shifted pixel block, as the authors' CAT orders
    units (Interpretation 1); cross_window_between=False runs it last. None in stage 4 (2)."""

    def __init__(self, cfg: MITrConfig, geometry: StageGeometry, heads: int, rates):
        super().__init__()
        dim = geometry.channels
        ws = geometry.window
        self.cross_window_at = None  # where the cross-window block runs: "between", "last", None
        if geometry.cross_window:
            self.cross_window_at = "between" if cfg.cross_window_between else "last"
        # Built in the order they run, which is the order of Swin's growing stochastic-depth rates.
        self.w_msa = PixelBlock(dim, heads, ws, 0, cfg, next(rates))
        self.cross_window = None
        if self.cross_window_at == "between":
            self.cross_window = CrossWindowBlock(dim, ws, cfg, next(rates))
        self.sw_msa = PixelBlock(dim, heads, ws, geometry.shift, cfg, next(rates))
        if self.cross_window_at == "last":
            self.cross_window = CrossWindowBlock(dim, ws, cfg, next(rates))

    def forward(self, x, H, W, token=None):
        """x (B, H*W, C), token (B, 1, C) or None -> the same shapes."""
        x, token = self.w_msa(x, H, W, token)  # Eq. 1-2, plain windows
        if self.cross_window_at == "between":
            x = self.cross_window(x, H, W)  # Eq. 3-4, the pixels only
        x, token = self.sw_msa(x, H, W, token)  # Eq. 1-2, shifted windows
        if self.cross_window_at == "last":
            x = self.cross_window(x, H, W)  # Eq. 3-4 (cross_window_between=False)
        return x, token


class Stage(nn.Module):
    """One of Fig. 2's four layers: `depths[i]` units, then space-to-depth (not after the last)."""

    def __init__(self, cfg: MITrConfig, i: int, rates):
        super().__init__()
        geometry = stage_geometry(cfg)[i]
        units = [Unit(cfg, geometry, cfg.num_heads[i], rates) for _ in range(cfg.depths[i])]
        self.units = nn.ModuleList(units)
        self.space_to_depth = SpaceToDepth(geometry.channels) if i < 3 else None
        self.grad_checkpoint = cfg.grad_checkpoint

    def forward(self, x, H, W, token=None):
        """x (B, H*W, C), token (B, 1, C) or None -> (x (B, H/2*W/2, 2C) or as given, token)."""
        for unit in self.units:
            if self.grad_checkpoint and self.training:  # keep the unit's input only, recompute
                x, token = checkpoint(unit, x, H, W, token, use_reentrant=False)
            else:
                x, token = unit(x, H, W, token)
        if self.space_to_depth is not None:
            x = self.space_to_depth(x, H, W)  # (B, H/2*W/2, 2C)
        return x, token


def arc_logits(x, weight, s):
    """Eq. 13's logits s * cos(theta_ij): features x (B, d), class weights (n, d) -> (B, n).
    Paper: p = 1 / (1 + e^{s cos theta}) (and Eq. 11: 1 / (1 + e^{x W^T + b})). Here: p =
    sigmoid(s cos theta), because as printed p would fall as the feature turns towards its class
    (Interpretation 10). In float32 with autocast off: bf16 logits are off by ~5e-3."""
    with torch.autocast(x.device.type, enabled=False):
        features = F.normalize(x.float(), dim=-1)  # (B, d), unit length
        classes = F.normalize(weight.float(), dim=-1)  # (n, d), unit length
        cos = features @ classes.t()  # (B, n)
    return s * cos  # Eq. (13), within [-s, s]


class ArcHead(nn.Module):
    """Eq. 13's class head: a weight W_j per class, no bias; sigmoid(logits) is the paper's p_ij."""

    def __init__(self, dim, num_classes, s=8.0):
        super().__init__()
        self.s = s
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x):
        return arc_logits(x, self.weight, self.s)


class MITr(nn.Module):
    """images (B, 3, H, W) -> (class_logits (B, n), count_logits (B, n+1) or None). The initial
    weights depend on (seed, tensor name) only: for one seed, variants start equal where shared."""

    def __init__(self, config: MITrConfig, num_classes: int, seed: int = 0):
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        per_unit = [2 + g.cross_window for g in stage_geometry(config)]  # sub-blocks per unit
        n_blocks = sum(d * n for d, n in zip(config.depths, per_unit, strict=True))
        # Swin's stochastic-depth rates, from 0 to drop_path in the order the blocks run
        rates = iter([config.drop_path * k / max(n_blocks - 1, 1) for k in range(n_blocks)])
        self.patch_embed = PatchEmbed(config.patch_size, config.embed_dim)
        self.stages = nn.ModuleList(Stage(config, i, rates) for i in range(4))
        dim = config.embed_dim * 8
        self.norm = nn.LayerNorm(dim)
        # Paper: the pooled pixel tokens are "followed by multi-layer perceptron (MLP)", the token
        # "by MLP directly". Here: one layer each: Eq. 11 calls W "the final fully connected layer",
        # Eq. 17 says "the fully connected layer following object-aware token" (Interpretation 7).
        if config.arc_sigmoid:
            self.head = ArcHead(dim, num_classes, config.arc_scale)
        else:
            self.head = nn.Linear(dim, num_classes)
        # Section 3.2.2's token, stacked to the last stage; its head classifies z in 0..n (Eq. 17).
        token = config.object_token
        self.object_token = nn.Parameter(torch.zeros(1, 1, dim)) if token else None
        self.count_head = nn.Linear(dim, num_classes + 1) if token else None
        init_weights(self, seed)

    def forward_tokens(self, images):
        """images (B, 3, H, W) -> (pixel tokens (B, h*w, 8C), token (B, 1, 8C) or None), normed."""
        B, _, H, W = images.shape
        cfg = self.config
        if not (valid_image_size(cfg, H) and valid_image_size(cfg, W)):
            raise ValueError(image_size_error(cfg, H, W))
        x = self.patch_embed(images)  # (B, H/P*W/P, C)
        token = None
        H = H // cfg.patch_size
        W = W // cfg.patch_size
        for i, stage in enumerate(self.stages):
            if i == 3 and self.object_token is not None:
                # repeat, not expand: under no_grad an expanded view of a parameter requires grad
                # but has no grad_fn, which FlopCounterMode's module tracker rejects.
                token = self.object_token.repeat(B, 1, 1)  # (B, 1, 8C)
            x, token = stage(x, H, W, token)
            H = H // 2  # the next stage's map
            W = W // 2
        return self.norm(x), None if token is None else self.norm(token)

    def forward(self, images):
        x, token = self.forward_tokens(images)  # average pooling over pixel tokens:
        class_logits = self.head(x.mean(1))  # Eq. (11) or Eq. (13), (B, n)
        count_logits = None if token is None else self.count_head(token[:, 0])  # Eq. (17), (B, n+1)
        return class_logits, count_logits


# -- Not in the paper: stochastic depth and initialisation, Swin's -------------------------------
def stochastic_depth(x, p, training):
    """One draw per sample of x (B, ...) for one residual branch: (B, 1, 1) holding 0 (dropped,
    probability p) or 1/(1-p); None when off (p = 0 or not training). Swin's drop path."""
    if p == 0.0 or not training:
        return None
    return x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - p) / (1 - p)


def drop_path(branch, keep):
    """A residual branch (B, L, C) times a stochastic_depth draw (None: unchanged)."""
    if keep is None:
        return branch
    return branch * keep


def init_weights(model: nn.Module, seed: int):
    """Swin's initialisation: weights of linear layers, bias tables and the token trunc_normal with
    std 0.02, biases 0, LayerNorms 1 and 0, the patch embedding PyTorch's default. Paper: silent.
    Here: the class head too; the arc head's output ignores its scale (Interpretation 25)."""
    # Order matters with one generator: each draw moves all later ones, so adding a part (the
    # cross-window blocks, the token) would change every weight drawn after it. So: one per tensor.
    for name, p in model.named_parameters():
        # a 32-bit seed from (seed, name): torch's CPU generator keeps only 32 bits of a seed
        generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        module = model.get_submodule(name.rpartition(".")[0])
        if isinstance(module, nn.LayerNorm):
            continue  # ones and zeros, as built
        if isinstance(module, nn.Conv2d):  # U(-b, b), b = 1/sqrt(fan in), for weight and bias
            bound = module.weight[0].numel() ** -0.5
            nn.init.uniform_(p, -bound, bound, generator=generator)
        elif p.dim() > 1:
            nn.init.trunc_normal_(p, std=0.02, generator=generator)
        else:
            nn.init.zeros_(p)


# -- Section 3.1.3: cost. FLOPs here are multiply-adds (MACs), as the paper and Swin count them. --
def analytic_flops(config: MITrConfig, num_classes: int = 80, img_size: int | None = None):
    """Eq. 7 and 9 per block plus the layers between them -> {part: MACs}.
    Eq. 7 (pixel attention):  4hwC^2 (q, k, v, output projections) + 2 ws^2 hwC (QK^T and AV).
    Eq. 9 (cross-window):     4hw ws^2 C + 2 (hw)^2 C / ws^2.
      Paper: the extracted text reads "4 h w_s^2 C" (a w lost in print or in extraction). Here:
      4 h w w_s^2 C, because each of the hw/ws^2 window tokens of each of the C channels goes
      through four ws^2 x ws^2 projections (Interpretation 9).
    Each block's MLP adds 2 * ratio * hwC^2. Eq. 5 (global attention, 4hwC^2 + 2(hw)^2 C) is no
    part of MITr: notebook 02 (notebooks/02_cost_analysis.ipynb) compares all three."""
    cfg = config
    img = img_size or cfg.img_size
    flops = {"patch_embed": (img // cfg.patch_size) ** 2 * 3 * cfg.patch_size**2 * cfg.embed_dim}
    for i, g in enumerate(stage_geometry(cfg, img)):
        hw = g.resolution**2
        C = g.channels
        ws = g.window
        mlp = 2 * cfg.mlp_ratio * hw * C * C
        pa = 4 * hw * C * C + 2 * ws * ws * hw * C  # Eq. (7)
        if i == 3 and cfg.object_token:  # one more token in every window, and its MLP
            nW = hw // (ws * ws)
            L = ws * ws + 1
            pa = nW * (4 * L * C * C + 2 * L * L * C) + 2 * cfg.mlp_ratio * C * C
        cw = 0
        if cfg.cross_window_attention:
            cw = 4 * hw * ws * ws * C + 2 * hw * hw * C / (ws * ws)  # Eq. (9)
        unit = 2 * (pa + mlp)
        if g.cross_window:
            unit += cw + mlp
        s2d = (hw // 4) * 4 * C * 2 * C if i < 3 else 0  # space-to-depth
        flops[f"stage{i + 1}"] = cfg.depths[i] * unit + s2d
    heads = num_classes + (num_classes + 1 if cfg.object_token else 0)
    flops["heads"] = 8 * cfg.embed_dim * heads
    return flops


# --- Beyond the paper: image sizes, counting, Swin's weights, speed, the command line -------------
def valid_image_size(config: MITrConfig, side: int) -> bool:
    """Whether every stage of an image side holds a whole number of windows (the windows are set
    when the model is built, from config.img_size)."""
    tokens = side // config.patch_size
    windows = [g.window for g in stage_geometry(config)]
    return (
        side % config.patch_size == 0
        and tokens % 8 == 0
        and all(tokens // 2**i % windows[i] == 0 for i in range(4))
    )


def image_size_error(config: MITrConfig, H: int, W: int) -> str:
    """The line for an image MITr cannot take, with the first sides it can."""
    ok = [s for s in range(1, 4 * config.img_size + 1) if valid_image_size(config, s)][:4]
    return (
        f"MITr (P={config.patch_size}, ws={config.window_size}, built for {config.img_size}) "
        f"cannot take a {H}x{W} image: every stage must hold a whole number of windows. Sides "
        f"that work: {', '.join(map(str, ok))}, ..."
    )


def count_flops(model: nn.Module, img_size: int | None = None):
    """MACs per image counted by torch.utils.flop_counter in one forward pass: {module path: MACs}.
    FlopCounterMode counts a multiply-add as 2 FLOPs; we halve it. It does not see the CPU's fused
    attention kernel, so attention runs on the math backend (plain matmuls) while counting."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    img = img_size or model.config.img_size
    was_training = model.training
    x = torch.zeros(1, 3, img, img, device=next(model.parameters()).device)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    model.train(was_training)
    return {k: sum(v.values()) / 2 for k, v in counter.get_flop_counts().items()}


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def summary(model: MITr, img_size: int | None = None) -> str:
    """A per-stage table: token grid, channels, windows, parameters, analytic and counted GFLOPs."""
    cfg = model.config
    img = img_size or cfg.img_size
    eq = analytic_flops(cfg, model.num_classes, img)
    eq["total"] = sum(eq.values())
    got = count_flops(model, img)
    table = [("part", "tokens", "C", "windows", "params(M)", "GFLOPs(Eq.)", "GFLOPs(counted)")]

    def row(part, tokens, C, windows, params, counted):
        macs = sum(got.get(name, 0) for name in counted)
        numbers = (f"{params / 1e6:.2f}", f"{eq[part] / 1e9:.3f}", f"{macs / 1e9:.3f}")
        table.append((part, tokens, C, windows, *numbers))

    grid = f"{img // cfg.patch_size}^2"
    row(
        "patch_embed", grid, cfg.embed_dim, "-", num_params(model.patch_embed), ["MITr.patch_embed"]
    )
    token = 0 if model.object_token is None else model.object_token.numel()  # it joins stage 4
    for i, g in enumerate(stage_geometry(cfg, img)):
        windows = f"{(g.resolution // g.window) ** 2}x{g.window}^2"
        if g.shift:
            windows += " shift"
        if g.cross_window:
            windows += " +CWA" if cfg.cross_window_attention else " +MLP"
        params = num_params(model.stages[i]) + (token if i == 3 else 0)
        row(f"stage{i + 1}", f"{g.resolution}^2", g.channels, windows, params, [f"MITr.stages.{i}"])
    heads = [m for m in (model.norm, model.head, model.count_head) if m is not None]
    counted = ["MITr.norm", "MITr.head", "MITr.count_head"]
    row("heads", "-", 8 * cfg.embed_dim, "-", sum(num_params(m) for m in heads), counted)
    row("total", "", "", "", num_params(model), ["MITr"])
    widths = [max(len(str(r[c])) for r in table) for c in range(len(table[0]))]
    lines = ("  ".join(str(v).rjust(w) for v, w in zip(r, widths, strict=True)) for r in table)
    return "\n".join(lines)


# -- Section 4.1: initialising from ImageNet-pretrained Swin ---------------------------------------
def _first(names, k=3):
    names = list(dict.fromkeys(names))  # unique, in order
    more = f" (+{len(names) - k} more)" if len(names) > k else ""
    return ", ".join(names[:k]) + more or "-"


def _read_swin(path_or_state_dict) -> dict:
    """A path, or the loaded object -> Swin's state dict of tensors; ValueError, one line."""
    sd = path_or_state_dict
    if isinstance(sd, str) or hasattr(sd, "__fspath__"):  # a path; else the object itself
        try:
            sd = torch.load(sd, map_location="cpu", weights_only=True)
        except Exception as e:  # missing file, pickled objects, not a checkpoint
            raise ValueError(
                f"load_swin: cannot read '{sd}' ({type(e).__name__}); expected a .pth holding "
                f"a state dict or {{'model': state_dict}} of tensors"
            ) from None
    if isinstance(sd, dict):
        sd = sd.get("model", sd.get("state_dict", sd))
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(
            "load_swin: the checkpoint is not a state dict of tensors "
            "(expected keys like 'layers.0.blocks.0.attn.qkv.weight')"
        )
    return {k.removeprefix("module."): v for k, v in sd.items()}  # saved from DDP or not


def swin_key_to_mitr(key: str, timm: bool) -> str:
    """One Swin key -> MITr's name. Swin's blocks come in pairs, plain then shifted windows:
    layers.i.blocks.2u -> stages.i.units.u.w_msa, layers.i.blocks.2u+1 -> stages.i.units.u.sw_msa
    (attn -> pixel_attention). Patch merging is layers.i.downsample in the official release (end of
    stage i), layers.{i+1}.downsample in timm (start of stage i+1): stages.i.space_to_depth."""
    block = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.(.*)", key)
    if block:
        j = int(block[2])
        pixel_block = "sw_msa" if j % 2 else "w_msa"
        rest = re.sub(r"^attn\.", "pixel_attention.", block[3])
        return f"stages.{block[1]}.units.{j // 2}.{pixel_block}.{rest}"
    merging = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
    if merging:
        return f"stages.{int(merging[1]) - timm}.space_to_depth.{merging[2]}"
    return key


def _bias_table_side(key, table) -> int:
    """2w - 1 for a bias table ((2w-1)^2, heads) of a window w; for any other shape ValueError."""
    side = math.isqrt(table.shape[0]) if table.dim() == 2 else 0
    if table.dim() != 2 or side * side != table.shape[0] or side % 2 == 0:
        raise ValueError(
            f"load_swin: {key} has shape {tuple(table.shape)}, no relative position bias table "
            f"(that is ((2w-1)^2, heads) for a window w): the checkpoint is damaged or no Swin"
        )
    return side


def _resize_bias_table(table, side):
    """((2w-1)^2, heads) -> (side^2, heads), bicubic per head, as Swin's fine-tuning resizes."""
    old = math.isqrt(table.shape[0])
    heads = table.shape[1]
    img = table.float().t().reshape(1, heads, old, old)  # (1, heads, 2w-1, 2w-1)
    img = F.interpolate(img, size=(side, side), mode="bicubic", align_corners=False)
    return img.reshape(heads, side * side).t().to(table.dtype)  # ((2w'-1)^2, heads)


def load_swin(model: MITr, path_or_state_dict, strict: bool = True) -> dict:
    """Swin weights (official .pth or timm state dict) -> MITr's pixel-attention path; bias tables
    of another window resized bicubically per head, as Swin's fine-tuning does (7 -> 12). Returns
    {"layout", "notes", and name lists "loaded" (of which "resized"), "new" (left as initialised),
    "skipped" (index/mask buffers, ImageNet head), "unexpected", "mismatched"}. ValueError, one
    line, model untouched: unreadable checkpoint, a malformed bias table; when strict, unexpected or
    mismatched keys or pixel-path tensors the checkpoint lacks (a wrong Swin for this variant).
    Paper: "We pretrain MITr on ImageNet-22K", cross-window blocks included. Here: s, m, l start
    from Swin-T, -S, -B, the rest fresh: MITr's weights were never released (Interpretation 19)."""
    sd = _read_swin(path_or_state_dict)
    official = any(k.startswith("layers.0.downsample.") for k in sd)
    timm = any(".downsample." in k for k in sd) and not official
    r = {"layout": "timm" if timm else "official", "notes": []}
    for group in ("loaded", "resized", "new", "skipped", "unexpected", "mismatched"):
        r[group] = []
    target = model.state_dict()
    found = {}
    wrong = set()
    for key, value in sd.items():
        name = swin_key_to_mitr(key, timm)
        table = name.endswith("relative_position_bias_table")
        rebuilt = key.endswith(("relative_position_index", "attn_mask"))
        if rebuilt or key.startswith("head.") or (table and not model.config.pos_embed):
            r["skipped"].append(key)  # buffers rebuilt here; ImageNet's classes; tables ablated
            continue
        if name not in target:
            r["unexpected"].append(key)
            continue
        want = target[name].shape
        if table and value.shape != want:
            side = _bias_table_side(key, value)
            if value.shape[1] == want[1]:  # the same heads, another window
                value = _resize_bias_table(value, math.isqrt(want[0]))
                r["resized"].append(name)
                windows = f"{(side + 1) // 2} -> {(math.isqrt(want[0]) + 1) // 2}"
                r["notes"] = [f"bias tables resized bicubically, window {windows}"]
        if value.shape == want:
            found[name] = value
        else:
            r["mismatched"].append(f"{key} {tuple(value.shape)} vs {name} {tuple(want)}")
            wrong.add(name)
    r["loaded"] = [n for n in target if n in found]
    r["new"] = [n for n in target if n not in found]
    fresh = (".cross_window.", "object_token", "count_head.", "head.")  # no Swin holds these
    missing = [n for n in r["new"] if n not in wrong and not any(f in n for f in fresh)]
    checks = (
        ("{} checkpoint key(s) have no place in this MITr: {}", r["unexpected"]),
        ("{} shape mismatch(es): {}", r["mismatched"]),
        ("the checkpoint lacks {} pixel-path tensor(s): {}", missing),
    )
    problems = [message.format(len(names), _first(names)) for message, names in checks if names]
    if strict and problems:
        c = model.config
        raise ValueError(
            f"load_swin: {'; '.join(problems)}. This MITr has C={c.embed_dim}, units {c.depths}, "
            f"heads {c.num_heads}: MITr-s takes Swin-T, m Swin-S, l Swin-B. To load the rest "
            f"anyway pass strict=False (train.py --init-nonstrict)."
        )
    model.load_state_dict(found, strict=False)
    r["notes"] += problems
    return r


def format_swin_report(r: dict) -> str:
    """load_swin's report in a few lines: counts, the modules left new, what was skipped, notes."""
    module = r"^(stages\.\d+\.units\.\d+\.cross_window|head|count_head)\..*"
    new = (re.sub(module, r"\1", n) for n in r["new"])
    skipped = (re.sub(r"^layers\.\d+\.blocks\.\d+\.", "", k) for k in r["skipped"])
    counts = ", ".join(f"{len(r[g])} {g}" for g in ("new", "skipped", "unexpected", "mismatched"))
    lines = [
        f"Swin init ({r['layout']} layout): {len(r['loaded'])} tensors loaded "
        f"({len(r['resized'])} resized), {counts}",
        f"  new: {_first(new)}",
        f"  skipped: {_first(skipped)}",
    ]
    return "\n".join(lines + [f"  note: {n}" for n in r["notes"]])


# -- Speed: `python mitr.py --bench --variant s [--device cuda] [--batch 64] [--bf16]` ------------
def bench(variant="tiny", device="cpu", batch=8, repeats=5, bf16=False, img_size=None):
    """Print forward and training images/s, achieved GFLOP/s, and the share of time and FLOPs of
    cross-window attention, by ablation: the same model with cross_window_attention=False (its
    LayerNorm, attention and residual add gone, the MLP kept) timed beside it."""
    from torch.utils.benchmark import Timer

    device = torch.device(device)
    cfg = VARIANTS[variant]
    img = img_size or cfg.img_size
    model = MITr(cfg, 80).to(device)
    hollow = MITr(replace(cfg, cross_window_attention=False), 80).to(device)
    counts = count_flops(model, img)  # MACs per image
    macs = counts["MITr"]
    cwa = sum(v for k, v in counts.items() if k.endswith(".cross_window_attention"))
    x = torch.randn(batch, 3, img, img, device=device)
    y = (torch.rand(batch, 80, device=device) < 0.1).float()  # about 8 labels an image
    opts = {net: torch.optim.Adam(net.parameters(), lr=1e-4) for net in (model, hollow)}

    def step(net, train):
        autocast = torch.autocast(device.type, torch.bfloat16, enabled=bf16)
        with torch.set_grad_enabled(train), autocast:
            logits, count = net.train(train)(x)
        if train:  # a stand-in for Eq. 18 (losses.py), of the same cost, keeps mitr.py standalone
            loss = F.binary_cross_entropy_with_logits(logits.float(), y)
            (loss + F.cross_entropy(count.float(), y.sum(1).long())).backward()
            opts[net].step()
            opts[net].zero_grad(set_to_none=True)

    seconds = {}  # per call, mean of `repeats` after two warm-up calls (Timer synchronises CUDA)
    for train in (False, True):
        for net in (model, hollow):
            timer = Timer(
                "step(net, train)",
                globals=dict(step=step, net=net, train=train),
                num_threads=torch.get_num_threads(),
            )
            seconds[net, train] = timer.timeit(repeats).mean
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    precision = "bf16 autocast" if bf16 else "fp32"
    print(
        f"MITr-{variant} on {where}, batch {batch}, {precision}: "
        f"{macs / 1e9:.3f} GMACs per image, mean of {repeats}"
    )
    for train in (False, True):  # a training step ~ 3x the forward FLOPs
        rate = batch / seconds[model, train]
        achieved = 2 * (1 + 2 * train) * macs * rate / 1e9
        step_name = "training" if train else "forward"
        print(f"{step_name:9s} {rate:9.1f} img/s  {achieved:9.1f} GFLOP/s achieved")
    share = [100 * (1 - seconds[hollow, train] / seconds[model, train]) for train in (False, True)]
    print(
        f"cross-window attention: {100 * cwa / macs:.1f}% of FLOPs, {share[0]:.1f}% of forward "
        f"time, {share[1]:.1f}% of training time"
    )


TABLE2_PARAMS_M = {"s": 33, "m": 62, "l": 108}  # Table 2, millions, 80 COCO classes


def parse_args(argv):
    """The command line, each value checked: a bad one is one data.InputError line."""
    from data import InputError  # the project's one-line errors, as train.py's

    ap = argparse.ArgumentParser(
        prog="mitr.py",
        description="MITr's per-stage table (shapes, parameters, FLOPs), or its speed.",
    )

    def error(message):
        raise InputError(f"{message} (see python mitr.py --help)")

    ap.error = error
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="s")
    ap.add_argument("--num-classes", type=int, default=80, help="1 to 100000")
    ap.add_argument("--img-size", type=int, default=None, help="default: the variant's")
    ap.add_argument("--bench", action="store_true", help="time forward and training steps instead")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8, help="for --bench, 1 to 1024")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast, for --bench")
    args = ap.parse_args(argv)
    cfg = VARIANTS[args.variant]
    if not 1 <= args.num_classes <= 100_000:
        raise InputError(f"--num-classes {args.num_classes}: give 1 to 100000 classes")
    if not 1 <= args.batch <= 1024:
        raise InputError(f"--batch {args.batch}: give 1 to 1024 images")
    sides = [s for s in range(1, 4 * cfg.img_size + 1) if valid_image_size(cfg, s)]
    if args.img_size is not None and args.img_size not in sides:
        raise InputError(
            f"--img-size {args.img_size}: MITr-{args.variant} takes sides that hold whole windows "
            f"in every stage, up to 4x its {cfg.img_size}: {', '.join(map(str, sides[:4]))}, ..."
        )
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise InputError(f"--device {args.device}: give cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {args.device}: this machine has no CUDA device; use cpu")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {args.device}: give cpu, cuda or cuda:N")
    return args


def main(argv=None):
    from data import InputError

    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except InputError as e:
        print(f"mitr.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.bench:
        return bench(args.variant, args.device, args.batch, bf16=args.bf16, img_size=args.img_size)
    cfg = VARIANTS[args.variant]
    model = MITr(cfg, args.num_classes)
    print(f"MITr-{args.variant}  {cfg}\n{summary(model, args.img_size)}")
    if args.variant in TABLE2_PARAMS_M:
        print(
            f"Table 2: {TABLE2_PARAMS_M[args.variant]}M parameters; "
            f"here {num_params(model) / 1e6:.2f}M ({args.num_classes} classes)"
        )


if __name__ == "__main__":
    main()
