"""Synthetic image-caption pairs: one or two flat coloured shapes (circle, square, triangle) on a
plain background, rendered with numpy into uint8 RGB arrays, and the caption that describes them.
Deterministic: everything is drawn from a random.Random(n) stream. Also a minimal PNG writer/reader
(zlib + struct; 8-bit RGB, no interlace)."""

import random
import struct
import zlib

import numpy as np

COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
    "yellow": (240, 220, 20), "purple": (140, 40, 170), "orange": (250, 140, 20),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
# (height, width) in pixels; multiples of 32, so the preprocessing does not resize them
SIZES = [(64, 64), (64, 96), (96, 64), (96, 96), (64, 128), (128, 64), (96, 128), (128, 96),
         (128, 128)]


def art(word, capital=False):
    a = "an" if word[0] in "aeiou" else "a"
    return a.capitalize() if capital else a


def draw(img, shape, color, cy, cx, r, lab=None, lab_val=None):
    """Fills a shape of half-size r centred at (cy, cx) (pixel centres at +0.5); lab, if given,
    is an int label map [H, W, 3] that gets lab_val (colour class, shape class, role) there."""
    H, W, _ = img.shape
    y, x = np.mgrid[0:H, 0:W].astype(np.float64) + 0.5
    dy, dx = y - cy, x - cx
    if shape == "circle":
        m = dy * dy + dx * dx <= r * r
    elif shape == "square":
        s = r * 0.85
        m = (np.abs(dy) <= s) & (np.abs(dx) <= s)
    else:  # upward triangle: apex at top, base at bottom
        top, bot = cy - r, cy + 0.8 * r
        t = (y - top) / (bot - top)
        m = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    img[m] = color
    if lab is not None:
        lab[m] = lab_val


COLOR_CLASSES = sorted(COLORS) + sorted(BACKGROUNDS)   # per-pixel colour labels
SHAPE_CLASSES = ("none",) + SHAPES
N_ROLES = 4


def sample(rng, size=None, labels=False):
    """Returns (uint8 [H, W, 3], caption, attributes dict); with labels=True the attributes also
    hold "labels": int [H, W, 3] per pixel: colour class, shape class, and role (0 background,
    1 the first-named of two shapes, 2 the second, 3 a lone shape)."""
    H, W = size if size else rng.choice(SIZES)
    bg = rng.choice(sorted(BACKGROUNDS))
    img = np.empty((H, W, 3), np.uint8)
    img[:] = BACKGROUNDS[bg]
    lab = np.zeros((H, W, 3), np.int64)
    lab[..., 0] = COLOR_CLASSES.index(bg)

    def put(s_, c_, y_, x_, r_, role):
        draw(img, s_, COLORS[c_], y_, x_, r_, lab,
             (COLOR_CLASSES.index(c_), SHAPE_CLASSES.index(s_), role))
    n = rng.choice((1, 2))
    colors = sorted(COLORS)
    if n == 1:
        s, c = rng.choice(SHAPES), rng.choice(colors)
        r = rng.uniform(0.22, 0.38) * min(H, W)
        cy = H / 2 + rng.uniform(-0.1, 0.1) * H
        cx = W / 2 + rng.uniform(-0.1, 0.1) * W
        put(s, c, cy, cx, r, 3)
        a = {"n": 1, "layout": "single", "shapes": (s,), "colors": (c,), "bg": bg}
        if labels:
            a["labels"] = lab
        return img, f"{art(c, True)} {c} {s} on a {bg} background.", a
    # two shapes side by side (along the longer side, or either way for a square image)
    if W > H:
        layout = "h"
    elif H > W:
        layout = "v"
    else:
        layout = rng.choice(("h", "v"))
    s1, s2 = rng.choice(SHAPES), rng.choice(SHAPES)
    c1, c2 = rng.choice(colors), rng.choice(colors)
    while (s1, c1) == (s2, c2):
        c2 = rng.choice(colors)
    L = W if layout == "h" else H
    S = H if layout == "h" else W
    r = min(L / 4, S / 2) * rng.uniform(0.55, 0.8)
    a1 = L * rng.uniform(0.22, 0.28)
    a2 = L * rng.uniform(0.72, 0.78)
    b1 = S / 2 + rng.uniform(-0.08, 0.08) * S
    b2 = S / 2 + rng.uniform(-0.08, 0.08) * S
    if layout == "h":
        put(s1, c1, b1, a1, r, 1)
        put(s2, c2, b2, a2, r, 2)
        cap = f"{art(c1, True)} {c1} {s1} on the left of {art(c2)} {c2} {s2}."
    else:
        put(s1, c1, a1, b1, r, 1)
        put(s2, c2, a2, b2, r, 2)
        cap = f"{art(c1, True)} {c1} {s1} above {art(c2)} {c2} {s2}."
    a = {"n": 2, "layout": layout, "shapes": (s1, s2), "colors": (c1, c2), "bg": None}
    if labels:
        a["labels"] = lab
    return img, cap, a


