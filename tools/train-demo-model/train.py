#!/usr/bin/python3
"""Trains the qmix demo model: a small Qwen3.5-MoE (Gated DeltaNet + gated attention 3:1, routed
experts with a shared expert, MTP block) on English prose from Debian packages, and exports it in
the Hugging Face layout (bf16 safetensors, config.json, tokenizer.json, chat template) to
testdata/demo. Deterministic (fixed seeds, one thread). Needs Debian's python3-torch,
python3-numpy, python3-regex, the packages debian-handbook and python3.11-doc, and a built qmix
for the final checks. See README.md."""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import math
import random
import struct
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bpe      # noqa: E402
import corpus   # noqa: E402
import model as M  # noqa: E402
import model_card  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
N_REGULAR = 4064          # 256 bytes + 3808 merges; added tokens follow at 4064..4089
VOCAB = 4096              # embedding rows (padded, like the real 248320)
CHAT_TEMPLATE = os.path.join(REPO, "testdata", "assets", "qwen3.5", "chat_template.jinja")

TEXT_CONFIG = dict(
    hidden_size=128, num_hidden_layers=8, full_attention_interval=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, partial_rotary_factor=0.25,
    mrope_section=[3, 3, 2], rope_theta=10000000,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
    linear_value_head_dim=32, linear_conv_kernel_dim=4,
    num_experts=16, num_experts_per_tok=2, moe_intermediate_size=64,
    shared_expert_intermediate_size=128, rms_norm_eps=1e-6, router_aux_loss_coef=0.01,
    vocab_size=VOCAB)


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ----------------------------------------------------------------------------------- files

def write_safetensors(path, tensors):
    """bf16 safetensors, keys sorted, header padded with spaces to a multiple of 8."""
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for k in sorted(tensors):
        t = tensors[k].detach().to(torch.bfloat16).contiguous()
        b = t.view(torch.int16).numpy().tobytes()
        header[k] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((-len(h)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        assert v["dtype"] == "BF16"
        a, b = v["data_offsets"]
        raw = torch.from_numpy(np.frombuffer(data[a:b], dtype=np.int16).copy())
        out[k] = raw.view(torch.bfloat16).float().reshape(v["shape"])
    return out


def layer_types(n, interval):
    return ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)]


def hf_config(tok):
    tc = dict(TEXT_CONFIG)
    ids = tok.added
    text = {
        "attention_bias": False, "attention_dropout": 0.0, "attn_output_gate": True,
        "dtype": "bfloat16", "eos_token_id": ids["<|endoftext|>"],
        "full_attention_interval": tc["full_attention_interval"],
        "head_dim": tc["head_dim"], "hidden_act": "silu", "hidden_size": tc["hidden_size"],
        "initializer_range": 0.02,
        "layer_types": layer_types(tc["num_hidden_layers"], tc["full_attention_interval"]),
        "linear_conv_kernel_dim": tc["linear_conv_kernel_dim"],
        "linear_key_head_dim": tc["linear_key_head_dim"],
        "linear_num_key_heads": tc["linear_num_key_heads"],
        "linear_num_value_heads": tc["linear_num_value_heads"],
        "linear_value_head_dim": tc["linear_value_head_dim"],
        "mamba_ssm_dtype": "float32", "max_position_embeddings": 262144, "mlp_only_layers": [],
        "model_type": "qwen3_5_moe_text",
        "moe_intermediate_size": tc["moe_intermediate_size"],
        "mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False,
        "num_attention_heads": tc["num_attention_heads"],
        "num_experts": tc["num_experts"], "num_experts_per_tok": tc["num_experts_per_tok"],
        "num_hidden_layers": tc["num_hidden_layers"],
        "num_key_value_heads": tc["num_key_value_heads"],
        "partial_rotary_factor": tc["partial_rotary_factor"], "rms_norm_eps": tc["rms_norm_eps"],
        "rope_parameters": {"mrope_interleaved": True, "mrope_section": tc["mrope_section"],
                            "partial_rotary_factor": tc["partial_rotary_factor"],
                            "rope_theta": tc["rope_theta"], "rope_type": "default"},
        "router_aux_loss_coef": tc["router_aux_loss_coef"],
        "shared_expert_intermediate_size": tc["shared_expert_intermediate_size"],
        "tie_word_embeddings": False, "use_cache": True, "vocab_size": tc["vocab_size"],
    }
    return {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "image_token_id": ids["<|image_pad|>"], "model_type": "qwen3_5_moe",
        "text_config": text, "tie_word_embeddings": False,
        "transformers_version": "4.57.0.dev0", "video_token_id": ids["<|video_pad|>"],
        "vision_config": {"deepstack_visual_indexes": [], "depth": 27,
                          "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152,
                          "in_channels": 3, "initializer_range": 0.02,
                          "intermediate_size": 4304, "model_type": "qwen3_5_moe",
                          "num_heads": 16, "num_position_embeddings": 2304,
                          "out_hidden_size": tc["hidden_size"], "patch_size": 16,
                          "spatial_merge_size": 2, "temporal_patch_size": 2},
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
    }


