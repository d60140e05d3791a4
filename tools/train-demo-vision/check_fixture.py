#!/usr/bin/python3
"""Checks this directory's image path against an independent implementation's goldens: the
preprocessing (pixel_values), the vision tower (image_embeds), the prompt tokens and the M-RoPE
positions of a reference checkpoint directory such as the shared tiny-vl-a fixture.

    /usr/bin/python3 tools/train-demo-vision/check_fixture.py /work/shared/fixtures/tiny-vl-a
"""

import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shapes  # noqa: E402
import vision as V  # noqa: E402
from export import load_vl  # noqa: E402


def main():
    d = sys.argv[1]
    cfg = json.load(open(os.path.join(d, "config.json")))
    pp = json.load(open(os.path.join(d, "preprocessor_config.json")))
    m, _ = load_vl(d)
    m = m.double()
    tower = m.visual
    ok = True
    for name in sorted(os.listdir(os.path.join(d, "golden"))):
        g = os.path.join(d, "golden", name)
        if not os.path.isdir(g):
            continue
        img = shapes.read_png(os.path.join(d, "images", name + ".png"))
        pv, (t, gh, gw), resized = V.preprocess(img, pp)
        want_grid = [int(x) for x in open(os.path.join(g, "grid_thw.txt")).read().split()]
        ref_pv = np.fromfile(os.path.join(g, "pixel_values.f32"), "<f4").reshape(pv.shape)
        rp = os.path.join(g, "resized.png")     # absent where no resize happens
        ref_rs = shapes.read_png(rp) if os.path.exists(rp) else img
        with torch.no_grad():
            emb = tower(torch.from_numpy(pv).double()[None], gh, gw)[0].numpy()
        ref_emb = np.fromfile(os.path.join(g, "image_embeds.f32"), "<f4").reshape(emb.shape)
        ids = [int(x) for x in open(os.path.join(g, "tokens.txt")).read().split()]
        pos = V.mrope_positions(ids, cfg["image_token_id"], [(gh, gw)]).numpy()
        ref_pos = np.array([[int(x) for x in ln.split()]
                            for ln in open(os.path.join(g, "positions.txt")).read().splitlines()
                            if ln.strip()])
        with torch.no_grad():
            logits = m(torch.tensor([ids]), torch.from_numpy(pos),
                       torch.from_numpy(pv).double()[None], (gh, gw))[0][0].numpy()
        ref_lg = np.fromfile(os.path.join(g, "logits_prefill.f32"), "<f4").reshape(logits.shape)
        r = {"grid": [t, gh, gw] == want_grid,
             "resized_exact": bool((resized == ref_rs).all()),
             "pixel_values_maxabs": float(np.abs(pv - ref_pv).max()),
             "image_embeds_maxabs": float(np.abs(emb - ref_emb).max()),
             "positions": bool((pos == ref_pos).all()),
             "logits_prefill_maxabs": float(np.abs(logits - ref_lg).max())}
        good = r["grid"] and r["resized_exact"] and r["pixel_values_maxabs"] <= 1e-6 and \
            r["image_embeds_maxabs"] <= 1e-4 and r["positions"] and \
            r["logits_prefill_maxabs"] <= 1e-3
        ok &= good
        print(name, "ok" if good else "FAIL", json.dumps(r))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
