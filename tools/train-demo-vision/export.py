"""safetensors I/O (bf16 out; bf16/f32 in) and the text-model config helper."""

import json
import struct

import numpy as np
import torch

import vision as V


def write_safetensors(path, tensors):
    """bf16 safetensors, keys sorted, header padded with spaces to a multiple of 8."""
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for k in sorted(tensors):
        t = tensors[k].detach().float().to(torch.bfloat16).contiguous()
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
        a, b = v["data_offsets"]
        if v["dtype"] == "BF16":
            raw = torch.from_numpy(np.frombuffer(data[a:b], dtype=np.int16).copy())
            out[k] = raw.view(torch.bfloat16).float().reshape(v["shape"])
        elif v["dtype"] == "F32":
            out[k] = torch.from_numpy(np.frombuffer(data[a:b], dtype="<f4").copy()).reshape(
                v["shape"])
        else:
            raise ValueError(f"{k}: dtype {v['dtype']}")
    return out


def text_cfg(cfg):
    """config.json -> the text model's Cfg (and sets the M-RoPE sections)."""
    t = cfg["text_config"]
    rp = t["rope_parameters"]
    V.MROPE_SECTION[:] = rp["mrope_section"]
    assert rp.get("mrope_interleaved", False)
    return V.M.Cfg(hidden_size=t["hidden_size"], layer_types=t["layer_types"],
                   linear_num_key_heads=t["linear_num_key_heads"],
                   linear_num_value_heads=t["linear_num_value_heads"],
                   linear_key_head_dim=t["linear_key_head_dim"],
                   linear_value_head_dim=t["linear_value_head_dim"],
                   linear_conv_kernel_dim=t["linear_conv_kernel_dim"],
                   rms_norm_eps=t["rms_norm_eps"], num_attention_heads=t["num_attention_heads"],
                   num_key_value_heads=t["num_key_value_heads"], head_dim=t["head_dim"],
                   partial_rotary_factor=rp["partial_rotary_factor"],
                   rope_theta=float(rp["rope_theta"]),
                   num_experts=t["num_experts"], num_experts_per_tok=t["num_experts_per_tok"],
                   moe_intermediate_size=t["moe_intermediate_size"],
                   shared_expert_intermediate_size=t["shared_expert_intermediate_size"],
                   vocab_size=t["vocab_size"])


def load_vl(d):
    """A VLModel (float32) from a checkpoint directory with config.json + model.safetensors."""
    import os
    cfg = json.load(open(os.path.join(d, "config.json")))
    m = V.VLModel(text_cfg(cfg), V.VCfg(cfg["vision_config"]), cfg["image_token_id"])
    m.load_hf_state_dict(read_safetensors(os.path.join(d, "model.safetensors")))
    return m.eval(), cfg