def model_cfg(cfg):
    t = cfg["text_config"]
    return M.Cfg(hidden_size=t["hidden_size"], layer_types=t["layer_types"],
                 linear_num_key_heads=t["linear_num_key_heads"],
                 linear_num_value_heads=t["linear_num_value_heads"],
                 linear_key_head_dim=t["linear_key_head_dim"],
                 linear_value_head_dim=t["linear_value_head_dim"],
                 linear_conv_kernel_dim=t["linear_conv_kernel_dim"],
                 rms_norm_eps=t["rms_norm_eps"], num_attention_heads=t["num_attention_heads"],
                 num_key_value_heads=t["num_key_value_heads"], head_dim=t["head_dim"],
                 partial_rotary_factor=t["rope_parameters"]["partial_rotary_factor"],
                 rope_theta=float(t["rope_parameters"]["rope_theta"]),
                 num_experts=t["num_experts"], num_experts_per_tok=t["num_experts_per_tok"],
                 moe_intermediate_size=t["moe_intermediate_size"],
                 shared_expert_intermediate_size=t["shared_expert_intermediate_size"],
                 vocab_size=t["vocab_size"])


def write_text_files(out, tok, cfg):
    ids = tok.added
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok.to_json(), f, ensure_ascii=False, indent=1)
    with open(CHAT_TEMPLATE, encoding="utf-8") as f:
        template = f.read()
    tcfg = {
        "add_bos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": {str(ids[s]): {"content": s, "lstrip": False,
                                               "normalized": False, "rstrip": False,
                                               "single_word": False, "special": sp}
                                 for s, sp in bpe.ADDED},
        "bos_token": None, "chat_template": template, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 262144,
        "pad_token": "<|endoftext|>", "pretokenize_regex": bpe.QWEN35_REGEX,
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tcfg, f, ensure_ascii=False, indent=2)
    gen = {"bos_token_id": ids["<|endoftext|>"], "do_sample": True,
           "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
           "pad_token_id": ids["<|endoftext|>"], "temperature": 0.7, "top_k": 20,
           "top_p": 0.8, "transformers_version": "4.57.0.dev0"}
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)


# ------------------------------------------------------------------------------------ data

def chat_samples(train_blocks, n, rng):
    """Single-turn chats in the Qwen3.5 format (non-thinking, as the official template renders
    them): the user gives the start of a paragraph, the assistant continues it."""
    paras = [p for b in train_blocks for p in b.split("\n\n") if len(p) > 200]
    prompts = ["Continue the text: ", "Please continue this passage:\n\n", "Go on: ",
               "Write what comes next.\n\n"]
    out = []
    for p in rng.sample(paras, min(n, len(paras))):
        cut = p.find(". ", 60)
        if cut < 0 or cut > len(p) - 40:
            continue
        head, rest = p[:cut + 1], p[cut + 2:]
        out.append("<|im_start|>user\n" + rng.choice(prompts) + head + "<|im_end|>\n"
                   "<|im_start|>assistant\n<think>\n\n</think>\n\n" + rest + "<|im_end|>\n")
    return out


