"""MlTr, the Multi-label Transformer of Cheng et al., 2021, as one readable file. The paper spells
it MlTr (lower-case L); its extracted text, and this code, say MITr. Read it beside the paper:

    Table 1 ............ MITrConfig, VARIANTS
    Fig. 3(a), Eq. 1-2 . window_partition, PixelAttention, PixelBlock   (in-window attention, shift)
    Fig. 3(b), Eq. 3-4 . CrossWindowAttention, CrossWindowBlock        (windows are the tokens)
    Fig. 3 ............. Stage: the "MITr block" is one unit W-MSA -> cross-window -> SW-MSA
    Fig. 2 ............. PatchEmbed -> Stage x4 (SpaceToDepth between) -> object-aware token -> heads
    Eq. 11, 13, 17 ..... the class head, linear or arc (arc_logits: s cos theta); the count head
    Eq. 5-10 ........... analytic_flops, count_flops, summary  (`python mitr.py --variant s`)
    Section 4.1 ........ load_swin: ImageNet-pretrained Swin into the pixel-attention path
    speed .............. bench  (`python mitr.py --bench --variant tiny`)

The block layout is the paper's silent part. One "block" of Table 1 is a unit of three sub-blocks:
a Swin block with plain windows (W-MSA), a cross-window block, a Swin block with shifted windows
(SW-MSA); the last stage holds only the two pixel blocks, which the object-aware token joins. This
reading reproduces Table 2's parameter counts (33 / 62 / 108 M; we get 31.6 / 61.0 / 107.5 M) and
makes the pixel-attention path of s, m, l exactly Swin-T, -S, -B: `stages[i].pixel_blocks[j]` is
Swin's `layers[i].blocks[j]`."""

import argparse
import copy
import functools
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# -- Table 1: the variants -------------------------------------------------------------------------
@dataclass
class MITrConfig:
    img_size: int = 224  # input resolution (Table 1)
    patch_size: int = 4  # P
    embed_dim: int = 96  # C, channels of stage 1; doubled by every space-to-depth
    window_size: int = 7  # w_s
    depths: tuple = (1, 1, 3, 1)  # Table 1's "block numbers in four layer" (units, see above)
    num_heads: tuple = (3, 6, 12, 24)  # pixel-attention heads per stage (Swin's; not in the paper)
    mlp_ratio: float = 4.0
    drop_path: float = 0.2  # stochastic depth, as the matching Swin (not in the paper)
    arc_scale: float = 8.0  # s of Eq. 13 (Section 4.1, Table 6)
    cross_window_between: bool = True  # unit order W-MSA, CWA, SW-MSA; False: W-MSA, SW-MSA, CWA
    # Table 5's ablation steps, all on by default ("fixed window" = all off):
    pos_embed: bool = True  # relative position bias in pixel attention
    shift: bool = True  # shifted windows in every second pixel block
    cross_window: bool = True  # cross-window blocks (Eq. 3-4)
    arc_sigmoid: bool = True  # class head s * cos(theta) (Eq. 13) instead of linear (Eq. 11)
    object_token: bool = True  # object-aware token and its count head (Eq. 17)


VARIANTS = {
    # Not from the paper: a CPU-sized model for demos, tests and the Shapes dataset, with MITr-s's
    # window layout (8, 4, 2, 1 windows per side in the four stages).
    "tiny": MITrConfig(
        img_size=96,
        embed_dim=32,
        window_size=3,
        depths=(1, 1, 1, 1),
        num_heads=(1, 2, 4, 8),
        drop_path=0.0,
    ),
    "s": MITrConfig(
        img_size=224,
        embed_dim=96,
        window_size=7,
        depths=(1, 1, 3, 1),  # Table 1
        num_heads=(3, 6, 12, 24),
        drop_path=0.2,
    ),
    "m": MITrConfig(
        img_size=384,
        embed_dim=96,
        window_size=12,
        depths=(1, 1, 9, 1),
        num_heads=(3, 6, 12, 24),
        drop_path=0.3,
    ),
    "l": MITrConfig(
        img_size=384,
        embed_dim=128,
        window_size=12,
        depths=(1, 1, 9, 1),
        num_heads=(4, 8, 16, 32),
        drop_path=0.5,
    ),
}
TABLE2_PARAMS_M = {"s": 33, "m": 62, "l": 108}  # Table 2, millions, 80 COCO classes


def stage_geometry(config: MITrConfig, img_size: int | None = None):
    """Per stage: (resolution, channels, window, shift, has_cross_window). Swin's rule: a window
    never exceeds the feature map, and a map that fits in one window is not shifted."""
    side, out = (img_size or config.img_size) // config.patch_size, []
    for i in range(4):
        res = side // 2**i
        ws = min(config.window_size, res)
        shift = ws // 2 if (config.shift and res > ws) else 0
        # Paper: silent on the last stage. Here: no cross-window block there, because Table 2's
        # parameter counts fit only without it (36.3 / 65.7 / 115.9 M with it). (In that stage's one
        # window the block would still mix each channel's positions linearly and run an MLP.)
        out.append((res, config.embed_dim * 2**i, ws, shift, config.cross_window and i < 3))
    return out


