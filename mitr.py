"""MITr: the Multi-label Transformer of Cheng et al., 2021, Section 3.1, as one readable file.

Read it beside the paper, top to bottom:

    Table 1 ............ MITrConfig, VARIANTS
    Fig. 3(a), Eq. 1-2 . window_partition, PixelAttention, PixelBlock   (in-window attention, shift)
    Fig. 3(b), Eq. 3-4 . CrossWindowAttention, CrossWindowBlock        (windows are the tokens)
    Fig. 2 ............. PatchEmbed -> Stage x4 (SpaceToDepth between) -> object-aware token -> heads
    Eq. 11 / Eq. 13 .... the class head: linear, or arc (s * cos theta)
    Eq. 17 ............. the count head on the object-aware token
    Eq. 5-10 ........... analytic_flops, count_flops, summary  (`python mitr.py --variant s`)

The block layout is the paper's silent part (README, "Interpretations"). One "block" of Table 1 is
a *unit* of three sub-blocks: a Swin block with plain windows (W-MSA), a Swin block with shifted
windows (SW-MSA), then a cross-window block. Stages 1-3 hold such units; the last stage, a single
window at the paper's resolutions (7x7 with ws 7, 12x12 with ws 12), holds only the two pixel
blocks, and the object-aware token joins their attention. This is the reading that reproduces
Table 2's parameter counts (33 / 62 / 108 M; we get 31.6 / 61.0 / 107.5 M), and it makes the
pixel-attention path of s, m, l exactly Swin-T, Swin-S and Swin-B: `stages[i].pixel_blocks[j]` is
Swin's `layers[i].blocks[j]`, which is what `load_swin` relies on.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Table 1: the variants

@dataclass
class MITrConfig:
    img_size: int = 224                 # input resolution (Table 1)
    patch_size: int = 4                 # P
    embed_dim: int = 96                 # C, channels of stage 1; doubled by every space-to-depth
    window_size: int = 7                # w_s
    depths: tuple = (1, 1, 3, 1)        # Table 1's "block numbers in four layer" (units, see above)
    num_heads: tuple = (3, 6, 12, 24)   # pixel-attention heads per stage (Swin's; not in the paper)
    mlp_ratio: float = 4.0
    drop_path: float = 0.2              # stochastic depth, as the matching Swin (not in the paper)
    arc_scale: float = 8.0              # s of Eq. 13 (Section 4.1, Table 6)
    # Table 5's ablation steps, all on by default ("fixed window" = all off):
    pos_embed: bool = True              # relative position bias in pixel attention
    shift: bool = True                  # shifted windows in every second pixel block
    cross_window: bool = True           # cross-window blocks (Eq. 3-4)
    arc_sigmoid: bool = True            # class head s * cos(theta) (Eq. 13) instead of linear (Eq. 11)
    object_token: bool = True           # object-aware token and its count head (Eq. 17)


VARIANTS = {
    # Not from the paper: a CPU-sized model for demos, tests and the Shapes dataset. Its window
    # layout mirrors MITr-s (8, 4, 2, 1 windows per side in the four stages).
    "tiny": MITrConfig(img_size=96, embed_dim=32, window_size=3, depths=(1, 1, 1, 1),
                       num_heads=(1, 2, 4, 8), drop_path=0.0),
    # Table 1.
    "s": MITrConfig(img_size=224, embed_dim=96, window_size=7, depths=(1, 1, 3, 1),
                    num_heads=(3, 6, 12, 24), drop_path=0.2),
    "m": MITrConfig(img_size=384, embed_dim=96, window_size=12, depths=(1, 1, 9, 1),
                    num_heads=(3, 6, 12, 24), drop_path=0.3),
    "l": MITrConfig(img_size=384, embed_dim=128, window_size=12, depths=(1, 1, 9, 1),
                    num_heads=(4, 8, 16, 32), drop_path=0.5),
}
TABLE2_PARAMS_M = {"s": 33, "m": 62, "l": 108}    # Table 2, millions, 80 COCO classes


def stage_geometry(config: MITrConfig, img_size: int | None = None):
    """Per stage: (resolution, channels, window, shift, has_cross_window). Swin's rule: a window
    never exceeds the feature map, and a map that fits in one window is not shifted."""
    side = (img_size or config.img_size) // config.patch_size
    out = []
    for i in range(4):
        res = side // 2 ** i
        ws = min(config.window_size, res)
        shift = ws // 2 if (config.shift and res > ws) else 0
        # Paper: silent on the last stage. Here: no cross-window block there, because at the
        # paper's resolutions it is one window (one token to attend to), and Table 2's parameter
        # counts only fit without it (36.3 / 65.7 / 115.9 M with it).
        out.append((res, config.embed_dim * 2 ** i, ws, shift, config.cross_window and i < 3))
    return out


def valid_image_size(config: MITrConfig, side: int) -> bool:
    if side % config.patch_size or side // config.patch_size % 8:
        return False
    ws = [g[2] for g in stage_geometry(config)]           # windows are fixed when the model is built
    return all((side // config.patch_size // 2 ** i) % ws[i] == 0 for i in range(4))


# -----------------------------------------------------------------------------
# Windows (Fig. 3): partition, reverse, relative positions, the shifted-window mask

def window_partition(x, ws):
    """(B, H, W, C) -> (B*nW, ws*ws, C), windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C)                   # (B, nH, ws, nW_, ws, C)
    x = x.permute(0, 1, 3, 2, 4, 5)                               # (B, nH, nW_, ws, ws, C)
    return x.reshape(-1, ws * ws, C)                              # (B*nW, ws*ws, C)