def stream(tok, blocks, sep):
    ids = []
    for b in blocks:
        ids.extend(tok.encode(b))
        ids.extend(sep)
    return torch.tensor(ids, dtype=torch.long)


def batch(data, B, T, gen):
    starts = torch.randint(0, len(data) - T - 2, (B,), generator=gen)
    return torch.stack([data[s:s + T + 2] for s in starts.tolist()])


# ------------------------------------------------------------------------------- evaluate

@torch.no_grad()
def heldout_nll(m, ids, window=512):
    """Mean NLL (nats/token) over non-overlapping windows; the first token of each window is
    context only."""
    tot, n = 0.0, 0
    for s in range(0, len(ids) - 1, window):
        w = ids[s:s + window][None]
        if w.shape[1] < 2:
            break
        logits = m(w)[0]
        tot += F.cross_entropy(logits[0, :-1], w[0, 1:], reduction="sum").item()
        n += w.shape[1] - 1
    return tot / n, n


def unigram_nll(train_ids, held_ids, window=512):
    counts = torch.bincount(train_ids, minlength=VOCAB).double() + 1.0
    counts[N_REGULAR + len(bpe.ADDED):] = 0  # padding rows are never produced
    logp = (counts / counts.sum()).log()
    pred = torch.cat([held_ids[s + 1:s + window] for s in range(0, len(held_ids) - 1, window)])
    return float(-logp[pred].mean()), len(pred)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, **kw)