def valid_image_size(config: MITrConfig, side: int) -> bool:
    p, ws = (
        config.patch_size,
        [g[2] for g in stage_geometry(config)],
    )  # windows are fixed when built
    return (
        side % p == 0
        and side // p % 8 == 0
        and all(side // p // 2**i % ws[i] == 0 for i in range(4))
    )


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
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(
        1
    )  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :] + (ws - 1)  # (2, N, N), each in [0, 2ws-2]
    return rel[0] * (2 * ws - 1) + rel[1]  # (N, N)


@functools.lru_cache
def shifted_window_mask(H, W, ws, shift, device=None):
    """(nW, ws*ws, ws*ws) additive mask, -inf between tokens that the cyclic shift made neighbours
    (cached per size and device: do not modify). After torch.roll by -shift, the last windows of each
    row/column hold pixels from both borders. Label the 3x3 regions of the rolled map; tokens with
    different labels may not attend."""
    labels = torch.zeros(1, H, W, 1, device=device)
    cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    for n, (hs, wss) in enumerate((h, w) for h in cuts for w in cuts):  # 9 regions, not windows
        labels[:, hs, wss, :] = n
    labels = window_partition(labels, ws).squeeze(-1)  # (nW, ws*ws)
    differ = labels[:, None, :] != labels[:, :, None]  # (nW, N, N)
    return torch.zeros(differ.shape, device=device).masked_fill(differ, float("-inf"))


