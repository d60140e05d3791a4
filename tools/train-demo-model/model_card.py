#!/usr/bin/python3
"""Writes MODEL_CARD.md for the demo model from its config.json and golden/train_summary.json
(train.py calls it at the end; it can also be run alone: model_card.py [MODEL_DIR])."""

import json
import os
import sys


def write(out):
    cfg = json.load(open(os.path.join(out, "config.json")))
    s = json.load(open(os.path.join(out, "golden", "train_summary.json")))
    t = cfg["text_config"]
    rp = t["rope_parameters"]
    mins = s["train_seconds"] / 60
    card = f"""# qmix demo model: a small trained Qwen3.5-MoE

A {s['parameters'] / 1e6:.1f} M-parameter Qwen3.5-MoE (`Qwen3_5MoeForConditionalGeneration`,
text only) trained from scratch on about 2.2 MB of English prose, bundled so that qmix can be
shown and tested on a model that produces text rather than noise. It is a toy: it writes
plausible-looking sentences about Debian and Python, with no knowledge or reasoning to speak of.
Everything here was produced by `tools/train-demo-model/train.py` (see its README.md).

## Geometry (config.json, `text_config`)

| | |
|---|---|
| hidden size | {t['hidden_size']} |
| layers | {t['num_hidden_layers']}: {', '.join('L' if x == 'linear_attention' else 'F' for x in t['layer_types'])} (L = Gated DeltaNet, F = gated full attention; `full_attention_interval` {t['full_attention_interval']}) |
| Gated DeltaNet | {t['linear_num_key_heads']} key heads, {t['linear_num_value_heads']} value heads, head dim {t['linear_key_head_dim']}/{t['linear_value_head_dim']}, conv kernel {t['linear_conv_kernel_dim']} |
| full attention | {t['num_attention_heads']} query heads, {t['num_key_value_heads']} KV heads, head dim {t['head_dim']}, output gate; partial RoPE on {int(t['head_dim'] * rp['partial_rotary_factor'])} dims, θ {rp['rope_theta']}, mrope_section {rp['mrope_section']} (interleaved) |
| MoE (every layer) | {t['num_experts']} routed experts, top-{t['num_experts_per_tok']}, expert FFN {t['moe_intermediate_size']}; shared expert FFN {t['shared_expert_intermediate_size']} with `shared_expert_gate` |
| MTP | {t['mtp_num_hidden_layers']} layer (`mtp.*`, per-expert tensors as in the releases) |
| vocabulary | {t['vocab_size']} rows: 4,064 byte-level BPE tokens + 26 added tokens (ids 4064–4089), 6 padding rows |
| embeddings | untied (`lm_head.weight` separate) |
| weights | bf16, {s['safetensors_bytes']:,} bytes (`model.safetensors`, Hugging Face names and layout) |

## Data and license

Training text (English, offline, from Debian 12 packages):

* `debian-handbook` 11.20220922 — "The Debian Administrator's Handbook", en-US HTML: the text of
  every paragraph and section title (no program listings). GPL-2.0+ or CC-BY-SA-3.0,
  © Raphaël Hertzog, Roland Mas, Freexian SARL.
* `python3.11-doc` 3.11.2 — the Python 3.11 documentation's reStructuredText sources (tutorial,
  FAQ, HOWTOs, language reference, What's New, library): unindented prose paragraphs only, inline
  markup reduced to its text. PSF License Agreement (Python Software Foundation).

The paragraphs are grouped into ~4 KB blocks of contiguous text; every 20th block is held out
(never seen by the tokenizer or the model) and bundled as `heldout.txt`
({s['heldout_tokens']:,} tokens). The training split has {s['corpus_train_tokens']:,} tokens.
The weights are a work derived from this text; treat them as under the same terms
(GPL-2.0+ or CC-BY-SA-3.0 for the handbook part, PSF for the Python part).

## Tokenizer

Byte-level BPE trained by the script on the training split (3,808 merges), written as a
Hugging Face `tokenizer.json`: NFC normalizer, pre-tokenizer `Sequence[Split(Qwen3.5 regex,
Isolated), ByteLevel(add_prefix_space=false, use_regex=false)]`, ByteLevel decoder, and the
Qwen added tokens (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, vision tokens, `<tool_call>`,
`</tool_call>`, FIM tokens, `<tool_response>`, `</tool_response>`, `<think>`, `</think>`) in the
Qwen order and with Qwen's `special` flags. `tokenizer_config.json` carries the official Qwen3.5
chat template verbatim; `generation_config.json` has eos `<|im_end|>`, `<|endoftext|>` and
Qwen's non-thinking sampling defaults (temperature 0.7, top-p 0.8, top-k 20).
qmix's tokenizer gives exactly the Python encoder's ids on all of `heldout.txt`; so does the
independent JS implementation the tests use (`tools/check-tokenizer.sh`), which also agrees with
the Python encoder on every line of `testdata/assets/wiki.test.raw`.

## Training

* Objective: next-token cross-entropy, plus a Switch-style load-balancing loss
  (E · Σ fᵢ·Pᵢ per MoE layer, coefficient {t['router_aux_loss_coef']}) so that every expert is used;
  the MTP block is trained at the same time with a next-next-token loss on a quarter of each
  batch, reading the trunk's hidden state after the final norm (detached) and the embedding of
  token t+1; embeddings and lm_head are shared and receive no gradient from the MTP loss.
* {s['steps']} steps of {s['batch']} × {s['seq']} tokens ({s['train_tokens_seen']:,} tokens,
  about {s['train_tokens_seen'] / s['corpus_train_tokens']:.1f} epochs); AdamW (β 0.9/0.95,
  weight decay 0.1 on matrices), peak lr {s['lr']}, linear warm-up over 5 %, cosine to 10 %;
  gradient clipping 1.0; float32; seed {s['seed']}. In the last 20 % of the steps a quarter of
  each batch comes from {s['chat_turns']} single-turn chats in the Qwen3.5 format (thinking off:
  an empty `<think>` block), where the user gives the start of a training paragraph and the
  assistant continues it.
* Time: {s['train_seconds']} s of training ({mins:.0f} min), {s['total_seconds']} s in all, on one
  thread of a shared 2-core VM (PyTorch {s['torch']} from Debian, OpenBLAS).
* Export: bf16 (round to nearest even).

## Results

| | perplexity on `heldout.txt` |
|---|---|
| this model (bf16 weights, float32 compute, windows of 512 tokens) | **{s['heldout_ppl']:.1f}** |
| unigram baseline (training-split token frequencies, add-one) | {s['unigram_ppl']:.1f} |

Over {s['heldout_eval_tokens']:,} predicted tokens. The engine agrees:
`qmix ppl testdata/demo --text testdata/demo/heldout.txt --ctx 512` (same windows, but it scores
only the full ones) reports {s.get('qmix_ppl_full_windows') or 'n/a'}. Expert use on the first 4,096 held-out tokens:
the least used (layer, expert) pair gets {s['heldout_expert_counts_min']} of the
{4096 * t['num_experts_per_tok']} routed slots; {s['unused_experts']} pairs unused.

Greedy continuation (`qmix generate testdata/demo -p "{s['greedy_prompt']}" -n 48 --temp 0`):

> {s['greedy_prompt']}{s['greedy_sample']}

## Checks

qmix's logits on 64 held-out tokens equal the trainer's PyTorch forward pass (float32 on the
bf16 weights): max |Δlogit| {s['max_dlogit_prefill']:.1e} (prefill) and
{s['max_dlogit_decode']:.1e} (decode). `golden/tokens.txt` (the first 32 held-out tokens) and
`golden/logits.f32` (float32 [32, {t['vocab_size']}], row-major) keep these for
`tests/test_demo_model.c`; `golden/train_summary.json` holds the numbers above.
"""
    with open(os.path.join(out, "MODEL_CARD.md"), "w", encoding="utf-8") as f:
        f.write(card)


if __name__ == "__main__":
    write(sys.argv[1] if len(sys.argv) > 1 else
          os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "testdata", "demo"))
