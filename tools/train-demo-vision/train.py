#!/usr/bin/python3
"""Gives the qmix demo model (testdata/demo) a small trained vision tower: synthetic shape images
with captions, a Qwen3.5 vision tower trained from scratch while the text model is fine-tuned
lightly (with its own training text mixed in), caption accuracy on held-out images, and the export
of testdata/demo-vl (Hugging Face layout, bf16) with goldens. See README.md."""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse      # noqa: E402
import json          # noqa: E402
import math          # noqa: E402
import random        # noqa: E402
import shutil        # noqa: E402
import sys           # noqa: E402
import time          # noqa: E402

import numpy as np   # noqa: E402
import torch         # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "train-demo-model"))
import bpe           # noqa: E402
import shapes        # noqa: E402
import vision as V   # noqa: E402
import export as X   # noqa: E402

REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
DEMO = os.path.join(REPO, "testdata", "demo")

VISION_CONFIG = {
    "deepstack_visual_indexes": [], "depth": 3, "dtype": "bfloat16",
    "hidden_act": "gelu_pytorch_tanh", "hidden_size": 64, "in_channels": 3,
    "initializer_range": 0.02, "intermediate_size": 256, "model_type": "qwen3_5_moe",
    "num_heads": 2, "num_position_embeddings": 256, "out_hidden_size": 128, "patch_size": 16,
    "spatial_merge_size": 2, "temporal_patch_size": 2,
}
PREPROCESSOR = {
    "size": {"longest_edge": 65536, "shortest_edge": 4096},
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast",
}
QUESTIONS = ["Describe this image.", "What is in this picture?", "Describe the picture.",
             "What do you see?"]
GOLDEN_QUESTION = "Describe this image."
# golden images: (name, stream number, size); the last one is resized by the preprocessing
GOLDEN = [("shapes_64x96", 11, (64, 96)), ("shapes_128x128", 15, (128, 128)),
          ("shapes_100x150", 13, (100, 150))]
EXAMPLES = [("example_%d" % i, 100 + i, None) for i in range(5)]


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def load_tokenizer():
    tj = json.load(open(os.path.join(DEMO, "tokenizer.json"), encoding="utf-8"))
    vocab = sorted(tj["model"]["vocab"], key=tj["model"]["vocab"].get)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
              for m in tj["model"]["merges"]]
    first = min(t["id"] for t in tj["added_tokens"])
    tok = bpe.Tokenizer(vocab, merges, first)
    for t in tj["added_tokens"]:
        assert tok.added[t["content"]] == t["id"], t
    return tok


class Prompter:
    """Chat-template rendering of one user turn [image, text] with add_generation_prompt, pads
    expanded; thinking on (the template's default) ends with '<think>\\n', thinking off with
    '<think>\\n\\n</think>\\n\\n'."""

    def __init__(self, tok):
        self.tok = tok
        self.pad = tok.added["<|image_pad|>"]
        self.im_end = tok.added["<|im_end|>"]

    def text(self, n_pads, question, thinking=True):
        return ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * n_pads +
                "<|vision_end|>" + question + "<|im_end|>\n<|im_start|>assistant\n" +
                ("<think>\n" if thinking else "<think>\n\n</think>\n\n"))

    def prompt(self, n_pads, question, thinking=True):
        return self.tok.encode(self.text(n_pads, question, thinking))

    def answer(self, caption, thinking=True):
        """What the model is trained to generate after the prompt."""
        return self.tok.encode(("\n</think>\n\n" if thinking else "") + caption) + [self.im_end]


def image_batch(rng, B, size, pp, labels=False):
    imgs, caps, attrs = [], [], []
    for _ in range(B):
        img, cap, a = shapes.sample(rng, size, labels)
        imgs.append(img)
        caps.append(cap)
        attrs.append(a)
    pvs = [V.preprocess(im, pp) for im in imgs]
    grid = pvs[0][1]
    return torch.from_numpy(np.stack([p[0] for p in pvs])), grid[1:], caps, attrs


def make_rows(P, caps, n_pads, rng):
    """Token rows (right-padded with <|im_end|>) and loss masks for one image batch."""
    q = rng.choice(QUESTIONS)
    thinking = rng.random() < 0.5
    pr = P.prompt(n_pads, q, thinking)
    rows = [pr + P.answer(c, thinking) for c in caps]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), P.im_end, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, len(pr) - 1:len(r) - 1] = True      # positions that predict the answer
    return ids, mask


