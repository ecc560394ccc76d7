"""gpt-oss (llama.cpp LLM_ARCH_OPENAI_MOE, src/models/openai-moe.cpp): attention with q/k/v/o
biases and a learned sink per head, a sliding window on even layers and full attention on odd
ones (the loader's default pattern, period 2), a post-attention RMS norm, and a routed mixture
of experts with biases everywhere (softmax over the top-k router logits, clamped SwiGLU), YaRN
rope scaling and an untied output head. Its model-type switch on the layer count (24, 36) only
names the model.

The graph always builds the sliding-window cache, so llama.cpp aborts on a slice without any
sliding-window layer: a slice of one odd layer is refused (``Family.swa_required``). Cuts here
start on sliding and full layers alike; [0, 1) holds only a sliding-window layer."""

from __future__ import annotations

from pathlib import Path

from tests.support.tiny._common import Weights, experts, finish, start

ARCH = "gpt-oss"
N_LAYER = 6
CUTS = [[3], [1, 4], [2, 4]]
E, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16
N_EXPERT, N_EXPERT_USED, FF_EXP = 4, 2, 32
WINDOW = 8  # the 30-token prompt crosses it


def write(path: Path) -> Path:
    w, n_vocab = start(path, ARCH, N_LAYER, E, n_ctx_train=16384)
    r = Weights(seed=41)
    w.add_uint32(f"{ARCH}.feed_forward_length", FF_EXP)
    w.add_uint32(f"{ARCH}.expert_feed_forward_length", FF_EXP)
    w.add_uint32(f"{ARCH}.expert_count", N_EXPERT)
    w.add_uint32(f"{ARCH}.expert_used_count", N_EXPERT_USED)
    w.add_uint32(f"{ARCH}.attention.head_count", HEADS)
    w.add_uint32(f"{ARCH}.attention.head_count_kv", KV_HEADS)
    w.add_uint32(f"{ARCH}.attention.key_length", HEAD_DIM)
    w.add_uint32(f"{ARCH}.attention.value_length", HEAD_DIM)
    w.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32(f"{ARCH}.attention.sliding_window", WINDOW)
    w.add_float32(f"{ARCH}.rope.freq_base", 150000.0)
    w.add_string(f"{ARCH}.rope.scaling.type", "yarn")
    w.add_float32(f"{ARCH}.rope.scaling.factor", 4.0)
    w.add_uint32(f"{ARCH}.rope.scaling.original_context_length", 4096)
    w.add_tensor("token_embd.weight", r.vec(n_vocab, E, scale=0.5))
    w.add_tensor("output.weight", r.mat(n_vocab, E))
    w.add_tensor("output_norm.weight", r.norm(E))
    for il in range(N_LAYER):
        p = f"blk.{il}"
        w.add_tensor(f"{p}.attn_norm.weight", r.norm(E))
        w.add_tensor(f"{p}.attn_q.weight", r.mat(HEADS * HEAD_DIM, E))
        w.add_tensor(f"{p}.attn_k.weight", r.mat(KV_HEADS * HEAD_DIM, E))
        w.add_tensor(f"{p}.attn_v.weight", r.mat(KV_HEADS * HEAD_DIM, E))
        w.add_tensor(f"{p}.attn_q.bias", r.vec(HEADS * HEAD_DIM))
        w.add_tensor(f"{p}.attn_k.bias", r.vec(KV_HEADS * HEAD_DIM))
        w.add_tensor(f"{p}.attn_v.bias", r.vec(KV_HEADS * HEAD_DIM))
        w.add_tensor(f"{p}.attn_output.weight", r.mat(E, HEADS * HEAD_DIM))
        w.add_tensor(f"{p}.attn_output.bias", r.vec(E))
        w.add_tensor(f"{p}.attn_sinks.weight", r.vec(HEADS, scale=1.0))
        w.add_tensor(f"{p}.post_attention_norm.weight", r.norm(E))
        w.add_tensor(f"{p}.ffn_gate_inp.weight", r.mat(N_EXPERT, E, scale=3.0))
        w.add_tensor(f"{p}.ffn_gate_inp.bias", r.vec(N_EXPERT))
        # Experts stacked on the slowest axis: GGUF shapes {E, FF_EXP, N_EXPERT} and
        # {FF_EXP, E, N_EXPERT}; their biases {FF_EXP, N_EXPERT} and {E, N_EXPERT}.
        w.add_tensor(f"{p}.ffn_gate_exps.weight", experts(r, N_EXPERT, FF_EXP, E))
        w.add_tensor(f"{p}.ffn_up_exps.weight", experts(r, N_EXPERT, FF_EXP, E))
        w.add_tensor(f"{p}.ffn_down_exps.weight", experts(r, N_EXPERT, E, FF_EXP))
        w.add_tensor(f"{p}.ffn_gate_exps.bias", r.vec(N_EXPERT, FF_EXP))
        w.add_tensor(f"{p}.ffn_up_exps.bias", r.vec(N_EXPERT, FF_EXP))
        w.add_tensor(f"{p}.ffn_down_exps.bias", r.vec(N_EXPERT, E))
    return finish(w, path)
