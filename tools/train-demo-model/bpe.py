"""Byte-level BPE, trained here and written as a Hugging Face tokenizer.json.

Encoding semantics are those of the Rust `tokenizers` crate for this configuration (what qmix's
tokenizer implements): added tokens cut out first (leftmost, longest), NFC, the Qwen3.5 Split
regex (behaviour Isolated), GPT-2 byte-to-unicode mapping, then BPE merges lowest rank first."""

import collections
import json
import unicodedata

import regex

# The Qwen3.5 pre-tokenizer regex (tokenizer_config.json "pretokenize_regex").
QWEN35_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PAT = regex.compile(QWEN35_REGEX)

# Added tokens in the Qwen2/3/3.5 order and with their "special" flags (the Qwen3 tokenizer.json
# has them so; Qwen3.5 keeps the same first 26 ids relative to <|endoftext|>).
ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False),
    ("</tool_response>", False), ("<think>", False), ("</think>", False),
]


def byte_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable characters: printable
    Latin-1 bytes map to themselves, the others to U+0100 upwards in byte order."""
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


B2U = byte_to_unicode()
U2B = {c: b for b, c in B2U.items()}


def pretokenize(text):
    text = unicodedata.normalize("NFC", text)
    return ["".join(B2U[b] for b in m.encode("utf-8")) for m in _PAT.findall(text)]


def train(texts, n_regular):
    """Learns merges until the regular vocabulary (256 bytes + merged tokens) has n_regular
    entries. Returns (vocab list id -> token string, merges list of (a, b))."""
    counts = collections.Counter()
    for t in texts:
        counts.update(pretokenize(t))
    vocab = [B2U[b] for b in range(256)]
    ids = {s: i for i, s in enumerate(vocab)}
    words = [[ids[c] for c in w] for w in counts]
    freq = list(counts.values())
    pairs = collections.Counter()
    where = collections.defaultdict(set)
    for wi, w in enumerate(words):
        for a, b in zip(w, w[1:]):
            pairs[a, b] += freq[wi]
            where[a, b].add(wi)
    merges = []
    while len(vocab) < n_regular and pairs:
        # most frequent pair; ties: the pair whose strings sort first (deterministic)
        best = max(pairs.items(), key=lambda kv: (kv[1], [-ord(c) for c in vocab[kv[0][0]] + " " + vocab[kv[0][1]]]))[0]
        if pairs[best] <= 1:
            break
        a, b = best
        s = vocab[a] + vocab[b]
        if s in ids:
            new = ids[s]
        else:
            new = len(vocab)
            vocab.append(s)
            ids[s] = new
        merges.append((vocab[a], vocab[b]))
        for wi in sorted(where.pop(best)):
            w = words[wi]
            f = freq[wi]
            for p in zip(w, w[1:]):
                pairs[p] -= f
                if pairs[p] <= 0:
                    del pairs[p]
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[wi] = out
            for p in zip(out, out[1:]):
                pairs[p] += f
                where[p].add(wi)
        pairs.pop(best, None)
    return vocab, merges


class Tokenizer:
    def __init__(self, vocab, merges, first_added):
        self.vocab = list(vocab)
        self.ids = {s: i for i, s in enumerate(self.vocab)}
        self.ranks = {m: r for r, m in enumerate(merges)}
        self.merges = list(merges)
        self.added = {s: first_added + i for i, (s, _) in enumerate(ADDED)}
        self.added_special = {first_added + i: sp for i, (s, sp) in enumerate(ADDED)}
        self.cache = {}
        self._added_re = regex.compile("|".join(regex.escape(s) for s in
                                                sorted(self.added, key=len, reverse=True)))

    def _bpe(self, word):
        if word in self.cache:
            return self.cache[word]
        syms = list(word)
        while len(syms) > 1:
            best, bi = None, -1
            for i in range(len(syms) - 1):
                r = self.ranks.get((syms[i], syms[i + 1]))
                if r is not None and (best is None or r < best):
                    best, bi = r, i
            if best is None:
                break
            a, b = syms[bi], syms[bi + 1]
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            syms = out
        ids = [self.ids[s] for s in syms]
        self.cache[word] = ids
        return ids

    def encode_plain(self, text):
        out = []
        for w in pretokenize(text):
            out.extend(self._bpe(w))
        return out

    def encode(self, text):
        """Like HF encode: added-token strings become their ids."""
        out, pos = [], 0
        for m in self._added_re.finditer(text):
            if m.start() > pos:
                out.extend(self.encode_plain(text[pos:m.start()]))
            out.append(self.added[m.group()])
            pos = m.end()
        if pos < len(text):
            out.extend(self.encode_plain(text[pos:]))
        return out

    def decode(self, ids):
        inv = {v: k for k, v in self.added.items()}
        bs = bytearray()
        for i in ids:
            if i in inv:
                bs += inv[i].encode()
            elif i < len(self.vocab):
                bs += bytes(U2B[c] for c in self.vocab[i])
        return bs.decode("utf-8", errors="replace")

    def to_json(self):
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                      "use_regex": False}
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [
                {"id": self.added[s], "content": s, "single_word": False, "lstrip": False,
                 "rstrip": False, "normalized": False, "special": sp} for s, sp in ADDED],
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN35_REGEX}, "behavior": "Isolated",
                 "invert": False},
                dict(byte_level)]},
            "post_processor": dict(byte_level),
            "decoder": dict(byte_level),
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": "", "end_of_word_suffix": "",
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {s: i for i, s in enumerate(self.vocab)},
                      "merges": [[a, b] for a, b in self.merges]},
        }
