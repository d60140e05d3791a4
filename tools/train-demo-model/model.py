"""A Qwen3.5-MoE text model in PyTorch, float32, with the Hugging Face parameter names and the
forward semantics of the qmix spec (shared/spec/architecture.md):

* RMSNorm `x * rsqrt(mean(x^2) + eps) * (1 + w)` everywhere except the Gated DeltaNet output norm
  (plain `* w`);
* Gated DeltaNet layers: in_proj_qkv -> causal depthwise conv (kernel Kc) -> SiLU -> q | k | v,
  L2-normalised q (scaled 1/sqrt(dk)) and k, value head j reads key head j // (nv/nk),
  decay exp(-exp(A_log) * softplus(a + dt_bias)), beta = sigmoid(b), delta rule, gated RMSNorm
  with silu(z), out_proj. Run here in the chunked (UT-transform) form, checked against the
  token-by-token recurrence by `selftest()`;
* gated full attention: q_proj rows interleave [query(hd); gate(hd)] per head, q_norm/k_norm,
  partial NeoX RoPE on the first head_dim * partial_rotary_factor dims (text positions: the three
  M-RoPE components are equal, so mrope_section has no effect), GQA, output * sigmoid(gate);
* MoE: softmax router over all experts, top-k renormalised, SwiGLU experts (fused gate_up_proj
  [E, 2F, D], down_proj [E, D, F]) plus a shared SwiGLU expert scaled by
  sigmoid(shared_expert_gate . x);
* MTP block (mtp.*): fc(concat(norm_e(embed(t+1)), norm_h(h_t))) -> one full-attention MoE
  layer -> mtp.norm -> the shared lm_head, predicting token t+2. h_t is the trunk's hidden state
  after the final norm."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Cfg:
    def __init__(self, **kw):
        self.__dict__.update(kw)

    @property
    def rot(self):
        return int(self.head_dim * self.partial_rotary_factor)


class Norm(nn.Module):
    """Zero-centred RMSNorm: weight stored near 0, applied as (1 + w)."""

    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


class PlainNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def lin(i, o):
    return nn.Linear(i, o, bias=False)


def l2norm(x):
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)


def delta_rule_chunked(q, k, v, g, beta, chunk=64):
    """q, k [B, Hh, T, dk]; v [B, Hh, T, dv]; g (log decay), beta [B, Hh, T]. Zero initial state.
    Returns o [B, Hh, T, dv]."""
    B, Hh, T, dk = k.shape
    dv = v.shape[-1]
    pad = (-T) % chunk
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    N = (T + pad) // chunk
    q, k, v = (x.reshape(B, Hh, N, chunk, x.shape[-1]) for x in (q, k, v))
    g, beta = g.reshape(B, Hh, N, chunk), beta.reshape(B, Hh, N, chunk)
    G = g.cumsum(-1)
    incl = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    strict = incl.tril(-1)
    diff = G[..., :, None] - G[..., None, :]
    decay = torch.exp(diff.masked_fill(~incl, float("-inf")))        # e^{G_t - G_s}, s <= t
    A = (k @ k.transpose(-1, -2)) * decay.masked_fill(~strict, 0.0)  # strictly lower
    eye = torch.eye(chunk, device=q.device)
    M = eye + beta[..., :, None] * A
    rhs = torch.cat([beta[..., None] * v, (beta * torch.exp(G))[..., None] * k], -1)
    W = torch.linalg.solve_triangular(M, rhs, upper=False, unitriangular=True)
    Wv, Wk = W.split([dv, dk], -1)
    QK = (q @ k.transpose(-1, -2)) * decay
    qG = q * torch.exp(G)[..., None]
    kG = k * torch.exp(G[..., -1:] - G)[..., None]
    S = q.new_zeros(B, Hh, dk, dv)
    outs = []
    last = torch.exp(G[..., -1]).unbind(2)
    for Wv_, Wk_, qG_, QK_, kG_, l_ in zip(Wv.unbind(2), Wk.unbind(2), qG.unbind(2),
                                           QK.unbind(2), kG.unbind(2), last):
        u = Wv_ - Wk_ @ S
        outs.append(qG_ @ S + QK_ @ u)
        S = l_[..., None, None] * S + kG_.transpose(-1, -2) @ u
    o = torch.stack(outs, 2).reshape(B, Hh, N * chunk, dv)
    return o[:, :, :T]


def delta_rule_recurrent(q, k, v, g, beta):
    B, Hh, T, dk = k.shape
    S = q.new_zeros(B, Hh, dk, v.shape[-1])
    outs = []
    for t in range(T):
        S = S * torch.exp(g[:, :, t])[..., None, None]
        kt = k[:, :, t]
        err = v[:, :, t] - (S * kt[..., None]).sum(-2)
        S = S + kt[..., None] * (beta[:, :, t, None] * err)[..., None, :]
        outs.append((S * q[:, :, t, :, None]).sum(-2))
    return torch.stack(outs, 2)


class GatedDeltaNet(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.conv_dim = 2 * c.linear_num_key_heads * c.linear_key_head_dim + \
            c.linear_num_value_heads * c.linear_value_head_dim
        nv, dv = c.linear_num_value_heads, c.linear_value_head_dim
        self.in_proj_qkv = lin(c.hidden_size, self.conv_dim)
        self.in_proj_z = lin(c.hidden_size, nv * dv)
        self.in_proj_b = lin(c.hidden_size, nv)
        self.in_proj_a = lin(c.hidden_size, nv)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, c.linear_conv_kernel_dim,
                                groups=self.conv_dim, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.empty(nv).uniform_(1, 16)))
        self.dt_bias = nn.Parameter(torch.ones(nv))
        self.norm = PlainNorm(dv, c.rms_norm_eps)
        self.out_proj = lin(nv * dv, c.hidden_size)

    def forward(self, h, recurrent=False):
        c = self.c
        B, T, _ = h.shape
        nk, nv = c.linear_num_key_heads, c.linear_num_value_heads
        dk, dv = c.linear_key_head_dim, c.linear_value_head_dim
        x = self.in_proj_qkv(h).transpose(1, 2)
        x = F.conv1d(F.pad(x, (c.linear_conv_kernel_dim - 1, 0)), self.conv1d.weight,
                     groups=self.conv_dim)
        x = F.silu(x).transpose(1, 2)
        q, k, v = x.split([nk * dk, nk * dk, nv * dv], -1)
        q, k, v = q.reshape(B, T, nk, dk), k.reshape(B, T, nk, dk), v.reshape(B, T, nv, dv)
        q = l2norm(q) / math.sqrt(dk)
        k = l2norm(k)
        r = nv // nk
        q = q.repeat_interleave(r, dim=2)
        k = k.repeat_interleave(r, dim=2)
        beta = torch.sigmoid(self.in_proj_b(h))
        g = -torch.exp(self.A_log) * F.softplus(self.in_proj_a(h) + self.dt_bias)
        args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), g.transpose(1, 2),
                beta.transpose(1, 2))
        o = (delta_rule_recurrent if recurrent else delta_rule_chunked)(*args).transpose(1, 2)
        z = self.in_proj_z(h).reshape(B, T, nv, dv)
        o = self.norm(o) * F.silu(z)
        return self.out_proj(o.reshape(B, T, nv * dv))


def rope(x, pos, rot, theta):
    """Partial NeoX rotation of the first rot dims. x [B, T, heads, hd], pos [T]."""
    half = rot // 2
    inv = theta ** (-torch.arange(0, half, dtype=torch.float64) * 2.0 / rot)
    f = (pos.double()[:, None] * inv[None]).float()
    cos, sin = f.cos()[None, :, None], f.sin()[None, :, None]
    x1, x2, rest = x[..., :half], x[..., half:rot], x[..., rot:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], -1)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        H, KV, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = lin(c.hidden_size, H * hd * 2)
        self.k_proj = lin(c.hidden_size, KV * hd)
        self.v_proj = lin(c.hidden_size, KV * hd)
        self.o_proj = lin(H * hd, c.hidden_size)
        self.q_norm = Norm(hd, c.rms_norm_eps)
        self.k_norm = Norm(hd, c.rms_norm_eps)

    def forward(self, h, pos):
        c = self.c
        B, T, _ = h.shape
        H, KV, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        qg = self.q_proj(h).reshape(B, T, H, 2 * hd)
        q, gate = qg.chunk(2, -1)
        q = rope(self.q_norm(q), pos, c.rot, c.rope_theta)
        k = rope(self.k_norm(self.k_proj(h).reshape(B, T, KV, hd)), pos, c.rot, c.rope_theta)
        v = self.v_proj(h).reshape(B, T, KV, hd)
        k = k.repeat_interleave(H // KV, dim=2)
        v = v.repeat_interleave(H // KV, dim=2)
        s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
        mask = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
        s = s.masked_fill(~mask, float("-inf")).softmax(-1)
        o = torch.einsum("bhts,bshd->bthd", s, v) * torch.sigmoid(gate)
        return self.o_proj(o.reshape(B, T, H * hd))


class Experts(nn.Module):
    def __init__(self, c):
        super().__init__()
        E, F_, D = c.num_experts, c.moe_intermediate_size, c.hidden_size
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * F_, D) * 0.02)
        self.down_proj = nn.Parameter(torch.randn(E, D, F_) * 0.02)


class SharedExpert(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = lin(c.hidden_size, c.shared_expert_intermediate_size)
        self.up_proj = lin(c.hidden_size, c.shared_expert_intermediate_size)
        self.down_proj = lin(c.shared_expert_intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.gate = lin(c.hidden_size, c.num_experts)
        self.experts = Experts(c)
        self.shared_expert = SharedExpert(c)
        self.shared_expert_gate = lin(c.hidden_size, 1)

    def forward(self, h):
        """Returns (y, aux load-balancing loss, per-expert token counts)."""
        c = self.c
        shape = h.shape
        x = h.reshape(-1, shape[-1])
        N, E, K, F_ = x.shape[0], c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size
        probs = self.gate(x).softmax(-1)
        topv, topi = probs.topk(K, -1)
        w = topv / topv.sum(-1, keepdim=True)
        counts = torch.bincount(topi.reshape(-1), minlength=E)
        order = torch.sort(topi.reshape(-1), stable=True)[1]
        rows_all = order // K
        xs = x[rows_all]                       # tokens grouped by expert
        outs = []
        gate_up, down = self.experts.gate_up_proj.unbind(0), self.experts.down_proj.unbind(0)
        for e, seg in enumerate(xs.split(counts.tolist())):
            if seg.shape[0] == 0:
                continue
            g_, u_ = (seg @ gate_up[e].t()).chunk(2, -1)
            outs.append((F.silu(g_) * u_) @ down[e].t())
        ys = torch.cat(outs) * w.reshape(-1)[order][:, None]
        y = torch.zeros_like(x).index_add(0, rows_all, ys)
        y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        frac = counts.float() / (N * K)
        aux = E * (frac * probs.mean(0)).sum()
        return y.reshape(shape), aux, counts


class Layer(nn.Module):
    def __init__(self, c, full):
        super().__init__()
        self.full = full
        self.input_layernorm = Norm(c.hidden_size, c.rms_norm_eps)
        if full:
            self.self_attn = Attention(c)
        else:
            self.linear_attn = GatedDeltaNet(c)
        self.post_attention_layernorm = Norm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MoE(c)

    def forward(self, x, pos, recurrent=False):
        h = self.input_layernorm(x)
        x = x + (self.self_attn(h, pos) if self.full else self.linear_attn(h, recurrent))
        y, aux, counts = self.mlp(self.post_attention_layernorm(x))
        return x + y, aux, counts


class LanguageModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Layer(c, t == "full_attention") for t in c.layer_types)
        self.norm = Norm(c.hidden_size, c.rms_norm_eps)


class Inner(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.language_model = LanguageModel(c)


class MTP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc = lin(2 * c.hidden_size, c.hidden_size)
        self.pre_fc_norm_embedding = Norm(c.hidden_size, c.rms_norm_eps)
        self.pre_fc_norm_hidden = Norm(c.hidden_size, c.rms_norm_eps)
        self.layers = nn.ModuleList([Layer(c, True)])
        self.norm = Norm(c.hidden_size, c.rms_norm_eps)


class Model(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.model = Inner(c)
        self.lm_head = lin(c.hidden_size, c.vocab_size)
        self.mtp = MTP(c)
        self._init()

    def _init(self):
        std = 0.02
        n_res = 2 * len(self.c.layer_types)
        for name, p in self.named_parameters():
            if p.dim() >= 2 and "conv1d" not in name:
                nn.init.normal_(p, 0.0, std)
                if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight",
                                  "experts.down_proj")):
                    p.data.mul_(1.0 / math.sqrt(n_res))

    def forward(self, ids, recurrent=False):
        """ids [B, T] -> (logits [B, T, V], final hidden [B, T, D], aux loss, expert counts)."""
        lm = self.model.language_model
        T = ids.shape[1]
        pos = torch.arange(T, device=ids.device)
        x = lm.embed_tokens(ids)
        aux, counts = 0.0, []
        for layer in lm.layers:
            x, a, cnt = layer(x, pos, recurrent)
            aux = aux + a
            counts.append(cnt)
        h = lm.norm(x)
        return self.lm_head(h), h, aux, counts

    def mtp_forward(self, next_ids, h):
        """MTP logits at positions t = 0..T-1 (predicting token t+2) from the trunk's final
        hidden h[t] (detached) and the embedding of next_ids[t] = token t+1; embeddings and
        lm_head are shared and not trained through this path. Positions are those of t+1."""
        lm = self.model.language_model
        e = F.embedding(next_ids, lm.embed_tokens.weight.detach())
        u = self.mtp.fc(torch.cat([self.mtp.pre_fc_norm_embedding(e),
                                   self.mtp.pre_fc_norm_hidden(h.detach())], -1))
        pos = torch.arange(1, next_ids.shape[1] + 1, device=next_ids.device)
        u, aux, _ = self.mtp.layers[0](u, pos)
        return F.linear(self.mtp.norm(u), self.lm_head.weight.detach()), aux

    def hf_state_dict(self):
        """Tensors under their Hugging Face names: trunk experts fused, MTP experts per expert."""
        out = {}
        F_ = self.c.moe_intermediate_size
        for k, v in self.state_dict().items():
            if k.startswith("mtp.layers.0.mlp.experts."):
                if k.endswith("gate_up_proj"):
                    for e in range(v.shape[0]):
                        out[f"mtp.layers.0.mlp.experts.{e}.gate_proj.weight"] = v[e, :F_]
                        out[f"mtp.layers.0.mlp.experts.{e}.up_proj.weight"] = v[e, F_:]
                else:
                    for e in range(v.shape[0]):
                        out[f"mtp.layers.0.mlp.experts.{e}.down_proj.weight"] = v[e]
            else:
                out[k] = v
        return out

    def load_hf_state_dict(self, sd):
        own = {}
        E, F_ = self.c.num_experts, self.c.moe_intermediate_size
        for k, v in sd.items():
            if not k.startswith("mtp.layers.0.mlp.experts."):
                own[k] = v
        p = "mtp.layers.0.mlp.experts."
        own[p + "gate_up_proj"] = torch.stack([torch.cat([sd[f"{p}{e}.gate_proj.weight"],
                                                          sd[f"{p}{e}.up_proj.weight"]], 0)
                                               for e in range(E)])
        own[p + "down_proj"] = torch.stack([sd[f"{p}{e}.down_proj.weight"] for e in range(E)])
        self.load_state_dict(own, strict=True)


def selftest(c):
    """The chunked delta rule equals the recurrence; the whole model agrees both ways."""
    torch.manual_seed(0)
    B, Hh, T, dk, dv = 2, 3, 150, 8, 6
    q, k = l2norm(torch.randn(B, Hh, T, dk)), l2norm(torch.randn(B, Hh, T, dk))
    v = torch.randn(B, Hh, T, dv)
    g = -torch.rand(B, Hh, T) * 2
    beta = torch.rand(B, Hh, T)
    d = (delta_rule_chunked(q, k, v, g, beta) - delta_rule_recurrent(q, k, v, g, beta)).abs().max()
    assert d < 1e-4, f"chunked vs recurrent delta rule: {d}"
    m = Model(c)
    ids = torch.randint(0, c.vocab_size, (1, 70))
    with torch.no_grad():
        a = m(ids)[0]
        b = m(ids, recurrent=True)[0]
    d2 = (a - b).abs().max()
    assert d2 < 1e-4, f"model chunked vs recurrent: {d2}"
    return float(d), float(d2)
