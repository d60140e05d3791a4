#!/usr/bin/python3
"""Writes testdata/demo-vl/MODEL_CARD.md from config.json, preprocessor_config.json and
golden/train_summary.json.   Usage: vl_card.py [OUT]"""

import json
import os
import sys


def pct(x):
    return f"{100 * x:.1f} %"


def write(out):
    cfg = json.load(open(os.path.join(out, "config.json")))
    pp = json.load(open(os.path.join(out, "preprocessor_config.json")))
    s = json.load(open(os.path.join(out, "golden", "train_summary.json")))
    v = cfg["vision_config"]
    on, off = s["captions_thinking_on"], s["captions_thinking_off"]
    size = os.path.getsize(os.path.join(out, "model.safetensors"))
    hd = v["hidden_size"] // v["num_heads"]
    side = int(round(v["num_position_embeddings"] ** 0.5))
    ex = "\n".join(f"| {e['size'][0]}×{e['size'][1]} | {e['truth']} | {e['pred']} |"
                   for e in s["caption_examples"])
    gold = "\n".join(
        f"| `{g['name']}` | {g['size'][0]}×{g['size'][1]} | {' '.join(map(str, g['grid']))} | "
        f"{g['image_tokens']} | {g['prompt_tokens']} | {g['truth']} | {g['greedy_caption']} | "
        f"{g['min_greedy_gap']:.3f} |" for g in s["golden"])
    stages = s.get("previous_stages", [])
    if stages:
        st = "; ".join(f"{i + 1}: {p['steps']} steps of {p['batch']} images, lr {p['lr_vision']} / "
                       f"{p['lr_text']}, random state {p['rng']}, auxiliary targets "
                       f"{p.get('aux_targets', 'colour, shape')}, {p['train_seconds']} s, exact "
                       f"captions after it {pct(p['captions_thinking_on']['exact'])}"
                       for i, p in enumerate(stages))
        stage_text = (f"\n* Training ran in {len(stages) + 1} stages, each continuing from the "
                      f"previous one's bf16 export (`--init`), the first from the demo model's "
                      f"weights; the numbers above are those of the last stage. Earlier stages "
                      f"({st}).")
        total_train = s["train_seconds"] + sum(p["train_seconds"] for p in stages)
    else:
        stage_text, total_train = "", s["train_seconds"]
    text = f"""# qmix demo-vl: the demo model with a small trained vision tower

`testdata/demo` (the 5.9 M-parameter Qwen3.5-MoE text model, see its MODEL_CARD.md) plus a
{s['vision_parameters']:,}-parameter Qwen3.5 vision tower (`model.visual.*`), trained together on
synthetic pictures of flat coloured shapes so that an image path can be shown and tested end to end
on something that gives a real answer. Everything here was produced by
`tools/train-demo-vision/train.py` (see its README.md).

## What it can and cannot see

It was trained only on images like those in `images/`: a plain background (white, black or gray)
with one or two flat shapes (circle, square, upward triangle) in six colours (red, green, blue,
yellow, purple, orange). One shape is described with its background ("A red circle on a white
background."); two shapes side by side are described left to right ("A red circle on the left of
a blue square.") or top to bottom ("A yellow triangle above a green circle."). On held-out images of
this kind it names the colours right {pct(on['color'])} of the time, the background
{pct(on['background'])}, the number and arrangement of the shapes {pct(on['count_layout'])}, but
the shapes themselves only {pct(on['shape'])} (circle, square and triangle are confused), so
{pct(on['exact'])} of its captions are exactly right. It knows nothing else: a photograph, a drawing, text in an image, three shapes, other colours or overlapping
shapes all get one of these sentences anyway, usually a wrong one. It does not count, read,
answer questions about an image or hold a conversation about it; any question with an image gets a
caption. Text-only prompts still give `testdata/demo`-like prose, somewhat worse: the
fine-tuning raised its held-out perplexity from {s['heldout_text_ppl_before']:.1f} to
{s['heldout_text_ppl_after']:.1f} (see Results).

## Geometry

| | |
|---|---|
| text model | as `testdata/demo` (hidden 128, 8 layers, 16 experts top-2, mrope_section [3, 3, 2] interleaved), fine-tuned lightly; MTP block unchanged |
| vision tower | depth {v['depth']}, hidden {v['hidden_size']}, {v['num_heads']} heads (head dim {hd}), MLP {v['intermediate_size']} (tanh GELU), LayerNorm eps 1e-6 |
| patches | {v['patch_size']}×{v['patch_size']} px, temporal patch {v['temporal_patch_size']} (an image is its own two frames), 2×2 merge → one token per 32×32 px |
| position embedding | learned {side}×{side} grid (`num_position_embeddings` {v['num_position_embeddings']}), bilinearly resampled (align corners) to the patch grid |
| rotary | 2-D (row, column) over the whole head, base 10000 |
| merger | LayerNorm, 4×{v['hidden_size']} → {4 * v['hidden_size']} (erf GELU) → {v['out_hidden_size']} |
| preprocessing | `preprocessor_config.json`: min_pixels {pp['size']['shortest_edge']} (64×64), max_pixels {pp['size']['longest_edge']} (256×256, at most 64 image tokens), mean = std = 0.5, bicubic resize to multiples of 32 |
| weights | bf16, {size:,} bytes (`model.safetensors`, text tensors named as in `testdata/demo`) |

## Prompt

The chat template (`chat_template.jinja`, also in `tokenizer_config.json`) applied to one user
message `[image, "Describe this image."]` with `add_generation_prompt` (thinking left on), the one
`<|image_pad|>` replaced by (h/32)·(w/32) copies:

    <|im_start|>user\\n<|vision_start|><|image_pad|>×n<|vision_end|>Describe this image.<|im_end|>\\n<|im_start|>assistant\\n<think>\\n

The model then writes `\\n</think>\\n\\n` and the caption, and stops with `<|im_end|>`. With
thinking off (prompt ending in `<think>\\n\\n</think>\\n\\n`) it writes the caption directly.
Trained questions: "Describe this image.", "What is in this picture?", "Describe the picture.",
"What do you see?".

## Training

* Data: images drawn at random on the fly (`tools/train-demo-vision/shapes.py`), sizes 64–128 px
  per side in multiples of 32, so training never resizes; half the prompts with thinking on, half
  off; loss on the answer tokens only. Mixed into every step: {s['text_batch']} rows ×
  {s['text_seq']} tokens of the demo model's own training text (next-token loss), so that it
  keeps its text ability.
* {s['steps']} steps of {s['batch']} images; AdamW, lr {s['lr_vision']} for the tower and
  {s['lr_text']} for the text model (MTP frozen), warm-up 5 %, cosine to 5 %; clipping 1.0;
  float32; random state {s['rng']}. An auxiliary loss (weight {s.get('aux', 0)}) trains linear heads
  on the merger output to predict, for each 32×32 cell, its {s.get('aux_targets', 'colour, shape')}
  (role: first or second of two shapes, a lone shape, background); the heads are not exported.{stage_text}
* Time: {total_train} s of training in all stages, {s['total_seconds']} s for the last run including evaluation and export, on one thread of a
  busy shared 2-core VM (PyTorch {s['torch']} from Debian).
* Export: bf16 (round to nearest even); everything below was measured on the bf16 weights.

## Results

Greedy captions of {on['images']} held-out images (a different random stream, including three
sizes that are not multiples of 32 and therefore go through the bicubic resize: 80×120, 100×100,
150×110):

| | thinking on | thinking off ({off['images']} images) |
|---|---|---|
| exact caption | **{pct(on['exact'])}** | {pct(off['exact'])} |
| follows the caption grammar | {pct(on['parses'])} | {pct(off['parses'])} |
| number and layout of shapes | {pct(on['count_layout'])} | {pct(off['count_layout'])} |
| each shape | {pct(on['shape'])} | {pct(off['shape'])} |
| each colour | {pct(on['color'])} | {pct(off['color'])} |
| background (one-shape images) | {pct(on['background'])} | {pct(off['background'])} |

Text perplexity on the first 4,096 tokens of `testdata/demo/heldout.txt`:
{s['heldout_text_ppl_before']:.2f} before, {s['heldout_text_ppl_after']:.2f} after.

Examples (the first six held-out images, then mistakes):

| size | truth | greedy caption |
|---|---|---|
{ex}

## Goldens (`golden/NAME/`, for checking an implementation of the image path)

Computed by the PyTorch implementation in `tools/train-demo-vision/vision.py` in float64 on the
bf16 weights, stored as little-endian float32. That implementation reproduces the goldens of
the independent `tiny-vl-a` fixture (pixel values exactly, image embeddings to 2e-7, prefill
logits to 3e-6; `tools/train-demo-vision/check_fixture.py`). The images are `images/NAME.png`.

| file | shape / format |
|---|---|
| `tokens.txt` | prompt ids (the prompt above, thinking on), space separated |
| `positions.txt` | 3 lines (t, h, w) of M-RoPE positions for the prompt |
| `grid_thw.txt` | `1 gh gw` (patches of the resized image) |
| `pixel_values.f32` | [gh·gw, 1536], rows in merge-block order, columns (channel, frame, y, x) |
| `image_embeds.f32` | [gh·gw/4, 128], the rows that replace the `<|image_pad|>` embeddings |
| `logits_prefill.f32` | [T, 4096], logits at every prompt position |
| `greedy.txt` | greedy continuation ids up to and including `<|im_end|>` (positions continue at max + 1) |
| `resized.png` | only where the image is resized: the bicubic result |

| image | size | t gh gw | image tokens | prompt tokens | truth | greedy caption | min top-1/top-2 logit gap while generating |
|---|---|---|---|---|---|---|---|
{gold}

## License

The text weights derive from `testdata/demo` (see its card: GPL-2.0+ or CC-BY-SA-3.0 for the
Debian handbook part, PSF for the Python documentation part) and were fine-tuned with the same
text; the images and captions are generated by the script.
"""
    with open(os.path.join(out, "MODEL_CARD.md"), "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    write(sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "..", "testdata", "demo-vl"))