def window_reverse(windows, ws, H, W):
    """(B*nW, ws*ws, C) -> (B, H, W, C); the inverse of window_partition."""
    C = windows.shape[-1]
    x = windows.view(-1, H // ws, W // ws, ws, ws, C)             # (B, nH, nW_, ws, ws, C)
    x = x.permute(0, 1, 3, 2, 4, 5)                               # (B, nH, ws, nW_, ws, C)
    return x.reshape(-1, H, W, C)                                 # (B, H, W, C)


def relative_position_index(ws):
    """(ws*ws, ws*ws) index into a ((2ws-1)^2, heads) bias table, as Swin builds it."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij"))
    coords = coords.flatten(1)                                    # (2, ws*ws)
    rel = coords[:, :, None] - coords[:, None, :]                 # (2, N, N), each in [-(ws-1), ws-1]
    rel = rel + (ws - 1)                                          # shift to [0, 2ws-2]
    return rel[0] * (2 * ws - 1) + rel[1]                         # (N, N)


def shifted_window_mask(H, W, ws, shift):
    """(nW, ws*ws, ws*ws) additive mask, -inf between tokens that the cyclic shift made neighbours.

    After torch.roll by -shift, the last windows of each row/column hold pixels from both borders.
    Label the 3x3 regions of the rolled map; tokens with different labels may not attend."""
    labels = torch.zeros(1, H, W, 1)
    cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    for n, (hs, wss) in enumerate((h, w) for h in cuts for w in cuts):   # 9 regions, not windows
        labels[:, hs, wss, :] = n
    labels = window_partition(labels, ws).squeeze(-1)             # (nW, ws*ws)
    differ = labels[:, None, :] != labels[:, :, None]             # (nW, N, N)
    return torch.zeros(differ.shape).masked_fill(differ, float("-inf"))


# -----------------------------------------------------------------------------
# Pixel attention (Fig. 3a, Eq. 1-2)

class PixelAttention(nn.Module):
    """Multi-head self-attention inside each ws x ws window, with Swin's relative position bias.

    The object-aware token, when given, is appended to every window (one extra key/query); its
    outputs from the windows are averaged. At the paper's resolutions the last stage is a single
    window, so the token simply joins global attention over the 7x7 (or 12x12) map."""

    def __init__(self, dim, window_size, num_heads, pos_embed=True):
        super().__init__()
        self.ws, self.heads = window_size, num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        if pos_embed:
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros((2 * window_size - 1) ** 2, num_heads))
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
            self.register_buffer("relative_position_index",
                                 relative_position_index(window_size), persistent=False)
        else:
            self.relative_position_bias_table = None

    def attention_bias(self, mask, nW, token):
        """Relative position bias + shift mask -> (1, nW*heads, L, L), or None."""
        N = self.ws * self.ws
        bias = None
        if self.relative_position_bias_table is not None:
            bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
            bias = bias.view(N, N, self.heads).permute(2, 0, 1)[None]      # (1, heads, N, N)
        if mask is not None:
            bias = mask[:, None] if bias is None else bias + mask[:, None]   # (nW, heads|1, N, N)
        if bias is None:
            return None
        if token:
            # Paper: silent on how the token is positioned. Here: no bias to or from it (zeros).
            bias = F.pad(bias, (0, 1, 0, 1))                          # (.., N+1, N+1)
        L = bias.shape[-1]
        return bias.expand(nW, self.heads, L, L).reshape(1, nW * self.heads, L, L)

    def forward(self, windows, batch, mask=None, token=None):
        """windows (B*nW, N, C), mask (nW, N, N) or None, token (B, 1, C) or None."""
        BnW, N, C = windows.shape
        nW, h = BnW // batch, self.heads
        if token is not None:
            tok = token[:, None].expand(batch, nW, 1, C).reshape(BnW, 1, C)  # (B,1,C) -> (B*nW,1,C)
            windows = torch.cat([windows, tok], dim=1)            # (B*nW, N+1, C)
        L = windows.shape[1]
        # Windows are folded into the head axis so that one (1, nW*heads, L, L) bias broadcasts
        # over the batch: a single fused attention call for all windows, heads and images.
        qkv = self.qkv(windows).view(batch, nW, L, 3, h, C // h)   # (B, nW, L, 3, h, d)
        qkv = qkv.permute(3, 0, 1, 4, 2, 5).reshape(3, batch, nW * h, L, C // h)  # (3, B, nW*h, L, d)
        q, k, v = qkv.unbind(0)
        bias = self.attention_bias(mask, nW, token is not None)
        bias = None if bias is None else bias.to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)   # softmax(qk^T/sqrt(d) + B) v
        x = x.view(batch, nW, h, L, C // h).transpose(2, 3).reshape(BnW, L, C)  # (B*nW, L, C)
        x = self.proj(x)
        if token is None:
            return x, None
        return x[:, :N], x[:, N:].reshape(batch, nW, 1, C).mean(1)  # (B*nW, N, C), (B, 1, C)


class MLP(nn.Module):
    def __init__(self, dim, ratio):
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * ratio))
        self.fc2 = nn.Linear(int(dim * ratio), dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch of a sample with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class PixelBlock(nn.Module):
    """Eq. 1-2 (a Swin block): x' = x + PA(LN(x)); x'' = x' + MLP(LN(x')); shifted when shift > 0."""

    def __init__(self, dim, heads, ws, shift, cfg: MITrConfig, dpr=0.0):
        super().__init__()
        self.ws, self.shift, self.dpr = ws, shift, dpr
        self.norm1 = nn.LayerNorm(dim)
        self.pixel_attention = PixelAttention(dim, ws, heads, cfg.pos_embed)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, cfg.mlp_ratio)
        self._masks = {}                          # shifted-window masks, computed once per size

    def mask(self, H, W, device):
        if not self.shift:
            return None
        key = (H, W, str(device))
        if key not in self._masks:
            self._masks[key] = shifted_window_mask(H, W, self.ws, self.shift).to(device)
        return self._masks[key]

    def forward(self, x, H, W, token=None):
        """x (B, H*W, C), token (B, 1, C) or None."""
        B, _, C = x.shape
        y = self.norm1(x).view(B, H, W, C)                        # (B, H*W, C) -> (B, H, W, C)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = window_partition(y, self.ws)                          # (B*nW, ws*ws, C)
        t = None if token is None else self.norm1(token)
        y, t = self.pixel_attention(y, B, self.mask(H, W, x.device), t)
        y = window_reverse(y, self.ws, H, W)                      # (B, H, W, C)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + drop_path(y.reshape(B, H * W, C), self.dpr, self.training)        # Eq. (1)
        x = x + drop_path(self.mlp(self.norm2(x)), self.dpr, self.training)       # Eq. (2)
        if token is not None:
            token = token + drop_path(t, self.dpr, self.training)                  # Eq. (1), token
            token = token + drop_path(self.mlp(self.norm2(token)), self.dpr, self.training)  # Eq. (2)
        return x, token


# -----------------------------------------------------------------------------
# Cross-window attention (Fig. 3b, Eq. 3-4)

class CrossWindowAttention(nn.Module):
    """Self-attention among the windows of one channel.

    Each ws x ws window of a channel is unfolded into one token of length ws^2; the nW tokens of a
    channel attend to each other (one head, embedding ws^2, shared by all channels and without
    position bias, as in the authors' sibling code CAT). Its weights are ws^2 x ws^2 matrices, so
    its parameters scale with ws^4 (Eq. 10) and its cost is linear in C (Eq. 9)."""

    def __init__(self, window_size):
        super().__init__()
        self.ws = window_size
        n = window_size * window_size
        self.qkv = nn.Linear(n, 3 * n)
        self.proj = nn.Linear(n, n)

    def forward(self, x):
        """x (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        ws, nh, nw = self.ws, H // self.ws, W // self.ws
        t = x.view(B, nh, ws, nw, ws, C)                           # (B, nh, ws, nw, ws, C)
        # One sequence per (image, channel); the head axis of 1 keeps q, k, v 4-D, which the fused
        # attention kernels require (3-D input falls back to the slow math path).
        t = t.permute(0, 5, 1, 3, 2, 4).reshape(B * C, 1, nh * nw, ws * ws)  # (B*C, 1, nW, ws*ws)
        q, k, v = self.qkv(t).chunk(3, dim=-1)                     # 3 x (B*C, 1, nW, ws*ws)
        t = F.scaled_dot_product_attention(q, k, v)                # windows attend to windows
        t = self.proj(t)                                           # (B*C, 1, nW, ws*ws)
        t = t.view(B, C, nh, nw, ws, ws).permute(0, 2, 4, 3, 5, 1)  # (B, nh, ws, nw, ws, C)
        return t.reshape(B, H, W, C)


class CrossWindowBlock(nn.Module):
    """Eq. 3-4: x' = x + CWA(LN(x)); x'' = x' + MLP(LN(x'))."""

    def __init__(self, dim, ws, cfg: MITrConfig, dpr=0.0):
        super().__init__()
        self.dpr = dpr
        self.norm1 = nn.LayerNorm(dim)
        self.cross_window_attention = CrossWindowAttention(ws)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, cfg.mlp_ratio)

    def forward(self, x, H, W):
        B, L, C = x.shape
        y = self.cross_window_attention(self.norm1(x).view(B, H, W, C))   # (B, H, W, C)
        x = x + drop_path(y.view(B, L, C), self.dpr, self.training)          # Eq. (3)
        return x + drop_path(self.mlp(self.norm2(x)), self.dpr, self.training)  # Eq. (4)


# -----------------------------------------------------------------------------
# Fig. 2: patch embedding, stages, space-to-depth, object-aware token, heads

class PatchEmbed(nn.Module):
    """Convolutional projection of P x P patches to C channels: (B, 3, H, W) -> (B, H/P*W/P, C)."""

    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.proj(x)                                           # (B, C, H/P, W/P)
        return self.norm(x.flatten(2).transpose(1, 2))             # (B, H/P*W/P, C)


class SpaceToDepth(nn.Module):
    """Resolution / 2 each side, channels x 2 (Section 3.1.1).

    Paper: cites PiT's pooling [11] for "space to depth". Here: Swin's patch merging (each 2x2
    neighbourhood concatenated to 4C, LayerNorm, linear 4C -> 2C without bias), because Table 2's
    parameter counts and the ImageNet-pretrained weights of Section 4.1 both point to Swin's."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x, H, W):
        B, _, C = x.shape
        x = x.view(B, H // 2, 2, W // 2, 2, C)                     # (B, H/2, dh, W/2, dw, C)
        # Swin's concat order is (dh, dw) = (0,0), (1,0), (0,1), (1,1): dw is the slower index.
        x = x.permute(0, 1, 3, 4, 2, 5).reshape(B, H * W // 4, 4 * C)  # (B, H/2*W/2, 4C)
        return self.reduction(self.norm(x))                        # (B, H/2*W/2, 2C)


class Stage(nn.Module):
    """One of Fig. 2's four layers: `depth` units of (W-MSA, SW-MSA[, cross-window]) blocks, then
    space-to-depth (except after the last). Swin's checkpoint keys map one-to-one:
    layers.i.blocks.j -> stages.i.pixel_blocks.j, layers.i.downsample -> stages.i.space_to_depth."""

    def __init__(self, cfg: MITrConfig, i, dprs):
        super().__init__()
        res, dim, ws, shift, cwa = stage_geometry(cfg)[i]
        self.depth = cfg.depths[i]
        heads = cfg.num_heads[i]
        dpr = iter(dprs)
        self.pixel_blocks, self.cross_window_blocks = nn.ModuleList(), nn.ModuleList()
        for _ in range(self.depth):
            self.pixel_blocks.append(PixelBlock(dim, heads, ws, 0, cfg, next(dpr)))
            self.pixel_blocks.append(PixelBlock(dim, heads, ws, shift, cfg, next(dpr)))
            if cwa:
                self.cross_window_blocks.append(CrossWindowBlock(dim, ws, cfg, next(dpr)))
        self.space_to_depth = SpaceToDepth(dim) if i < 3 else None

    def forward(self, x, H, W, token=None):
        for u in range(self.depth):
            x, token = self.pixel_blocks[2 * u](x, H, W, token)       # W-MSA, Eq. 1-2
            x, token = self.pixel_blocks[2 * u + 1](x, H, W, token)   # SW-MSA, Eq. 1-2
            if self.cross_window_blocks:
                x = self.cross_window_blocks[u](x, H, W)               # CWA, Eq. 3-4
        if self.space_to_depth is not None:
            x = self.space_to_depth(x, H, W)
        return x, token


class ArcHead(nn.Module):
    """Eq. 13's class head: logits = s * cos(theta_ij), theta the angle between feature x_i and
    class weight W_j; no bias. sigmoid(logits) is the paper's p_ij."""

    def __init__(self, dim, num_classes, s=8.0):
        super().__init__()
        self.s = s
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x):
        # Paper: p = 1 / (1 + e^{s cos theta}). Here: p = sigmoid(s cos theta) = 1 / (1 + e^{-s cos
        # theta}), because as printed p would fall as the feature turns towards its class.
        cos = F.normalize(x.float(), dim=-1) @ F.normalize(self.weight.float(), dim=-1).t()
        return self.s * cos                                        # Eq. (13), (B, n) logits


class MITr(nn.Module):
    """images (B, 3, H, W) -> (class_logits (B, n), count_logits (B, n+1) or None)."""

    def __init__(self, config: MITrConfig, num_classes: int):
        super().__init__()
        self.config, self.num_classes = config, num_classes
        cfg = config
        geometry = stage_geometry(cfg)
        n_blocks = [d * (2 + g[4]) for d, g in zip(cfg.depths, geometry)]
        total = sum(n_blocks)
        dprs = [cfg.drop_path * k / max(total - 1, 1) for k in range(total)]   # Swin's linear schedule
        starts = [sum(n_blocks[:i]) for i in range(4)]

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        self.stages = nn.ModuleList(
            Stage(cfg, i, dprs[starts[i]:starts[i] + n_blocks[i]]) for i in range(4))
        dim = cfg.embed_dim * 8
        self.norm = nn.LayerNorm(dim)
        # Eq. 11 (linear) or Eq. 13 (arc) on the average-pooled pixel tokens.
        self.head = ArcHead(dim, num_classes, cfg.arc_scale) if cfg.arc_sigmoid else nn.Linear(dim, num_classes)
        if cfg.object_token:
            # Section 3.2.2: a learned token stacked to the last layer; its head classifies the number
            # of distinct classes z in 0..n (Eq. 17). Paper: "followed by MLP". Here: one linear layer.
            self.object_token = nn.Parameter(torch.zeros(1, 1, dim))
            nn.init.trunc_normal_(self.object_token, std=0.02)
            self.count_head = nn.Linear(dim, num_classes + 1)
        else:
            self.object_token, self.count_head = None, None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):                               # Swin's initialisation
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def check_size(self, H, W):
        cfg = self.config
        if not (valid_image_size(cfg, H) and valid_image_size(cfg, W)):
            ok = [s for s in range(cfg.patch_size, 4 * cfg.img_size + 1, cfg.patch_size)
                  if valid_image_size(cfg, s)][:4]
            raise ValueError(f"MITr (P={cfg.patch_size}, ws={cfg.window_size}, built for "
                             f"{cfg.img_size}) cannot take a {H}x{W} image: every stage must hold a "
                             f"whole number of windows. Sides that work: {', '.join(map(str, ok))}, ...")

    def forward_tokens(self, images):
        """images (B, 3, H, W) -> (normed pixel tokens (B, h*w, 8C), normed object token (B, 1, 8C) or None)."""
        B, _, H, W = images.shape
        self.check_size(H, W)
        x = self.patch_embed(images)                               # (B, H/P*W/P, C)
        H, W = H // self.config.patch_size, W // self.config.patch_size
        token = None
        for i, stage in enumerate(self.stages):
            if i == 3 and self.object_token is not None:
                token = self.object_token.expand(B, -1, -1)        # (B, 1, 8C)
            x, token = stage(x, H, W, token)
            if i < 3:
                H, W = H // 2, W // 2
        return self.norm(x), (None if token is None else self.norm(token))

    def forward_features(self, images):
        """Pooled feature (B, 8C) that the class head reads."""
        return self.forward_tokens(images)[0].mean(1)              # average pooling over tokens

    def forward(self, images):
        x, token = self.forward_tokens(images)
        class_logits = self.head(x.mean(1))                        # Eq. (11) or Eq. (13), (B, n)
        count_logits = None if token is None else self.count_head(token[:, 0])   # Eq. (17), (B, n+1)
        return class_logits, count_logits


# -----------------------------------------------------------------------------
# Section 3.1.3: cost. FLOPs here are multiply-adds (MACs), as the paper and Swin count them.

def analytic_flops(config: MITrConfig, num_classes: int = 80, img_size: int | None = None):
    """Eq. 5, 7, 9 per block plus the layers between them -> {part: MACs}.

    Eq. 7 (pixel attention):  4hwC^2 (q, k, v, output projections) + 2 ws^2 hwC (QK^T and AV).
    Eq. 9 (cross-window):     4hw ws^2 C + 2 (hw)^2 C / ws^2.
      Paper: prints the first term as "4 h w_s^2 C". Here: 4 h w w_s^2 C, because each of the hw/ws^2
      window tokens of each of the C channels goes through four ws^2 x ws^2 projections.
    Eq. 5 (global attention, for comparison only): 4hwC^2 + 2(hw)^2 C.
    Each block's MLP adds 2 * ratio * hwC^2 (8hwC^2 at ratio 4)."""
    cfg = config
    img = img_size or cfg.img_size
    flops = {"patch_embed": (img // cfg.patch_size) ** 2 * 3 * cfg.patch_size ** 2 * cfg.embed_dim}
    for i, (res, C, ws, _, cwa) in enumerate(stage_geometry(cfg, img)):
        hw = res * res
        mlp = 2 * cfg.mlp_ratio * hw * C * C
        pa = 4 * hw * C * C + 2 * ws * ws * hw * C                 # Eq. (7)
        if i == 3 and cfg.object_token:                            # one more token in every window
            nW, L = hw // (ws * ws), ws * ws + 1
            pa = nW * (4 * L * C * C + 2 * L * L * C) + 2 * cfg.mlp_ratio * C * C
        cw = 4 * hw * ws * ws * C + 2 * hw * hw * C / (ws * ws)    # Eq. (9)
        stage = cfg.depths[i] * (2 * (pa + mlp) + (cw + mlp if cwa else 0))
        if i < 3:
            stage += (hw // 4) * 4 * C * 2 * C                     # space-to-depth
        flops[f"stage{i + 1}"] = stage
    dim = cfg.embed_dim * 8
    flops["heads"] = dim * num_classes + (dim * (num_classes + 1) if cfg.object_token else 0)
    return flops


def count_flops(model: nn.Module, img_size: int | None = None, batch: int = 1):
    """FLOPs counted by torch.utils.flop_counter for one forward pass -> {module path: MACs}.

    FlopCounterMode counts a multiply-add as 2 FLOPs; we halve it. It does not see the CPU's fused
    attention kernel, so attention runs on the math backend (plain matmuls) while counting."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    img = img_size or model.config.img_size
    x = torch.zeros(batch, 3, img, img, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    # (Not under no_grad: FlopCounterMode's module tracker asserts on grad-less inputs there.)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    counts = counter.get_flop_counts()
    return {k: sum(v.values()) / 2 / batch for k, v in counts.items()}


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def summary(model: MITr, img_size: int | None = None, counted: bool = True) -> str:
    """A per-stage table: token grid, channels, windows, parameters, analytic and counted GFLOPs."""
    cfg = model.config
    img = img_size or cfg.img_size
    analytic = analytic_flops(cfg, model.num_classes, img)
    measured = count_flops(model, img) if counted else {}
    root = type(model).__name__
    rows = [("part", "tokens", "C", "windows", "params(M)", "GFLOPs(Eq.)", "GFLOPs(counted)")]
    parts = [("patch_embed", f"{img // cfg.patch_size}^2", cfg.embed_dim, "-", model.patch_embed)]
    for i, (res, C, ws, shift, cwa) in enumerate(stage_geometry(cfg, img)):
        blocks = f"{(res // ws) ** 2}x{ws}^2" + (" shift" if shift else "") + (" +CWA" if cwa else "")
        parts.append((f"stage{i + 1}", f"{res}^2", C, blocks, model.stages[i]))
    heads = nn.ModuleList([m for m in (model.norm, model.head, model.count_head) if m is not None])
    parts.append(("heads", "-", cfg.embed_dim * 8, "-", heads))
    for name, tokens, C, windows, module in parts:
        params = num_params(module) + (model.object_token.numel() if name == "stage4" and model.object_token is not None else 0)
        if name == "heads":
            got = sum(measured.get(f"{root}.{n}", 0) for n in ("norm", "head", "count_head"))
        elif name.startswith("stage"):
            got = measured.get(f"{root}.stages.{int(name[5:]) - 1}")
        else:
            got = measured.get(f"{root}.{name}")
        rows.append((name, tokens, C, windows, f"{params / 1e6:.2f}", f"{analytic[name] / 1e9:.3f}",
                     "-" if not counted else f"{got / 1e9:.3f}"))
    total_a = sum(analytic.values())
    rows.append(("total", "", "", "", f"{num_params(model) / 1e6:.2f}", f"{total_a / 1e9:.3f}",
                 "-" if not counted else f"{measured[root] / 1e9:.3f}"))
    widths = [max(len(str(r[c])) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).rjust(w) for v, w in zip(r, widths)) for r in rows)


# -----------------------------------------------------------------------------
# Section 4.1: initialising from ImageNet-pretrained Swin
#
# Paper: "We pretrain MITr on ImageNet-22K", i.e. the whole model, cross-window blocks included.
# Here: MITr starts from the public Swin ImageNet checkpoints (s <- Swin-T, m <- Swin-S,
# l <- Swin-B) and its cross-window blocks, object token and heads start fresh, because MITr's own
# ImageNet weights were never released and the pixel-attention path of each variant is that Swin.

# MITr's own parameters that no Swin checkpoint holds: they start fresh (see MITr._init_weights).
_SWIN_FRESH = ("object_token", "count_head.", "head.")


def _swin_fresh(name):
    return ".cross_window_blocks." in name or name.startswith(_SWIN_FRESH)


def _swin_state_dict(path_or_state_dict):
    """A file path or a dict -> a flat {key: tensor} dict (unwraps "model"/"state_dict", "module.")."""
    sd = path_or_state_dict
    if not isinstance(sd, dict):
        try:
            sd = torch.load(sd, map_location="cpu", weights_only=True)
        except Exception as e:   # FileNotFoundError, UnpicklingError (non-tensor objects), ...
            raise ValueError(f"load_swin: cannot read '{sd}' as a Swin checkpoint ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); expected a .pth holding a state "
                             f"dict or {{'model': state_dict}} of tensors only") from e
    for wrapper in ("model", "state_dict"):
        if isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
            break
    if sd and all(k.startswith("module.") for k in sd):                # saved from DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError("load_swin: the checkpoint is not a state dict of tensors "
                         "(expected keys like 'layers.0.blocks.0.attn.qkv.weight')")
    return sd


def _swin_layout(sd):
    """The official release puts patch merging at the END of stage i (layers.i.downsample, so
    layers.0 has one); timm at the START of stage i+1 (layers.{i+1}.downsample, layers.0 has none)."""
    if any(k.startswith("layers.0.downsample.") for k in sd):
        return "official"
    if any(k.startswith("layers.") and ".downsample." in k for k in sd):
        return "timm"
    return "official"       # no patch merging at all: the two layouts name everything else alike


def _swin_key(key, layout):
    """Swin key -> MITr key, or None for keys we drop on purpose (buffers, the ImageNet head).

    layers.i.blocks.j.attn.* -> stages.i.pixel_blocks.j.pixel_attention.*
    layers.i.blocks.j.*      -> stages.i.pixel_blocks.j.*
    layers.i.downsample.*    -> stages.i.space_to_depth.*     (official; timm: i-1)

    The 4C order of patch merging is the same in both layouts, so its weights move unchanged:
    the official PatchMerging concatenates x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2],
    x[1::2, 1::2]; timm's (timm/models/swin_transformer.py, PatchMerging.forward, timm 1.0.31)
    reshapes to (B, H/2, 2, W/2, 2, C) and permutes to (0, 1, 3, 4, 2, 5), i.e. (dh, dw) = (0,0),
    (1,0), (0,1), (1,1), the same order, and its checkpoint_filter_fn only renames the keys.
    MITr's SpaceToDepth uses that order too."""
    parts = key.split(".")
    if parts[-1] in ("relative_position_index", "attn_mask") or parts[0] == "head":
        return None                      # buffers rebuilt by the model; head: 1000 / 21841 classes
    if parts[0] != "layers" or len(parts) < 5 or not parts[1].isdigit():
        return key                       # patch_embed.*, norm.* keep their names; others won't match
    i = int(parts[1])
    if parts[2] == "downsample":
        return ".".join(["stages", str(i - (layout == "timm")), "space_to_depth", *parts[3:]])
    if parts[2] == "blocks":
        rest = ["pixel_attention" if parts[4] == "attn" else parts[4], *parts[5:]]
        return ".".join(["stages", str(i), "pixel_blocks", parts[3], *rest])
    return key


def _resize_bias_table(table, side):
    """((2w'-1)^2, heads) -> (side^2, heads), bicubic per head, as Swin's fine-tuning code
    (utils.load_pretrained) does when the window changes (7 -> 12: 13x13 -> 23x23)."""
    L, heads = table.shape
    s = math.isqrt(L)
    t = table.float().t().reshape(1, heads, s, s)                  # (L, heads) -> (1, heads, s, s)
    t = F.interpolate(t, size=(side, side), mode="bicubic", align_corners=False)  # (1, heads, side, side)
    return t.reshape(heads, side * side).t().to(table.dtype)       # (side^2, heads)


def _first(names, k=3):
    names = list(names)
    more = f" (+{len(names) - k} more)" if len(names) > k else ""
    return ", ".join(names[:k]) + more


def load_swin(model: MITr, path_or_state_dict, strict: bool = True) -> dict:
    """Load an ImageNet-pretrained Swin into MITr's pixel-attention path; return a report.

    Accepts the official release (.pth with "model") and timm's state dict; the layout is detected
    from where patch merging sits. MITr-s takes Swin-T, m Swin-S, l Swin-B. Bias tables of another
    window size are resized. Cross-window blocks, object token and heads stay freshly initialised.

    Report: lists of names -
      loaded      MITr tensors that got checkpoint weights (resized ones included)
      resized     of those, relative-position bias tables resized to this model's window
      new         MITr tensors left as initialised (cross-window blocks, object token, heads)
      unexpected  checkpoint keys with no place in this MITr
      mismatched  checkpoint keys whose MITr tensor has another shape (not a resizable table)
      skipped     checkpoint keys dropped on purpose (index/mask buffers, the ImageNet head)
    plus "layout" ("official" or "timm") and "notes" (lines for humans).
    strict=True raises ValueError, before touching the model, on any unexpected or mismatched key
    and on any pixel-path tensor the checkpoint lacks (a wrong Swin for this variant)."""
    sd = _swin_state_dict(path_or_state_dict)
    layout = _swin_layout(sd)
    target = model.state_dict()                  # persistent tensors only (no index / mask buffers)
    pos_embed = model.config.pos_embed
    report = {"layout": layout, "loaded": [], "resized": [], "new": [], "unexpected": [],
              "mismatched": [], "skipped": [], "notes": []}
    new_sd, resizes, wrong_shape = {}, set(), set()
    for key, value in sd.items():
        name = _swin_key(key, layout)
        if name is None or (not pos_embed and key.endswith("relative_position_bias_table")):
            report["skipped"].append(key)        # (pos_embed off: Table 5's ablation has no bias table)
            continue
        if name not in target:
            report["unexpected"].append(key)
            continue
        want = target[name].shape
        if value.shape != want and name.endswith("relative_position_bias_table") and value.dim() == 2 \
                and value.shape[1] == want[1] and math.isqrt(value.shape[0]) ** 2 == value.shape[0]:
            side = math.isqrt(want[0])
            resizes.add((math.isqrt(value.shape[0]), side))
            value = _resize_bias_table(value, side)
            report["resized"].append(name)
        if value.shape != want:
            report["mismatched"].append(f"{key} {tuple(value.shape)} vs {name} {tuple(want)}")
            wrong_shape.add(name)
            continue
        new_sd[name] = value
    report["loaded"] = [n for n in target if n in new_sd]
    report["new"] = [n for n in target if n not in new_sd]
    missing = [n for n in report["new"] if not _swin_fresh(n) and n not in wrong_shape]
    if layout == "timm":
        report["notes"].append("timm layout: layers.{i+1}.downsample -> stages.i.space_to_depth "
                               "(same 4C order, no permutation)")
    for s1, s2 in sorted(resizes):
        w1, w2 = (s1 + 1) // 2, (s2 + 1) // 2
        report["notes"].append(f"bias tables resized bicubically {s1}x{s1} -> {s2}x{s2} "
                               f"(window {w1} -> {w2})")
    if missing:
        report["notes"].append(f"checkpoint lacks {len(missing)} pixel-path tensors: {_first(missing)}")

    problems = []
    if report["unexpected"]:
        problems.append(f"{len(report['unexpected'])} checkpoint key(s) have no place in this MITr: "
                        f"{_first(report['unexpected'])}")
    if report["mismatched"]:
        problems.append(f"{len(report['mismatched'])} shape mismatch(es): {_first(report['mismatched'], 2)}")
    if missing:
        problems.append(f"the checkpoint lacks {len(missing)} pixel-path tensor(s): {_first(missing)}")
    if strict and problems:
        cfg = model.config
        raise ValueError(f"load_swin: {'; '.join(problems)}. This MITr has C={cfg.embed_dim}, units "
                         f"{tuple(cfg.depths)}, heads {tuple(cfg.num_heads)}: MITr-s takes Swin-T, m "
                         f"Swin-S, l Swin-B. To load the rest anyway pass strict=False "
                         f"(train.py --init-nonstrict).")
    model.load_state_dict(new_sd, strict=False)
    return report


def _swin_units(names):
    """Tensor names -> the modules they belong to, in order: stages.0.pixel_blocks.1.norm1.weight ->
    stages.0.pixel_blocks.1; checkpoint buffers -> their kind (attn_mask, relative_position_index)."""
    out = {}
    for n in names:
        p = n.split(".")
        if p[-1] in ("relative_position_index", "attn_mask"):
            u = p[-1]
        elif p[0] in ("stages", "layers") and len(p) > 4 and p[2].endswith("blocks"):
            u = ".".join(p[:4])
        elif p[0] in ("stages", "layers") and len(p) > 3:
            u = ".".join(p[:3])
        else:
            u = p[0]
        out[u] = out.get(u, 0) + 1
    return [u if c == 1 or u.startswith(("stages", "layers")) else f"{u} x{c}" for u, c in out.items()]


def format_swin_report(report: dict) -> str:
    """The report of load_swin on a few lines: counts, then the first modules of each group."""
    r = report
    lines = [f"Swin init ({r['layout']} layout): {len(r['loaded'])} tensors loaded "
             f"({len(r['resized'])} resized), {len(r['new'])} new, {len(r['skipped'])} skipped, "
             f"{len(r['unexpected'])} unexpected, {len(r['mismatched'])} mismatched"]
    for group in ("loaded", "resized", "new", "skipped"):
        if r[group]:
            lines.append(f"  {group + ':':11s} {_first(_swin_units(r[group]), 4)}")
    for group in ("unexpected", "mismatched"):                     # these the user must read in full
        if r[group]:
            lines.append(f"  {group + ':':11s} {_first(r[group], 3)}")
    lines += [f"  note: {n}" for n in r["notes"]]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description="Print MITr's per-stage table: shapes, parameters, FLOPs.")
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="s")
    ap.add_argument("--num-classes", type=int, default=80)
    ap.add_argument("--img-size", type=int, default=None)
    args = ap.parse_args()
    model = MITr(VARIANTS[args.variant], args.num_classes)
    print(f"MITr-{args.variant}  {VARIANTS[args.variant]}")
    print(summary(model, args.img_size))
    if args.variant in TABLE2_PARAMS_M:
        print(f"Table 2 reports {TABLE2_PARAMS_M[args.variant]}M parameters; "
              f"this model has {num_params(model) / 1e6:.1f}M with {args.num_classes} classes.")


if __name__ == "__main__":
    main()