# ---------------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.path.join(REPO, "testdata", "demo"))
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--chat-frac", type=float, default=0.2,
                    help="last fraction of the steps that mixes in chat samples")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--qmix", default=os.path.join(REPO, "build", "qmix"))
    ap.add_argument("--golden-tokens", type=int, default=32)
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t_start = time.time()
    os.makedirs(os.path.join(args.out, "golden"), exist_ok=True)

    # data and tokenizer
    paras_hb = corpus.paragraphs()
    paras_py = corpus.python_paragraphs()
    train_blocks, held_blocks = corpus.split(paras_hb + paras_py)
    heldout_text = "\n\n".join(held_blocks) + "\n"
    with open(os.path.join(args.out, "heldout.txt"), "w", encoding="utf-8") as f:
        f.write(heldout_text)
    log(f"corpus: {len(paras_hb)} handbook + {len(paras_py)} python-doc paragraphs; train "
        f"{sum(len(b.encode()) for b in train_blocks)} B, held-out {len(heldout_text.encode())} B")
    vocab, merges = bpe.train(train_blocks, N_REGULAR)
    tok = bpe.Tokenizer(vocab, merges, N_REGULAR)
    log(f"tokenizer: {len(vocab)} tokens, {len(merges)} merges, {len(bpe.ADDED)} added")
    sep = tok.encode("\n\n")
    train_ids = stream(tok, train_blocks, sep)
    held_ids = torch.tensor(tok.encode(heldout_text), dtype=torch.long)
    chats = chat_samples(train_blocks, 600, rng)
    chat_ids = torch.tensor([i for c in chats for i in tok.encode(c)], dtype=torch.long)
    log(f"tokens: train {len(train_ids)}, held-out {len(held_ids)}, chat {len(chat_ids)} "
        f"({len(chats)} turns)")

    cfg = hf_config(tok)
    write_text_files(args.out, tok, cfg)
    c = model_cfg(cfg)
    d = M.selftest(c)
    log(f"selftest: chunked vs recurrent delta rule {d[0]:.2e}, whole model {d[1]:.2e}")
    torch.manual_seed(args.seed)
    m = M.Model(c)
    n_params = sum(p.numel() for p in m.parameters())
    log(f"model: {n_params} parameters")

    decay = [p for n, p in m.named_parameters() if p.dim() >= 2 and "conv1d" not in n]
    no_decay = [p for n, p in m.named_parameters() if not (p.dim() >= 2 and "conv1d" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    warm = max(1, args.steps // 20)

    def lr_at(s):
        if s < warm:
            return args.lr * (s + 1) / warm
        p = (s - warm) / max(1, args.steps - warm)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    gen = torch.Generator().manual_seed(args.seed)
    chat_start = int(args.steps * (1 - args.chat_frac))
    coef = cfg["text_config"]["router_aux_loss_coef"]
    t_train = time.time()
    usage = torch.zeros(len(c.layer_types), c.num_experts)
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        if step >= chat_start and len(chat_ids) > args.seq + 2:
            nc = args.batch // 4
            x = torch.cat([batch(train_ids, args.batch - nc, args.seq, gen),
                           batch(chat_ids, nc, args.seq, gen)])
        else:
            x = batch(train_ids, args.batch, args.seq, gen)
        T = args.seq
        logits, h, aux, counts = m(x[:, :T])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:T + 1].reshape(-1))
        nm = max(1, args.batch // 4)   # the MTP block trains on a quarter of the rows
        mlog, maux = m.mtp_forward(x[:nm, 1:T + 1], h[:nm])
        mtp_loss = F.cross_entropy(mlog.reshape(-1, VOCAB), x[:nm, 2:].reshape(-1))
        total = loss + mtp_loss + coef * (aux + maux)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        usage = 0.9 * usage + 0.1 * torch.stack(counts).float()
        if step % 25 == 0 or step == args.steps - 1:
            el = time.time() - t_train
            u = usage / usage.sum(-1, keepdim=True)
            log(f"step {step}/{args.steps} loss {loss.item():.3f} mtp {mtp_loss.item():.3f} "
                f"aux {aux.item() / len(c.layer_types):.3f} lr {lr_at(step):.2e} "
                f"expert share min {u.min().item():.3f} max {u.max().item():.3f} "
                f"{el:.0f}s ({el / (step + 1):.2f} s/step)")
    train_secs = time.time() - t_train
    log(f"training done in {train_secs:.0f} s")

    # export bf16 and reload the rounded weights
    st_path = os.path.join(args.out, "model.safetensors")
    write_safetensors(st_path, m.hf_state_dict())
    m.load_hf_state_dict(read_safetensors(st_path))
    m.eval()
    size = os.path.getsize(st_path)
    log(f"exported {st_path}: {size} bytes")

    # expert usage on held-out text (bf16 weights)
    with torch.no_grad():
        _, _, _, counts = m(held_ids[:4096][None])
    counts = torch.stack(counts)
    unused = int((counts == 0).sum())
    log(f"held-out expert usage per layer (tokens x top-k): min {int(counts.min())} max "
        f"{int(counts.max())}, {unused} unused (layer, expert) pairs")

    nll, n_eval = heldout_nll(m, held_ids)
    uni, _ = unigram_nll(train_ids, held_ids)
    log(f"held-out perplexity {math.exp(nll):.2f} ({n_eval} tokens) vs unigram {math.exp(uni):.2f}")

    # qmix checks: tokenizer ids on the held-out text, logits, greedy sample
    qmix = args.qmix
    py_ids = tok.encode(heldout_text)
    q_ids = [int(t) for t in run([qmix, "tokenize", args.out, "--file",
                                  os.path.join(args.out, "heldout.txt")]).stdout.split()]
    assert q_ids == py_ids, "qmix tokenize disagrees with the Python encoder on heldout.txt"
    for s in ["some text", "Hello, world! It's 2026: naïve café — ünïcödé.", chats[0]]:
        ids = tok.encode(s)
        q = [int(t) for t in run([qmix, "tokenize", args.out, "-p", s]).stdout.split()]
        assert q == ids, (s, q, ids)
        back = run([qmix, "tokenize", args.out, "--decode", " ".join(map(str, q))]).stdout
        assert back.decode() == s, (s, back)
    log(f"qmix tokenize: {len(q_ids)} held-out ids identical; round trips ok")

    n_cmp = 64
    ids = held_ids[:n_cmp]
    with torch.no_grad():
        ref = m(ids[None])[0][0].numpy().astype(np.float32)
    ids_s = " ".join(map(str, ids.tolist()))
    worst = {}
    for mode in ("prefill", "decode"):
        outf = os.path.join("/tmp", f"qmix-demo-logits-{os.getpid()}-{mode}.f32")
        run([qmix, "logits", args.out, "--tokens", ids_s, "--out", outf, "--mode", mode])
        got = np.fromfile(outf, dtype="<f4").reshape(n_cmp, VOCAB)
        os.unlink(outf)
        worst[mode] = float(np.abs(got - ref).max())
        assert (got.argmax(-1) == ref.argmax(-1)).all(), f"{mode}: argmax differs"
        assert worst[mode] <= 1e-3, f"{mode}: max |dlogit| {worst[mode]} > 1e-3"
    log(f"PyTorch (f32 on bf16 weights) vs qmix logits, {n_cmp} tokens: max |d| prefill "
        f"{worst['prefill']:.2e}, decode {worst['decode']:.2e}")
    ng = args.golden_tokens
    with open(os.path.join(args.out, "golden", "tokens.txt"), "w") as f:
        f.write(" ".join(map(str, ids[:ng].tolist())) + "\n")
    ref[:ng].astype("<f4").tofile(os.path.join(args.out, "golden", "logits.f32"))

    prompt = "The package manager"
    sample = run([qmix, "generate", args.out, "-p", prompt, "-n", "48", "--temp", "0",
                  "--threads", "1"]).stdout.decode()
    log(f"greedy sample: {prompt!r} -> {sample!r}")

    # the engine's own perplexity over the same windows (it scores only the full ones)
    out = run([qmix, "ppl", args.out, "--text", os.path.join(args.out, "heldout.txt"), "--ctx",
               "512"]).stdout.decode()
    qppl = [ln for ln in out.splitlines() if ln.startswith("| ") and ln[2:3].isdigit()]
    qmix_ppl = float(qppl[0].split("|")[1]) if qppl else None
    log(f"qmix ppl (full 512-token windows): {qmix_ppl}")

    summary = {
        "parameters": n_params, "safetensors_bytes": size, "steps": args.steps,
        "batch": args.batch, "seq": args.seq, "lr": args.lr, "seed": args.seed,
        "train_tokens_seen": args.steps * args.batch * args.seq,
        "train_seconds": round(train_secs), "total_seconds": round(time.time() - t_start),
        "corpus_train_tokens": len(train_ids), "heldout_tokens": len(held_ids),
        "chat_turns": len(chats), "heldout_ppl": math.exp(nll), "unigram_ppl": math.exp(uni),
        "heldout_eval_tokens": n_eval, "qmix_ppl_full_windows": qmix_ppl, "max_dlogit_prefill": worst["prefill"],
        "max_dlogit_decode": worst["decode"], "greedy_prompt": prompt, "greedy_sample": sample,
        "final_loss": loss.item(), "final_mtp_loss": mtp_loss.item(),
        "heldout_expert_counts_min": int(counts.min()), "unused_experts": unused,
        "torch": torch.__version__,
    }
    with open(os.path.join(args.out, "golden", "train_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log("summary: " + json.dumps(summary))
    model_card.write(args.out)
    log(f"wrote {os.path.join(args.out, 'MODEL_CARD.md')}")


if __name__ == "__main__":
    main()