@torch.no_grad()
def greedy(m, P, pv, grid, question, thinking=True, max_new=28):
    """Batched greedy decoding (full recompute per token). Returns lists of generated ids
    (up to and including <|im_end|>)."""
    B = pv.shape[0]
    n = grid[0] * grid[1] // 4
    pr = P.prompt(n, question, thinking)
    ids = torch.tensor([pr] * B)
    done = torch.zeros(B, dtype=torch.bool)
    out = [[] for _ in range(B)]
    for _ in range(max_new):
        pos = V.mrope_positions(ids[0].tolist(), P.pad, [grid])
        logits, _ = m(ids, pos, pv.to(next(m.parameters()).dtype), grid)
        nxt = logits[:, -1].argmax(-1)
        for i in range(B):
            if not done[i]:
                out[i].append(int(nxt[i]))
        done |= nxt == P.im_end
        if done.all():
            break
        ids = torch.cat([ids, nxt[:, None]], 1)
    return out


def caption_of(P, gen, thinking=True):
    s = P.tok.decode([t for t in gen if t != P.im_end])
    if thinking:
        s = s.split("</think>")[-1]
    return s.strip()


def score(pred, attrs):
    """Per-attribute correctness of one caption: dict of booleans."""
    p = shapes.parse(pred)
    r = {"parses": p is not None}
    if p is None:
        p = {"n": 0, "layout": None, "shapes": (), "colors": (), "bg": None}
    r["count_layout"] = p["layout"] == attrs["layout"]
    for k in ("shapes", "colors"):
        want, got = attrs[k], p[k]
        r[k] = [i < len(got) and got[i] == w for i, w in enumerate(want)]
    r["bg"] = attrs["bg"] is None or p["bg"] == attrs["bg"]
    r["exact"] = p == attrs if p else False
    return r


def evaluate(m, P, pp, n_per_size, stream, sizes, thinking=True):
    rng = random.Random(stream)
    tot = {"exact": 0, "parses": 0, "count_layout": 0, "shapes": [0, 0], "colors": [0, 0],
           "bg": [0, 0], "n": 0}
    examples = []
    for size in sizes:
        pv, grid, caps, attrs = image_batch(rng, n_per_size, size, pp)
        gens = greedy(m, P, pv, grid, GOLDEN_QUESTION, thinking)
        for g, cap, a in zip(gens, caps, attrs):
            pred = caption_of(P, g, thinking)
            s = score(pred, a)
            tot["n"] += 1
            for k in ("exact", "parses", "count_layout"):
                tot[k] += int(s[k])
            for k in ("shapes", "colors"):
                tot[k][0] += sum(s[k])
                tot[k][1] += len(s[k])
            if a["bg"] is not None:
                tot["bg"][0] += int(s["bg"])
                tot["bg"][1] += 1
            if len(examples) < 12 and (len(examples) < 6 or not s["exact"]):
                examples.append({"size": list(size), "truth": cap, "pred": pred})
    n = tot["n"]
    res = {"images": n, "exact": tot["exact"] / n, "parses": tot["parses"] / n,
           "count_layout": tot["count_layout"] / n,
           "shape": tot["shapes"][0] / tot["shapes"][1],
           "color": tot["colors"][0] / tot["colors"][1],
           "background": tot["bg"][0] / max(1, tot["bg"][1])}
    return res, examples


# --------------------------------------------------------------------------------- text

def text_stream(tok, max_blocks):
    """The demo model's own training split (tools/train-demo-model/corpus.py), if its Debian
    packages are installed; else None."""
    try:
        import corpus
        paras = corpus.paragraphs() + corpus.python_paragraphs()
    except Exception as e:  # noqa: BLE001
        log(f"no training text ({e}); text loss off")
        return None
    train_blocks, _ = corpus.split(paras)
    rng = random.Random(7)
    blocks = rng.sample(train_blocks, min(max_blocks, len(train_blocks)))
    sep = tok.encode("\n\n")
    ids = []
    for b in blocks:
        ids.extend(tok.encode(b))
        ids.extend(sep)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def text_nll(m, ids, window=512):
    tot, n = 0.0, 0
    for s in range(0, len(ids) - 1, window):
        w = ids[s:s + window][None]
        if w.shape[1] < 2:
            break
        logits, _ = m(w, torch.arange(w.shape[1]))
        tot += F.cross_entropy(logits[0, :-1].float(), w[0, 1:], reduction="sum").item()
        n += w.shape[1] - 1
    return tot / n


