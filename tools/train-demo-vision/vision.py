"""The Qwen3.5 image path in PyTorch/numpy: preprocessing (smart_resize, Pillow-exact bicubic
resize on uint8, normalisation, temporal duplication, merge-block patch order), the vision tower
(patch embedding, interpolated absolute position embedding, 2-D rotary, pre-norm LayerNorm blocks
with tanh-GELU MLP, 2x2 merger with erf-GELU), image tokens and interleaved M-RoPE positions, and
a vision-language model around the text model of tools/train-demo-model/model.py."""

import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                "train-demo-model"))
import model as M  # noqa: E402

# ------------------------------------------------------------------------- preprocessing


def smart_resize(H, W, factor, min_pixels, max_pixels):
    if max(H, W) / min(H, W) > 200:
        raise ValueError("aspect ratio above 200")
    h = round(H / factor) * factor          # Python round: half to even
    w = round(W / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(H * W / max_pixels)
        h = max(factor, math.floor(H / beta / factor) * factor)
        w = max(factor, math.floor(W / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (H * W))
        h = math.ceil(H * beta / factor) * factor
        w = math.ceil(W * beta / factor) * factor
    return h, w


def _cubic(x, a=-0.5):
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _bicubic_matrix(n_in, n_out):
    """Integer weights [n_out, n_in] in 22-bit fixed point, as Pillow's resampler computes
    them (antialiased when shrinking)."""
    scale = n_in / n_out
    fs = max(scale, 1.0)
    support = 2.0 * fs
    A = np.zeros((n_out, n_in), np.int64)
    for x in range(n_out):
        center = (x + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        w = [_cubic((i + lo - center + 0.5) / fs) for i in range(hi - lo)]
        s = sum(w)
        for i, wi in enumerate(w):
            wi /= s
            A[x, lo + i] = int(wi * (1 << 22) + (0.5 if wi >= 0 else -0.5))
    return A


def _apply(A, img, axis):
    """One separable pass on uint8 data with Pillow's rounding and clamping."""
    x = np.moveaxis(img.astype(np.int64), axis, 0)
    y = np.tensordot(A, x, axes=(1, 0)) + (1 << 21)
    y = np.clip(y >> 22, 0, 255).astype(np.uint8)
    return np.moveaxis(y, 0, axis)


def resize_bicubic(img, h, w):
    """uint8 [H, W, 3] -> uint8 [h, w, 3]; horizontal pass first, then vertical."""
    H, W, _ = img.shape
    if W != w:
        img = _apply(_bicubic_matrix(W, w), img, 1)
    if H != h:
        img = _apply(_bicubic_matrix(H, h), img, 0)
    return img


def preprocess(img, pp):
    """uint8 RGB [H, W, 3] -> (pixel_values float32 [gh*gw, 3*tp*ps*ps], (1, gh, gw), resized
    uint8 image). pp = preprocessor_config.json as a dict."""
    ps, tp, m = pp["patch_size"], pp["temporal_patch_size"], pp["merge_size"]
    H, W, _ = img.shape
    h, w = smart_resize(H, W, ps * m, pp["size"]["shortest_edge"], pp["size"]["longest_edge"])
    if (h, w) != (H, W):
        img = resize_bicubic(img, h, w)
    mean = np.array(pp["image_mean"], np.float64)
    std = np.array(pp["image_std"], np.float64)
    x = (img.astype(np.float64) / 255.0 - mean) / std            # [h, w, 3]
    x = np.repeat(x.transpose(2, 0, 1)[None], tp, 0)              # [tp, 3, h, w]
    gh, gw = h // ps, w // ps
    x = x.reshape(1, tp, 3, gh // m, m, ps, gw // m, m, ps)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gh * gw, 3 * tp * ps * ps).astype(np.float32), (1, gh, gw), img


def block_order(gh, gw, m):
    """Raster index of each patch in merge-block order."""
    idx = np.arange(gh * gw).reshape(gh // m, m, gw // m, m).transpose(0, 2, 1, 3)
    return torch.from_numpy(idx.reshape(-1).copy())


# ------------------------------------------------------------------------------- tower

class VCfg:
    def __init__(self, d):
        self.__dict__.update(d)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        D, I = c.hidden_size, c.intermediate_size
        self.norm1 = nn.LayerNorm(D, eps=1e-6)
        self.norm2 = nn.LayerNorm(D, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(D, 3 * D)
        self.attn.proj = nn.Linear(D, D)
        self.mlp = nn.Module()
        self.mlp.linear_fc1 = nn.Linear(D, I)
        self.mlp.linear_fc2 = nn.Linear(I, D)
        self.nh = c.num_heads

    def forward(self, x, cos, sin):
        B, N, D = x.shape
        hd = D // self.nh
        h = self.norm1(x)
        q, k, v = self.attn.qkv(h).reshape(B, N, 3, self.nh, hd).permute(2, 0, 3, 1, 4)

        def rot(t):
            t1, t2 = t[..., :hd // 2], t[..., hd // 2:]
            return t * cos + torch.cat([-t2, t1], -1) * sin
        q, k = rot(q), rot(k)
        a = ((q @ k.transpose(-1, -2)) / math.sqrt(hd)).softmax(-1)   # non-causal
        o = (a @ v).transpose(1, 2).reshape(B, N, D)
        x = x + self.attn.proj(o)
        h = self.mlp.linear_fc1(self.norm2(x))
        return x + self.mlp.linear_fc2(F.gelu(h, approximate="tanh"))


class Merger(nn.Module):
    def __init__(self, c):
        super().__init__()
        D, m2 = c.hidden_size, c.spatial_merge_size ** 2
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.linear_fc1 = nn.Linear(m2 * D, m2 * D)
        self.linear_fc2 = nn.Linear(m2 * D, c.out_hidden_size)

    def forward(self, x):
        B, N, D = x.shape
        x = self.norm(x).reshape(B, N // 4, 4 * D)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))       # exact erf GELU


class PatchEmbed(nn.Module):
    def __init__(self, c):
        super().__init__()
        tp, ps = c.temporal_patch_size, c.patch_size
        self.proj = nn.Conv3d(c.in_channels, c.hidden_size, (tp, ps, ps), (tp, ps, ps))

    def forward(self, pv):
        W = self.proj.weight
        return pv @ W.reshape(W.shape[0], -1).t() + self.proj.bias


class VisionTower(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.patch_embed = PatchEmbed(c)
        self.pos_embed = nn.Embedding(c.num_position_embeddings, c.hidden_size)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.merger = Merger(c)
        self.side = int(round(math.sqrt(c.num_position_embeddings)))
        assert self.side ** 2 == c.num_position_embeddings

    def pos_interp(self, gh, gw):
        """Bilinear (align_corners) resampling of the side x side table to gh x gw, in
        merge-block order: [gh*gw, D]."""
        side = self.side
        tab = self.pos_embed.weight.reshape(side, side, -1)

        def coords(n):
            s = torch.linspace(0, side - 1, n, dtype=torch.float64)
            f = s.floor().long()
            c = (f + 1).clamp(max=side - 1)
            return f, c, (s - f.double()).to(tab.dtype)
        fr, cr, wr = coords(gh)
        fc, cc, wc = coords(gw)
        wr, wc = wr[:, None, None], wc[None, :, None]
        g = (tab[fr][:, fc] * (1 - wr) * (1 - wc) + tab[fr][:, cc] * (1 - wr) * wc +
             tab[cr][:, fc] * wr * (1 - wc) + tab[cr][:, cc] * wr * wc)
        return g.reshape(gh * gw, -1)[block_order(gh, gw, self.c.spatial_merge_size)]

    def rotary(self, gh, gw, dtype):
        hd = self.c.hidden_size // self.c.num_heads
        j = torch.arange(hd // 4, dtype=torch.float64)
        inv = 10000.0 ** (-2.0 * j / (hd // 2))
        r = torch.arange(gh, dtype=torch.float64)[:, None].expand(gh, gw).reshape(-1)
        c = torch.arange(gw, dtype=torch.float64)[None, :].expand(gh, gw).reshape(-1)
        o = block_order(gh, gw, self.c.spatial_merge_size)
        r, c = r[o], c[o]
        th = torch.cat([r[:, None] * inv, c[:, None] * inv], -1)   # [N, hd/2]
        th = torch.cat([th, th], -1)
        return th.cos().to(dtype), th.sin().to(dtype)

    def forward(self, pv, gh, gw):
        """pv [B, gh*gw, 1536] (all images the same grid) -> [B, gh*gw/4, Dt]."""
        x = self.patch_embed(pv) + self.pos_interp(gh, gw)
        cos, sin = self.rotary(gh, gw, x.dtype)
        for b in self.blocks:
            x = b(x, cos, sin)
        return self.merger(x)


# ------------------------------------------------------------------- text side, M-RoPE

MROPE_SECTION = [3, 3, 2]


def _mrope(x, pos, rot, theta):
    """Partial NeoX rotation of the first rot dims with interleaved M-RoPE: pos [3, T]
    (t, h, w); pair i takes h if i % 3 == 1 and i < 3*s1, w if i % 3 == 2 and i < 3*s2, else t.
    A 1-D pos means t = h = w."""
    half = rot // 2
    if pos.dim() == 1:
        pos = pos[None].expand(3, -1)
    s0, s1, s2 = MROPE_SECTION
    comp = [1 if (i % 3 == 1 and i < 3 * s1) else 2 if (i % 3 == 2 and i < 3 * s2) else 0
            for i in range(half)]
    inv = theta ** (-torch.arange(0, half, dtype=torch.float64) * 2.0 / rot)
    p = pos.double()[comp]                                 # [half, T]
    f = (p.t() * inv[None]).to(x.dtype)
    cos, sin = f.cos()[None, :, None], f.sin()[None, :, None]
    x1, x2, rest = x[..., :half], x[..., half:rot], x[..., rot:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], -1)


M.rope = _mrope   # the text model's attention now takes [3, T] positions


def mrope_positions(ids, image_pad, grids, m=2):
    """ids: list of ints; grids: (gh, gw) per image in order. -> LongTensor [3, T]."""
    out, p, i, g = [], 0, 0, 0
    while i < len(ids):
        if ids[i] == image_pad:
            gh, gw = grids[g]
            g += 1
            lh, lw = gh // m, gw // m
            for a in range(lh):
                for b in range(lw):
                    out.append((p, p + a, p + b))
            i += lh * lw
            p += max(lh, lw)
        else:
            out.append((p, p, p))
            p += 1
            i += 1
    return torch.tensor(out, dtype=torch.long).t().contiguous()


class VLModel(nn.Module):
    def __init__(self, text_cfg, vis_cfg, image_pad):
        super().__init__()
        self.lm = M.Model(text_cfg)
        self.visual = VisionTower(vis_cfg)
        self.image_pad = image_pad

    def forward(self, ids, pos, pv=None, grid=None):
        """ids [B, T], pos [3, T] (shared by the batch), pv [B, N, 1536] -> logits, aux."""
        lm = self.lm.model.language_model
        x = lm.embed_tokens(ids)
        if pv is not None:
            img = self.visual(pv, *grid)
            self.last_image_embeds = img          # for auxiliary losses in training
            mask = ids == self.image_pad
            x = x.clone()
            x[mask] = img.reshape(-1, img.shape[-1]).to(x.dtype)
        aux = 0.0
        for layer in lm.layers:
            x, a, _ = layer(x, pos)
            aux = aux + a
        return self.lm.lm_head(lm.norm(x)), aux

    def hf_state_dict(self):
        out = self.lm.hf_state_dict()
        for k, v in self.visual.state_dict().items():
            out["model.visual." + k] = v
        return out

    def load_hf_state_dict(self, sd):
        self.lm.load_hf_state_dict({k: v for k, v in sd.items()
                                    if not k.startswith("model.visual.")})
        self.visual.load_state_dict({k[len("model.visual."):]: v for k, v in sd.items()
                                     if k.startswith("model.visual.")}, strict=True)