# -- Pixel attention (Fig. 3a, Eq. 1-2) ------------------------------------------------------------
class PixelAttention(nn.Module):
    """Multi-head self-attention inside each ws x ws window, with Swin's relative position bias.

    Paper: "+position embedding [10]" (Table 5). Here: Swin's relative position bias only, no
    absolute embedding (the authors' sibling code CAT adds one), because [10] is Swin, Table 5 names
    one position embedding, and a Swin without it is what load_swin can initialise.
    The object-aware token, when given, joins every window (one extra key/query); its outputs from
    the windows are averaged. At the paper's resolutions the last stage is one window anyway."""

    def __init__(self, dim, window_size, num_heads, pos_embed=True):
        super().__init__()
        self.ws, self.heads = window_size, num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.relative_position_bias_table = None
        if pos_embed:
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros((2 * window_size - 1) ** 2, num_heads)
            )
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
            self.register_buffer(
                "relative_position_index", relative_position_index(window_size), persistent=False
            )  # rebuilt, never saved or loaded

    def attention_bias(self, mask, nW, token, dtype):
        """Relative position bias + shift mask -> (1, nW*heads, L, L), or None."""
        N, bias = self.ws * self.ws, 0
        if self.relative_position_bias_table is not None:
            bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
            bias = bias.view(N, N, self.heads).permute(2, 0, 1)[None]  # (1, heads, N, N)
        if mask is not None:
            bias = bias + mask[:, None]  # (nW, heads|1, N, N)
        if not torch.is_tensor(bias):
            return None
        # Paper: silent on how the token is positioned. Here: no bias to or from it (zeros).
        bias = F.pad(bias, (0, 1, 0, 1)) if token else bias  # (.., N+1, N+1)
        L = bias.shape[-1]
        return bias.expand(nW, self.heads, L, L).reshape(1, nW * self.heads, L, L).to(dtype)

    def forward(self, windows, batch, mask=None, token=None):
        """windows (B*nW, N, C), mask (nW, N, N) or None, token (B, 1, C) or None."""
        BnW, N, C = windows.shape
        nW, h = BnW // batch, self.heads
        if token is not None:
            tok = token[:, None].expand(batch, nW, 1, C).reshape(BnW, 1, C)  # (B,1,C) -> (B*nW,1,C)
            windows = torch.cat([windows, tok], dim=1)  # (B*nW, N+1, C)
        L = windows.shape[1]
        # Windows are folded into the head axis so that one (1, nW*heads, L, L) bias broadcasts
        # over the batch: a single fused attention call for all windows, heads and images.
        qkv = self.qkv(windows).view(batch, nW, L, 3, h, C // h)  # (B, nW, L, 3, h, d)
        qkv = qkv.permute(3, 0, 1, 4, 2, 5).reshape(
            3, batch, nW * h, L, C // h
        )  # (3, B, nW*h, L, d)
        q, k, v = qkv.unbind(0)
        bias = self.attention_bias(mask, nW, token is not None, q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # softmax(qk^T/sqrt(d) + B) v
        x = x.view(batch, nW, h, L, C // h).transpose(2, 3).reshape(BnW, L, C)  # (B*nW, L, C)
        x = self.proj(x)  # (B*nW, L, C): pixels, then token
        return (x, None) if token is None else (x[:, :N], x[:, N:].reshape(batch, nW, 1, C).mean(1))


class MLP(nn.Module):
    def __init__(self, dim, ratio):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, int(dim * ratio)), nn.Linear(int(dim * ratio), dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch of a sample with probability p (one draw
    per sample and branch, whatever the sequence holds)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class PixelBlock(nn.Module):
    """Eq. 1-2 (a Swin block): x' = x + PA(LN(x)); x'' = x' + MLP(LN(x')); shifted when shift > 0."""

    def __init__(self, dim, heads, ws, shift, cfg: MITrConfig, dpr=0.0):
        super().__init__()
        self.ws, self.shift, self.dpr = ws, shift, dpr
        self.norm1, self.pixel_attention = (
            nn.LayerNorm(dim),
            PixelAttention(dim, ws, heads, cfg.pos_embed),
        )
        self.norm2, self.mlp = nn.LayerNorm(dim), MLP(dim, cfg.mlp_ratio)

    def forward(self, x, H, W, token=None):
        """x (B, H*W, C), token (B, 1, C) or None -> the same shapes."""
        B, L, C = x.shape
        y, mask = self.norm1(x).view(B, H, W, C), None  # (B, H*W, C) -> (B, H, W, C)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
            mask = shifted_window_mask(H, W, self.ws, self.shift, x.device)  # (nW, ws*ws, ws*ws)
        y = window_partition(y, self.ws)  # (B*nW, ws*ws, C)
        y, t = self.pixel_attention(y, B, mask, None if token is None else self.norm1(token))
        y = window_reverse(y, self.ws, H, W)  # (B, H, W, C)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        y = y.reshape(B, L, C)
        if token is not None:  # one sequence [token; pixels]: one stochastic-depth draw for both
            x, y = torch.cat([token, x], 1), torch.cat([t, y], 1)  # (B, 1+H*W, C)
        x = x + drop_path(y, self.dpr, self.training)  # Eq. (1)
        x = x + drop_path(self.mlp(self.norm2(x)), self.dpr, self.training)  # Eq. (2)
        return (x, None) if token is None else (x[:, 1:], x[:, :1])


# -- Cross-window attention (Fig. 3b, Eq. 3-4) -----------------------------------------------------
class CrossWindowAttention(nn.Module):
    """Self-attention among the windows of one channel.
    Each ws x ws window of a channel is unfolded into one token of length ws^2; the nW tokens of a
    channel attend to each other (one head, embedding ws^2, shared by all channels and without
    position bias, as in the authors' sibling code CAT). Its weights are ws^2 x ws^2 matrices, so
    its parameters scale with ws^4 (Eq. 10) and its cost is linear in C (Eq. 9)."""

    def __init__(self, window_size):
        super().__init__()
        self.ws, n = window_size, window_size * window_size
        self.qkv, self.proj = nn.Linear(n, 3 * n), nn.Linear(n, n)

    def forward(self, x):
        """x (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        ws, nh, nw = self.ws, H // self.ws, W // self.ws
        t = x.view(B, nh, ws, nw, ws, C)  # (B, nh, ws, nw, ws, C)
        # One sequence per (image, channel); the head axis of 1 keeps q, k, v 4-D, which the fused
        # attention kernels require (3-D input falls back to the slow math path).
        t = t.permute(0, 5, 1, 3, 2, 4).reshape(B * C, 1, nh * nw, ws * ws)  # (B*C, 1, nW, ws*ws)
        q, k, v = self.qkv(t).chunk(3, dim=-1)  # 3 x (B*C, 1, nW, ws*ws)
        t = F.scaled_dot_product_attention(q, k, v)  # windows attend to windows
        t = self.proj(t)  # (B*C, 1, nW, ws*ws)
        t = t.view(B, C, nh, nw, ws, ws).permute(0, 2, 4, 3, 5, 1)  # (B, nh, ws, nw, ws, C)
        return t.reshape(B, H, W, C)


class CrossWindowBlock(nn.Module):
    """Eq. 3-4: x' = x + CWA(LN(x)); x'' = x' + MLP(LN(x'))."""

    def __init__(self, dim, ws, cfg: MITrConfig, dpr=0.0):
        super().__init__()
        self.dpr, self.norm1, self.cross_window_attention = (
            dpr,
            nn.LayerNorm(dim),
            CrossWindowAttention(ws),
        )
        self.norm2, self.mlp = nn.LayerNorm(dim), MLP(dim, cfg.mlp_ratio)

    def forward(self, x, H, W):
        B, L, C = x.shape
        y = self.cross_window_attention(self.norm1(x).view(B, H, W, C))  # (B, H, W, C)
        x = x + drop_path(y.view(B, L, C), self.dpr, self.training)  # Eq. (3)
        return x + drop_path(self.mlp(self.norm2(x)), self.dpr, self.training)  # Eq. (4)


# -- Fig. 2: patch embedding, stages, space-to-depth, object-aware token, heads --------------------
class PatchEmbed(nn.Module):
    """Convolutional projection of P x P patches to C channels: (B, 3, H, W) -> (B, H/P*W/P, C)."""

    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj, self.norm = (
            nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size),
            nn.LayerNorm(dim),
        )

    def forward(self, x):
        x = self.proj(x)  # (B, C, H/P, W/P)
        return self.norm(x.flatten(2).transpose(1, 2))  # (B, H/P*W/P, C)


class SpaceToDepth(nn.Module):
    """Resolution / 2 each side, channels x 2 (Section 3.1.1).
    Paper: cites PiT's pooling [11] for "space to depth". Here: Swin's patch merging (each 2x2
    neighbourhood concatenated to 4C, LayerNorm, linear 4C -> 2C without bias), because Table 2's
    parameter counts and the ImageNet-pretrained weights of Section 4.1 both point to Swin's."""

    def __init__(self, dim):
        super().__init__()
        self.norm, self.reduction = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x, H, W):
        B, _, C = x.shape
        x = x.view(B, H // 2, 2, W // 2, 2, C)  # (B, H/2, dh, W/2, dw, C)
        # Swin's concat order is (dh, dw) = (0,0), (1,0), (0,1), (1,1): dw is the slower index.
        x = x.permute(0, 1, 3, 4, 2, 5).reshape(B, H * W // 4, 4 * C)  # (B, H/2*W/2, 4C)
        return self.reduction(self.norm(x))  # (B, H/2*W/2, 2C)


class Stage(nn.Module):
    """One of Fig. 2's four layers: `depth` MITr blocks (Fig. 3), then space-to-depth (not after
    the last). A MITr block, our "unit", is W-MSA -> cross-window -> SW-MSA (stage 4: W-MSA ->
    SW-MSA). Swin's keys map one-to-one: layers.i.blocks.j -> stages.i.pixel_blocks.j.
    Paper: "alternate between pixel attention and cross-window attention", "first makes a preliminary
    local judgment and then coordinates the global information". Here: cross-window between the plain
    and the shifted pixel block, because the authors' sibling code CAT (its cat_small is MITr-s's
    Table 1 row) builds units in-window -> cross-window -> in-window. cross_window_between=False: last."""

    def __init__(self, cfg: MITrConfig, i, dpr):
        super().__init__()
        res, dim, ws, shift, cwa = stage_geometry(cfg)[i]
        self.depth, self.between, heads = cfg.depths[i], cfg.cross_window_between, cfg.num_heads[i]
        self.pixel_blocks, self.cross_window_blocks = nn.ModuleList(), nn.ModuleList()
        for _ in range(self.depth):
            self.pixel_blocks.append(PixelBlock(dim, heads, ws, 0, cfg, next(dpr)))
            if cwa and self.between:
                self.cross_window_blocks.append(CrossWindowBlock(dim, ws, cfg, next(dpr)))
            self.pixel_blocks.append(PixelBlock(dim, heads, ws, shift, cfg, next(dpr)))
            if cwa and not self.between:
                self.cross_window_blocks.append(CrossWindowBlock(dim, ws, cfg, next(dpr)))
        self.space_to_depth = SpaceToDepth(dim) if i < 3 else None

    def forward(self, x, H, W, token=None):
        for u in range(self.depth):
            x, token = self.pixel_blocks[2 * u](x, H, W, token)  # W-MSA, Eq. 1-2
            if self.cross_window_blocks and self.between:
                x = self.cross_window_blocks[u](x, H, W)  # CWA, Eq. 3-4
            x, token = self.pixel_blocks[2 * u + 1](x, H, W, token)  # SW-MSA, Eq. 1-2
            if self.cross_window_blocks and not self.between:
                x = self.cross_window_blocks[u](x, H, W)
        return (
            x if self.space_to_depth is None else self.space_to_depth(x, H, W)
        ), token  # (B, H/2*W/2, 2C)


def arc_logits(x, weight, s):
    """Eq. 13's logits s * cos(theta_ij): features x (B, d), class weights (n, d) -> (B, n).
    Paper: p = 1 / (1 + e^{s cos theta}) (and Eq. 11: 1 / (1 + e^{x W^T + b})). Here: p =
    sigmoid(s cos theta) = 1 / (1 + e^{-s cos theta}), because as printed p would fall as the
    feature turns towards its class. In float32 with autocast off: bf16 logits are off by ~5e-3."""
    with torch.autocast(x.device.type, enabled=False):
        cos = F.normalize(x.float(), dim=-1) @ F.normalize(weight.float(), dim=-1).t()  # (B, n)
    return s * cos  # Eq. (13), within [-s, s]


class ArcHead(nn.Module):
    """Eq. 13's class head: a weight W_j per class, no bias; sigmoid(logits) is the paper's p_ij."""

    def __init__(self, dim, num_classes, s=8.0):
        super().__init__()
        self.s, self.weight = s, nn.Parameter(torch.empty(num_classes, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x):
        return arc_logits(x, self.weight, self.s)


class MITr(nn.Module):
    """images (B, 3, H, W) -> (class_logits (B, n), count_logits (B, n+1) or None)."""

    def __init__(self, config: MITrConfig, num_classes: int):
        super().__init__()
        cfg = self.config = config
        self.num_classes = num_classes
        init = torch.Generator().manual_seed(
            int(torch.randint(2**62, (), device="cpu"))
        )  # see end of __init__
        n_blocks = sum(d * (2 + g[4]) for d, g in zip(cfg.depths, stage_geometry(cfg)))
        dpr = iter(
            [cfg.drop_path * k / max(n_blocks - 1, 1) for k in range(n_blocks)]
        )  # Swin's, in run order
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        self.stages = nn.ModuleList(Stage(cfg, i, dpr) for i in range(4))
        dim = cfg.embed_dim * 8
        self.norm = nn.LayerNorm(dim)
        # Paper: the pooled pixel tokens are "followed by multi-layer perceptron (MLP)", the token
        # "by MLP directly". Here: one layer each, because Eq. 11 calls W "the final fully connected
        # layer" and Eq. 17 reads "the fully connected layer following object-aware token".
        self.head = (
            ArcHead(dim, num_classes, cfg.arc_scale)
            if cfg.arc_sigmoid
            else nn.Linear(dim, num_classes)
        )
        self.object_token, self.count_head = None, None
        if cfg.object_token:
            # Section 3.2.2's token, stacked to the last stage; its head classifies z in 0..n (Eq. 17).
            self.object_token = nn.Parameter(torch.zeros(1, 1, dim))
            nn.init.trunc_normal_(self.object_token, std=0.02)
            self.count_head = nn.Linear(dim, num_classes + 1)
        # Swin's init (patch embedding, LayerNorms: PyTorch's) drawn pixel path first, then cross-window, head,
        # token: for one seed, models that differ by Table 5's later switches start from the same weights.
        defaults = {m for m in self.modules() if isinstance(m, (nn.LayerNorm, nn.Conv2d))}
        order = lambda item: (
            ("cross_window" in item[0]) + 2 * item[0].startswith(("head", "object_token", "count"))
        )
        for name, p in sorted(self.named_parameters(), key=order):
            if self.get_submodule(name.rpartition(".")[0]) not in defaults:
                nn.init.trunc_normal_(
                    p, std=0.02, generator=init
                ) if p.dim() > 1 else nn.init.zeros_(p)

    def forward_tokens(self, images):
        """images (B, 3, H, W) -> (normed pixel tokens (B, h*w, 8C), normed object token (B, 1, 8C) or None)."""
        (B, _, H, W), cfg = images.shape, self.config
        if not (valid_image_size(cfg, H) and valid_image_size(cfg, W)):
            ok = [s for s in range(1, 4 * cfg.img_size + 1) if valid_image_size(cfg, s)][:4]
            raise ValueError(
                f"MITr (P={cfg.patch_size}, ws={cfg.window_size}, built for {cfg.img_size}) cannot "
                f"take a {H}x{W} image: every stage must hold a whole number of windows. Sides that "
                f"work: {', '.join(map(str, ok))}, ..."
            )
        x, token = self.patch_embed(images), None  # (B, H/P*W/P, C)
        H, W = H // cfg.patch_size, W // cfg.patch_size
        for i, stage in enumerate(self.stages):
            if i == 3 and self.object_token is not None:
                # repeat, not expand: under no_grad an expanded view of a parameter requires grad
                # but has no grad_fn, which FlopCounterMode's module tracker rejects.
                token = self.object_token.repeat(B, 1, 1)  # (B, 1, 8C)
            x, token = stage(x, H, W, token)
            H, W = H // 2, W // 2  # the next stage's map
        return self.norm(x), (None if token is None else self.norm(token))

    def forward(self, images):
        x, token = self.forward_tokens(images)  # average pooling over pixel tokens:
        class_logits = self.head(x.mean(1))  # Eq. (11) or Eq. (13), (B, n)
        count_logits = None if token is None else self.count_head(token[:, 0])  # Eq. (17), (B, n+1)
        return class_logits, count_logits


# -- Section 3.1.3: cost. FLOPs here are multiply-adds (MACs), as the paper and Swin count them. --
def analytic_flops(config: MITrConfig, num_classes: int = 80, img_size: int | None = None):
    """Eq. 7 and 9 per block plus the layers between them -> {part: MACs}.
    Eq. 7 (pixel attention):  4hwC^2 (q, k, v, output projections) + 2 ws^2 hwC (QK^T and AV).
    Eq. 9 (cross-window):     4hw ws^2 C + 2 (hw)^2 C / ws^2.
      Paper: the extracted text reads "4 h w_s^2 C" (a w lost in print or in extraction). Here:
      4 h w w_s^2 C, because each of the hw/ws^2 window tokens of each of the C channels goes
      through four ws^2 x ws^2 projections.
    Each block's MLP adds 2 * ratio * hwC^2. Eq. 5 (global attention, 4hwC^2 + 2(hw)^2 C) is no
    part of MITr: notebook 02 (notebooks/02_cost_analysis.ipynb) compares all three."""
    cfg, img = config, img_size or config.img_size
    flops = {"patch_embed": (img // cfg.patch_size) ** 2 * 3 * cfg.patch_size**2 * cfg.embed_dim}
    for i, (res, C, ws, _, cwa) in enumerate(stage_geometry(cfg, img)):
        hw, mlp = res * res, 2 * cfg.mlp_ratio * res * res * C * C
        pa = 4 * hw * C * C + 2 * ws * ws * hw * C  # Eq. (7)
        if i == 3 and cfg.object_token:  # one more token in every window
            nW, L = hw // (ws * ws), ws * ws + 1
            pa = nW * (4 * L * C * C + 2 * L * L * C) + 2 * cfg.mlp_ratio * C * C
        cw = 4 * hw * ws * ws * C + 2 * hw * hw * C / (ws * ws)  # Eq. (9)
        s2d = (hw // 4) * 4 * C * 2 * C if i < 3 else 0  # space-to-depth
        flops[f"stage{i + 1}"] = cfg.depths[i] * (2 * (pa + mlp) + (cw + mlp if cwa else 0)) + s2d
    flops["heads"] = (
        8 * cfg.embed_dim * (num_classes + (num_classes + 1 if cfg.object_token else 0))
    )
    return flops


def count_flops(model: nn.Module, img_size: int | None = None):
    """MACs per image counted by torch.utils.flop_counter in one forward pass -> {module path: MACs}.
    FlopCounterMode counts a multiply-add as 2 FLOPs; we halve it. It does not see the CPU's fused
    attention kernel, so attention runs on the math backend (plain matmuls) while counting."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    img, was_training = img_size or model.config.img_size, model.training
    x = torch.zeros(1, 3, img, img, device=next(model.parameters()).device)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    model.train(was_training)
    return {k: sum(v.values()) / 2 for k, v in counter.get_flop_counts().items()}


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def summary(model: MITr, img_size: int | None = None) -> str:
    """A per-stage table: token grid, channels, windows, parameters, analytic and counted GFLOPs."""
    cfg, img = model.config, img_size or model.config.img_size
    eq, got = analytic_flops(cfg, model.num_classes, img), count_flops(model, img)
    heads = [m for m in (model.norm, model.head, model.count_head) if m is not None]
    rows = [
        (
            "patch_embed",
            f"{img // cfg.patch_size}^2",
            cfg.embed_dim,
            "-",
            model.patch_embed,
            ["patch_embed"],
        )
    ]
    for i, (res, C, ws, shift, cwa) in enumerate(stage_geometry(cfg, img)):
        windows = f"{(res // ws) ** 2}x{ws}^2" + " shift" * bool(shift) + " +CWA" * cwa
        rows.append((f"stage{i + 1}", f"{res}^2", C, windows, model.stages[i], [f"stages.{i}"]))
    rows += [
        (
            "heads",
            "-",
            8 * cfg.embed_dim,
            "-",
            nn.ModuleList(heads),
            ["norm", "head", "count_head"],
        ),
        ("total", "", "", "", model, None),
    ]
    table = [("part", "tokens", "C", "windows", "params(M)", "GFLOPs(Eq.)", "GFLOPs(counted)")]
    for name, tokens, C, windows, module, parts in rows:
        params = num_params(module) + (
            cfg.object_token and name == "stage4" and model.object_token.numel()
        )
        macs = got.get("MITr") if parts is None else sum(got.get(f"MITr.{p}", 0) for p in parts)
        table.append(
            (
                name,
                tokens,
                C,
                windows,
                f"{params / 1e6:.2f}",
                f"{eq.get(name, sum(eq.values())) / 1e9:.3f}",
                f"{macs / 1e9:.3f}",
            )
        )
    widths = [max(len(str(r[c])) for r in table) for c in range(len(table[0]))]
    return "\n".join("  ".join(str(v).rjust(w) for v, w in zip(r, widths)) for r in table)


# -- Section 4.1: initialising from ImageNet-pretrained Swin ---------------------------------------
def _first(names, k=3):
    names = list(dict.fromkeys(names))  # unique, in order
    return ", ".join(names[:k]) + (f" (+{len(names) - k} more)" if len(names) > k else "") or "-"


def load_swin(model: MITr, path_or_state_dict, strict: bool = True) -> dict:
    """Swin weights (official .pth or timm state dict) -> MITr's pixel-attention path; bias tables of
    another window resized bicubically per head, as Swin's fine-tuning does (7 -> 12). Returns
    {"layout", "notes", and name lists "loaded" (of which "resized"), "new" (left as initialised),
    "skipped" (index/mask buffers, ImageNet head), "unexpected", "mismatched"}. ValueError, one line,
    model untouched: unreadable checkpoint; when strict, unexpected or mismatched keys or pixel-path
    tensors the checkpoint lacks (a wrong Swin for this variant).
    Paper: "We pretrain MITr on ImageNet-22K", cross-window blocks included. Here: s, m, l start
    from Swin-T, -S, -B, their cross-window blocks, object token and heads fresh, because MITr's
    own ImageNet weights were never released and each variant's pixel-attention path is that Swin."""
    sd = path_or_state_dict
    if isinstance(sd, str) or hasattr(sd, "__fspath__"):  # a path; else the object itself
        try:
            sd = torch.load(sd, map_location="cpu", weights_only=True)
        except Exception as e:  # missing file, pickled objects, not a checkpoint
            raise ValueError(
                f"load_swin: cannot read '{sd}' ({type(e).__name__}); expected a .pth holding "
                f"a state dict or {{'model': state_dict}} of tensors"
            ) from None
    sd = sd.get("model", sd.get("state_dict", sd)) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(
            "load_swin: the checkpoint is not a state dict of tensors "
            "(expected keys like 'layers.0.blocks.0.attn.qkv.weight')"
        )
    sd = {k.removeprefix("module."): v for k, v in sd.items()}  # saved from DDP
    # Patch merging is layers.i.downsample in the official release (end of stage i), layers.{i+1}.
    # downsample in timm (start of stage i+1); both concatenate in SpaceToDepth's order.
    timm = any(".downsample." in k for k in sd) and not any(
        k.startswith("layers.0.downsample.") for k in sd
    )
    r = {
        "layout": "timm" if timm else "official",
        "notes": [],
        **{g: [] for g in ("loaded", "resized", "new", "skipped", "unexpected", "mismatched")},
    }
    target, found, wrong = model.state_dict(), {}, set()
    for key, value in sd.items():
        name = re.sub(
            r"^layers\.(\d+)\.blocks\.(\d+)\.(attn\.)?",
            lambda m: f"stages.{m[1]}.pixel_blocks.{m[2]}.{'pixel_attention.' if m[3] else ''}",
            key,
        )
        name = re.sub(
            r"^layers\.(\d+)\.downsample\.",
            lambda m: f"stages.{int(m[1]) - timm}.space_to_depth.",
            name,
        )
        table = name.endswith("relative_position_bias_table")
        if (
            key.endswith(("relative_position_index", "attn_mask"))
            or key.startswith("head.")
            or (table and not model.config.pos_embed)
        ):  # rebuilt; 1k/22k classes; ablated
            r["skipped"].append(key)
        elif name not in target:
            r["unexpected"].append(key)
        else:
            want = target[name].shape
            if (
                table and value.shape != want and value.shape[1] == want[1]
            ):  # same heads, other window
                old, new = math.isqrt(value.shape[0]), math.isqrt(want[0])
                img = value.float().t().reshape(1, want[1], old, old)  # (1, heads, 2w-1, 2w-1)
                img = F.interpolate(img, size=(new, new), mode="bicubic", align_corners=False)
                value = img.reshape(want[1], new * new).t().to(value.dtype)  # ((2w'-1)^2, heads)
                r["resized"].append(name)
                r["notes"] = [
                    f"bias tables resized bicubically, window {(old + 1) // 2} -> {(new + 1) // 2}"
                ]
            if value.shape == want:
                found[name] = value
            else:
                r["mismatched"].append(f"{key} {tuple(value.shape)} vs {name} {tuple(want)}")
                wrong.add(name)
    r["loaded"], r["new"] = [n for n in target if n in found], [n for n in target if n not in found]
    missing = [
        n
        for n in r["new"]
        if n not in wrong
        and ".cross_window_blocks." not in n
        and not n.startswith(("object_token", "count_head.", "head."))
    ]
    problems = [
        msg.format(len(v), _first(v))
        for msg, v in (
            ("{} checkpoint key(s) have no place in this MITr: {}", r["unexpected"]),
            ("{} shape mismatch(es): {}", r["mismatched"]),
            ("the checkpoint lacks {} pixel-path tensor(s): {}", missing),
        )
        if v
    ]
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
    new = (
        re.sub(r"^(stages\.\d+\.cross_window_blocks\.\d+|head|count_head)\..*", r"\1", n)
        for n in r["new"]
    )
    skipped = (re.sub(r"^layers\.\d+\.blocks\.\d+\.", "", k) for k in r["skipped"])
    counts = ", ".join(f"{len(r[g])} {g}" for g in ("new", "skipped", "unexpected", "mismatched"))
    lines = [
        f"Swin init ({r['layout']} layout): {len(r['loaded'])} tensors loaded ({len(r['resized'])} resized), "
        f"{counts}",
        f"  new: {_first(new)}",
        f"  skipped: {_first(skipped)}",
    ]
    return "\n".join(lines + [f"  note: {n}" for n in r["notes"]])


# -- Speed: `python mitr.py --bench --variant s [--device cuda] [--batch 64] [--bf16]` ------------
# Cross-window attention's share of the time, by ablation: a copy of the model whose CrossWindowAttention
# modules return their input (LayerNorms, MLPs still run) is timed beside it; the difference is their cost.
def bench(variant="tiny", device="cpu", batch=8, repeats=5, bf16=False):
    """Print forward and training images/s, achieved GFLOP/s, and CWA's share of time and FLOPs."""
    from torch.utils.benchmark import Timer

    device, cfg = torch.device(device), VARIANTS[variant]
    model = MITr(cfg, 80).to(device)
    counts = count_flops(model)  # MACs per image
    macs, cwa = (
        counts["MITr"],
        sum(v for k, v in counts.items() if k.endswith(".cross_window_attention")),
    )
    hollow = copy.deepcopy(model)
    for m in hollow.modules():
        if isinstance(m, CrossWindowAttention):
            m.forward = lambda x: x
    x = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device)
    y = (torch.rand(batch, 80, device=device) < 0.1).float()  # about 8 labels an image
    opts = {net: torch.optim.Adam(net.parameters(), lr=1e-4) for net in (model, hollow)}

    def step(net, train):
        with (
            torch.set_grad_enabled(train),
            torch.autocast(device.type, torch.bfloat16, enabled=bf16),
        ):
            logits, count = net.train(train)(x)
        if train:  # a stand-in for Eq. 18 (losses.py), of the same cost, keeps mitr.py standalone
            loss = F.binary_cross_entropy_with_logits(logits.float(), y)
            (loss + F.cross_entropy(count.float(), y.sum(1).long())).backward()
            opts[net].step()
            opts[net].zero_grad(set_to_none=True)

    # Seconds per call, after two warm-up calls (Timer synchronises CUDA).
    t = {
        (net, train): Timer(
            "step(net, train)",
            globals=dict(step=step, net=net, train=train),
            num_threads=torch.get_num_threads(),
        )
        .timeit(repeats)
        .mean
        for train in (False, True)
        for net in (model, hollow)
    }
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"MITr-{variant} on {where}, batch {batch}, {'bf16 autocast' if bf16 else 'fp32'}: "
        f"{macs / 1e9:.3f} GMACs per image, mean of {repeats}"
    )
    for train in (False, True):  # a training step ~ 3x the forward FLOPs
        print(
            f"{'training' if train else 'forward':9s} {batch / t[model, train]:9.1f} img/s  "
            f"{2 * (1 + 2 * train) * macs * batch / t[model, train] / 1e9:9.1f} GFLOP/s achieved"
        )
    share = [100 * (1 - t[hollow, train] / t[model, train]) for train in (False, True)]
    print(
        f"cross-window attention: {100 * cwa / macs:.1f}% of FLOPs, {share[0]:.1f}% of forward time, "
        f"{share[1]:.1f}% of training time"
    )


def main():
    ap = argparse.ArgumentParser(
        description="MITr's per-stage table (shapes, parameters, FLOPs), or its speed."
    )
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="s")
    ap.add_argument("--num-classes", type=int, default=80)
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--bench", action="store_true", help="time forward and training steps instead")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    args = ap.parse_args()
    if args.bench:
        return bench(args.variant, args.device, args.batch, bf16=args.bf16)
    model = MITr(VARIANTS[args.variant], args.num_classes)
    print(f"MITr-{args.variant}  {VARIANTS[args.variant]}\n{summary(model, args.img_size)}")
    if args.variant in TABLE2_PARAMS_M:
        print(
            f"Table 2: {TABLE2_PARAMS_M[args.variant]}M parameters; here {num_params(model) / 1e6:.2f}M "
            f"({args.num_classes} classes)"
        )


if __name__ == "__main__":
    main()