# ------------------------------------------------------------------------------- export

def write_checkpoint(out, m, tok):
    os.makedirs(out, exist_ok=True)
    cfg = json.load(open(os.path.join(DEMO, "config.json")))
    cfg["vision_config"] = dict(VISION_CONFIG)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump(PREPROCESSOR, f, indent=2)
    for fn in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(os.path.join(DEMO, fn), os.path.join(out, fn))
    tc = json.load(open(os.path.join(DEMO, "tokenizer_config.json"), encoding="utf-8"))
    with open(os.path.join(out, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(tc["chat_template"])
    X.write_safetensors(os.path.join(out, "model.safetensors"), m.hf_state_dict())
    return cfg


def write_goldens(out, m, P, pp):
    """Per golden image: tokens, positions, grid, pixel_values, image_embeds, prefill logits,
    greedy ids; float64 forward on the bf16 weights, stored float32."""
    md = m.double()
    info = []
    for name, stream, size in GOLDEN:
        img, cap, _ = shapes.sample(random.Random(stream), size)
        shapes.write_png(os.path.join(out, "images", name + ".png"), img)
        g = os.path.join(out, "golden", name)
        os.makedirs(g, exist_ok=True)
        pv, (t, gh, gw), resized = V.preprocess(shapes.read_png(
            os.path.join(out, "images", name + ".png")), pp)
        n = gh * gw // 4
        ids = P.prompt(n, GOLDEN_QUESTION, True)
        pos = V.mrope_positions(ids, P.pad, [(gh, gw)])
        pvt = torch.from_numpy(pv).double()[None]
        with torch.no_grad():
            emb = md.visual(pvt, gh, gw)[0]
            logits = md(torch.tensor([ids]), pos, pvt, (gh, gw))[0][0]
        gen = greedy(md, P, pvt, (gh, gw), GOLDEN_QUESTION, True, max_new=32)[0]
        # the decisiveness of each greedy step (top-1 minus top-2 logit)
        full = torch.tensor([ids + gen[:-1]])
        with torch.no_grad():
            lg = md(full, V.mrope_positions(full[0].tolist(), P.pad, [(gh, gw)]), pvt,
                    (gh, gw))[0][0, len(ids) - 1:]
        top2 = lg.topk(2, -1).values
        gap = float((top2[:, 0] - top2[:, 1]).min())
        pv.astype("<f4").tofile(os.path.join(g, "pixel_values.f32"))
        emb.numpy().astype("<f4").tofile(os.path.join(g, "image_embeds.f32"))
        logits.numpy().astype("<f4").tofile(os.path.join(g, "logits_prefill.f32"))
        with open(os.path.join(g, "tokens.txt"), "w") as f:
            f.write(" ".join(map(str, ids)) + "\n")
        with open(os.path.join(g, "positions.txt"), "w") as f:
            for row in pos.tolist():
                f.write(" ".join(map(str, row)) + "\n")
        with open(os.path.join(g, "grid_thw.txt"), "w") as f:
            f.write(f"{t} {gh} {gw}\n")
        with open(os.path.join(g, "greedy.txt"), "w") as f:
            f.write(" ".join(map(str, gen)) + "\n")
        if resized.shape[:2] != img.shape[:2]:
            shapes.write_png(os.path.join(g, "resized.png"), resized)
        info.append({"name": name, "size": list(size), "grid": [t, gh, gw], "image_tokens": n,
                     "prompt_tokens": len(ids), "truth": cap,
                     "greedy_text": P.tok.decode(gen), "greedy_caption": caption_of(P, gen),
                     "min_greedy_gap": gap,
                     "embeds_maxabs": float(emb.abs().max())})
    m.float()
    return info


# ---------------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.path.join(REPO, "testdata", "demo-vl"))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text-batch", type=int, default=2)
    ap.add_argument("--text-seq", type=int, default=128)
    ap.add_argument("--lr-vision", type=float, default=3e-3)
    ap.add_argument("--lr-text", type=float, default=5e-4)
    ap.add_argument("--rng", type=int, default=4321,
                    help="initial state of the random streams (data, initialisation)")
    ap.add_argument("--init", default=None,
                    help="start from the weights of an earlier run's output directory")
    ap.add_argument("--aux", type=float, default=0.5,
                    help="weight of the per-cell colour/shape loss on the tower output")
    ap.add_argument("--eval-per-size", type=int, default=6)
    ap.add_argument("--text-blocks", type=int, default=160)
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.rng)
    t0 = time.time()
    tok = load_tokenizer()
    P = Prompter(tok)
    pp = PREPROCESSOR

    cfg = json.load(open(os.path.join(DEMO, "config.json")))
    m = V.VLModel(X.text_cfg(cfg), V.VCfg(VISION_CONFIG), cfg["image_token_id"])
    m.lm.load_hf_state_dict(X.read_safetensors(os.path.join(DEMO, "model.safetensors")))
    for mod in m.visual.modules():       # initialisation of the tower
        if isinstance(mod, torch.nn.Linear):
            torch.nn.init.normal_(mod.weight, 0.0, 0.02)
            torch.nn.init.zeros_(mod.bias)
    torch.nn.init.normal_(m.visual.pos_embed.weight, 0.0, 0.02)
    torch.nn.init.normal_(m.visual.patch_embed.proj.weight, 0.0, 0.02)
    torch.nn.init.zeros_(m.visual.patch_embed.proj.bias)
    n_vis = sum(p.numel() for p in m.visual.parameters())
    log(f"vision tower: {n_vis} parameters")

    text_ids = text_stream(tok, args.text_blocks)
    held = torch.tensor(tok.encode(open(os.path.join(DEMO, "heldout.txt"),
                                        encoding="utf-8").read())[:4096])
    m.eval()
    nll0 = text_nll(m, held)
    log(f"held-out text perplexity before (first 4096 tokens): {math.exp(nll0):.2f}"
        + (f"; training text {len(text_ids)} tokens" if text_ids is not None else ""))
    if args.init:
        m.load_hf_state_dict(X.read_safetensors(os.path.join(args.init, "model.safetensors")))
        log(f"continuing from {args.init}")
    m.train()

    # the MTP block is not used here: freeze it (exported unchanged)
    for p in m.lm.mtp.parameters():
        p.requires_grad_(False)
    # auxiliary per-token heads on the merger output (colour, shape and role -- first or second
    # of two shapes, or a lone one -- of each 32x32 cell): a direct training signal for the
    # tower; not exported
    aux_head = torch.nn.Linear(VISION_CONFIG["out_hidden_size"], len(shapes.COLOR_CLASSES) +
                               len(shapes.SHAPE_CLASSES) + shapes.N_ROLES)
    vis = list(m.visual.parameters()) + list(aux_head.parameters())
    lm_decay = [p for n, p in m.lm.named_parameters()
                if p.requires_grad and p.dim() >= 2 and "conv1d" not in n]
    lm_other = [p for n, p in m.lm.named_parameters()
                if p.requires_grad and not (p.dim() >= 2 and "conv1d" not in n)]
    opt = torch.optim.AdamW([
        {"params": vis, "lr": args.lr_vision, "weight_decay": 0.01, "base": args.lr_vision},
        {"params": lm_decay, "lr": args.lr_text, "weight_decay": 0.1, "base": args.lr_text},
        {"params": lm_other, "lr": args.lr_text, "weight_decay": 0.0, "base": args.lr_text},
    ], betas=(0.9, 0.95))
    warm = max(1, args.steps // 20)

    def lr_scale(s):
        if s < warm:
            return (s + 1) / warm
        p = (s - warm) / max(1, args.steps - warm)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p))

    rng = random.Random(args.rng)
    gen = torch.Generator().manual_seed(args.rng)
    coef = cfg["text_config"]["router_aux_loss_coef"]
    t_train = time.time()
    ema = None
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = g["base"] * lr_scale(step)
        size = rng.choice(shapes.SIZES)
        pv, grid, caps, attrs = image_batch(rng, args.batch, size, pp, args.aux > 0)
        ids, mask = make_rows(P, caps, grid[0] * grid[1] // 4, rng)
        pos = V.mrope_positions(ids[0].tolist(), P.pad, [grid])
        logits, aux = m(ids, pos, pv, grid)
        loss_img = F.cross_entropy(logits[:, :-1][mask[:, :-1]], ids[:, 1:][mask[:, :-1]])
        total = loss_img + coef * aux
        loss_aux = torch.tensor(0.0)
        if args.aux > 0:
            lab = torch.from_numpy(np.stack([shapes.cell_labels(a["labels"]) for a in attrs]))
            o = aux_head(m.last_image_embeds)
            nc, ns = len(shapes.COLOR_CLASSES), len(shapes.SHAPE_CLASSES)
            loss_aux = \
                F.cross_entropy(o[..., :nc].reshape(-1, nc), lab[..., 0].reshape(-1)) + \
                F.cross_entropy(o[..., nc:nc + ns].reshape(-1, ns), lab[..., 1].reshape(-1)) + \
                F.cross_entropy(o[..., nc + ns:].reshape(-1, shapes.N_ROLES), lab[..., 2].reshape(-1))
            total = total + args.aux * loss_aux
        loss_txt = torch.tensor(0.0)
        if text_ids is not None and args.text_batch > 0:
            T = args.text_seq
            st = torch.randint(0, len(text_ids) - T - 1, (args.text_batch,), generator=gen)
            x = torch.stack([text_ids[s:s + T + 1] for s in st.tolist()])
            lt, aux_t = m(x[:, :T], torch.arange(T))
            loss_txt = F.cross_entropy(lt.reshape(-1, lt.shape[-1]), x[:, 1:].reshape(-1))
            total = total + loss_txt + coef * aux_t
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        ema = loss_img.item() if ema is None else 0.9 * ema + 0.1 * loss_img.item()
        if step % 20 == 0 or step == args.steps - 1:
            el = time.time() - t_train
            log(f"step {step}/{args.steps} caption loss {loss_img.item():.3f} (ema {ema:.3f}) "
                f"text loss {loss_txt.item():.3f} aux {loss_aux.item():.3f} {el:.0f}s ({el / (step + 1):.2f} s/step)")
    train_secs = time.time() - t_train
    log(f"training done in {train_secs:.0f} s")

    # export bf16, reload the rounded weights, evaluate them
    out = args.out
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    write_checkpoint(out, m, tok)
    m, _ = X.load_vl(out)
    nll1 = text_nll(m, held)
    log(f"held-out text perplexity after: {math.exp(nll1):.2f} (before {math.exp(nll0):.2f})")
    held_sizes = shapes.SIZES + [(80, 120), (100, 100), (150, 110)]
    res_on, ex_on = evaluate(m, P, pp, args.eval_per_size, 999, held_sizes, True)
    log("held-out captions (thinking on): " + json.dumps(res_on))
    for e in ex_on:
        log(f"  {e['size']}: truth {e['truth']!r} pred {e['pred']!r}")
    res_off, ex_off = evaluate(m, P, pp, max(2, args.eval_per_size // 3), 998, held_sizes,
                               False)
    log("held-out captions (thinking off): " + json.dumps(res_off))

    for name, stream, size in EXAMPLES:
        img, cap, _ = shapes.sample(random.Random(stream), size)
        shapes.write_png(os.path.join(out, "images", name + ".png"), img)
    golden = write_goldens(out, m, P, pp)
    for gi in golden:
        log("golden: " + json.dumps(gi))
    summary = {
        "vision_parameters": n_vis, "steps": args.steps, "batch": args.batch,
        "text_batch": args.text_batch if text_ids is not None else 0,
        "text_seq": args.text_seq, "lr_vision": args.lr_vision, "lr_text": args.lr_text,
        "rng": args.rng, "aux": args.aux, "aux_targets": "colour, shape, role",
        "init": os.path.relpath(args.init, REPO) if args.init else None, "train_seconds": round(train_secs),
        "total_seconds": round(time.time() - t0),
        "heldout_text_ppl_before": math.exp(nll0), "heldout_text_ppl_after": math.exp(nll1),
        "captions_thinking_on": res_on, "captions_thinking_off": res_off,
        "caption_examples": ex_on, "golden": golden, "torch": torch.__version__,
        "final_caption_loss_ema": ema,
    }
    prev = os.path.join(args.init or "", "golden", "train_summary.json")
    if args.init and os.path.exists(prev):
        ps = json.load(open(prev))
        summary["previous_stages"] = ps.get("previous_stages", []) + [
            {k: ps[k] for k in ("steps", "batch", "text_batch", "lr_vision", "lr_text", "rng",
                                "aux", "aux_targets", "train_seconds", "captions_thinking_on") if k in ps}]
    with open(os.path.join(out, "golden", "train_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    try:
        import vl_card
        vl_card.write(out)
    except Exception as e:  # noqa: BLE001  (the card can be rewritten: vl_card.py OUT)
        log(f"model card not written: {e!r}")
    log(f"wrote {out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
