"""GGUF files load through kvx.models (weights dequantised by transformers) and give the same numbers."""

import torch
from safetensors.torch import load_file

from kvx.models import ModelConfig, load_model
from kvx.runner import run

from .helpers import compose_cfg


def write_llama_gguf(src, dst, n_heads=8, n_kv_heads=4, n_layers=5):
    """Write a Llama safetensors checkpoint as an F32 GGUF file, the way llama.cpp's converter lays it out."""
    import gguf

    sd = load_file(str(src / "model.safetensors"))
    w = gguf.GGUFWriter(str(dst), "llama")
    w.add_context_length(512)
    w.add_embedding_length(64)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(172)
    w.add_rope_dimension_count(8)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(512)

    def permute(t, heads):  # llama.cpp stores q/k rows interleaved per rotary pair
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(n_layers):
        for hf, gg in parts.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for key, t in sd.items():
        if "q_proj" in key:
            t = permute(t, n_heads)
        elif "k_proj" in key:
            t = permute(t, n_kv_heads)
        w.add_tensor(names[key], t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_model_matches_safetensors(tmp_path, assets, stories):
    src = assets / "models" / "stories260k"
    path = tmp_path / "stories260k-f32.gguf"
    write_llama_gguf(src, path)
    model, _ = load_model(ModelConfig(name="gguf", name_or_path=str(path), tokenizer=str(src)))
    ref, tok = stories
    x = torch.tensor([tok("Once upon a time").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, atol=1e-6, rtol=0)
    res = run(compose_cfg([f"results_dir={tmp_path}", "model=gguf", f"model.name_or_path={path}",
                           f"model.tokenizer={src}", "model.device=cpu", "task.max_tokens=3000", "progress=false"]))
    base = run(compose_cfg([f"results_dir={tmp_path}", "task.max_tokens=3000", "progress=false"]))
    assert abs(res.metrics["ppl"] - base.metrics["ppl"]) < 1e-6