def cell_labels(lab, cell=32):
    """Majority (colour, shape, role) label of each cell x cell block, raster order: int [n, 3]."""
    H, W, _ = lab.shape
    out = []
    for y in range(0, H, cell):
        for x in range(0, W, cell):
            blk = lab[y:y + cell, x:x + cell].reshape(-1, 3)
            sh = blk[:, 1]
            # the shape wins the cell if it covers at least a quarter of it
            fg = sh > 0
            if fg.mean() >= 0.25:
                out.append(np.bincount(blk[fg, 0]).argmax())
                out.append(np.bincount(sh[fg]).argmax())
                out.append(np.bincount(blk[fg, 2]).argmax())
            else:
                out.append(np.bincount(blk[:, 0]).argmax())
                out.append(0)
                out.append(0)
    return np.array(out, np.int64).reshape(-1, 3)


def parse(caption):
    """Inverse of the caption grammar: attributes dict, or None if the caption does not parse."""
    import re
    w = r"(\w+)"
    m = re.fullmatch(rf"An? {w} {w} on an? {w} background\.", caption.strip())
    if m:
        return {"n": 1, "layout": "single", "shapes": (m[2],), "colors": (m[1],), "bg": m[3]}
    m = re.fullmatch(rf"An? {w} {w} (on the left of|above) an? {w} {w}\.", caption.strip())
    if m:
        return {"n": 2, "layout": "h" if m[3] == "on the left of" else "v",
                "shapes": (m[2], m[5]), "colors": (m[1], m[4]), "bg": None}
    return None


# -------------------------------------------------------------------------------- PNG

def write_png(path, img):
    H, W, _ = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(H))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + \
            struct.pack(">I", zlib.crc32(tag + data) & 0xffffffff)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 9)))
        f.write(chunk(b"IEND", b""))


def read_png(path):
    """8-bit RGB or RGBA (alpha composited onto white), non-interlaced PNGs only."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        n, tag = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if tag == b"IHDR":
            W, H, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and ctype in (2, 6) and interlace == 0
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    ch = 3 if ctype == 2 else 4
    raw = zlib.decompress(idat)
    stride = W * ch
    out = np.zeros((H, stride), np.int32)
    prev = np.zeros(stride, np.int32)
    for y in range(H):
        ft = raw[y * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int32)
        cur = np.zeros(stride, np.int32)
        for i in range(stride):
            a = cur[i - ch] if i >= ch else 0
            b = prev[i]
            c = prev[i - ch] if i >= ch else 0
            if ft == 0:
                p = 0
            elif ft == 1:
                p = a
            elif ft == 2:
                p = b
            elif ft == 3:
                p = (a + b) >> 1
            else:
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                p = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            cur[i] = (line[i] + p) & 255
        out[y] = cur
        prev = cur
    img = out.reshape(H, W, ch)
    if ch == 4:  # composite onto white, as transformers' convert_to_rgb does
        a = img[..., 3:4].astype(np.float64) / 255
        img = np.round(img[..., :3] * a + 255 * (1 - a))
    return img.astype(np.uint8)
