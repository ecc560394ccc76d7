"""DeepSeek V3 / R1 / Kimi K2 layout (llama.cpp src/models/deepseek2.cpp): multi-head latent
attention (query LoRA, compressed KV with a shared RoPE key, absorbed k_b/v_b), YaRN RoPE with
a log multiplier, two leading dense blocks then MoE blocks (sigmoid gating with a selection bias,
two expert groups, top-k weights normalised and scaled, one shared expert), and one trailing
multi-token-prediction block (``nextn_predict_layers`` = 1, counted in ``block_count``) that
the trunk graph never runs: slices leave it out. Cuts cross the dense/MoE boundary inside a
stage (``leading_dense_block_count`` re-based) and at it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.support.tiny._common import Weights, add_ffn, experts, finish, start

ARCH = "deepseek2"
N_LAYER = 5  # trunk blocks; block_count also counts the nextn block
N_NEXTN = 1
N_DENSE = 2
CUTS = [[2], [1, 3], [3]]
E, HEADS, FF = 64, 4, 128
Q_LORA, KV_LORA, QK_NOPE, QK_ROPE, V_HEAD = 32, 32, 16, 8, 16
N_EXPERT, N_EXPERT_USED, FF_EXP = 4, 2, 32


def write(path: Path, n_layer: int = N_LAYER, lite: bool = False, legacy: bool = False,
          seed: int = 41) -> Path:
    """``lite``: DeepSeek-V2-Lite's layout (no query LoRA), which llama.cpp picks by the layer
    count (26 or 27). ``legacy``: an early V2 GGUF (one kv_b projection, no MLA head sizes: the
    graph decompresses K and V per head). Both without the nextn block and the gating key
    (llama.cpp defaults to softmax) or its V3 extras (selection bias, expert groups)."""
    v3 = not (lite or legacy)
    n_nextn = N_NEXTN if v3 else 0
    w, n_vocab = start(path, ARCH, n_layer + n_nextn, E)
    r = Weights(seed=seed)
    w.add_uint32(f"{ARCH}.feed_forward_length", FF)
    w.add_uint32(f"{ARCH}.expert_feed_forward_length", FF_EXP)
    w.add_uint32(f"{ARCH}.expert_count", N_EXPERT)
    w.add_uint32(f"{ARCH}.expert_used_count", N_EXPERT_USED)
    w.add_uint32(f"{ARCH}.expert_shared_count", 1)
    w.add_float32(f"{ARCH}.expert_weights_scale", 2.5)
    w.add_bool(f"{ARCH}.expert_weights_norm", True)
    w.add_uint32(f"{ARCH}.leading_dense_block_count", 1 if lite else N_DENSE)
    if v3:
        w.add_uint32(f"{ARCH}.expert_gating_func", 2)  # sigmoid
        w.add_uint32(f"{ARCH}.expert_group_count", 2)
        w.add_uint32(f"{ARCH}.expert_group_used_count", 1)
        w.add_uint32(f"{ARCH}.nextn_predict_layers", n_nextn)
    if not lite:
        w.add_uint32(f"{ARCH}.attention.q_lora_rank", Q_LORA)
    w.add_uint32(f"{ARCH}.attention.head_count", HEADS)
    w.add_uint32(f"{ARCH}.attention.kv_lora_rank", KV_LORA)
    if legacy:
        w.add_uint32(f"{ARCH}.attention.head_count_kv", HEADS)
        w.add_uint32(f"{ARCH}.attention.key_length", QK_NOPE + QK_ROPE)
        w.add_uint32(f"{ARCH}.attention.value_length", V_HEAD)
    else:
        w.add_uint32(f"{ARCH}.attention.head_count_kv", 1)
        w.add_uint32(f"{ARCH}.attention.key_length", KV_LORA + QK_ROPE)
        w.add_uint32(f"{ARCH}.attention.value_length", KV_LORA)
        w.add_uint32(f"{ARCH}.attention.key_length_mla", QK_NOPE + QK_ROPE)
        w.add_uint32(f"{ARCH}.attention.value_length_mla", V_HEAD)
    w.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_uint32(f"{ARCH}.rope.dimension_count", QK_ROPE)
    w.add_float32(f"{ARCH}.rope.freq_base", 10000.0)
    w.add_string(f"{ARCH}.rope.scaling.type", "yarn")
    w.add_float32(f"{ARCH}.rope.scaling.factor", 4.0)
    w.add_uint32(f"{ARCH}.rope.scaling.original_context_length", 512)
    w.add_float32(f"{ARCH}.rope.scaling.yarn_log_multiplier", 0.0707)
    w.add_tensor("token_embd.weight", r.vec(n_vocab, E, scale=0.5))
    w.add_tensor("output.weight", r.mat(n_vocab, E))
    w.add_tensor("output_norm.weight", r.norm(E))
    for il in range(n_layer + n_nextn):
        p = f"blk.{il}"
        w.add_tensor(f"{p}.attn_norm.weight", r.norm(E))
        if lite:
            w.add_tensor(f"{p}.attn_q.weight", r.mat(HEADS * (QK_NOPE + QK_ROPE), E))
        else:
            w.add_tensor(f"{p}.attn_q_a_norm.weight", r.norm(Q_LORA))
            w.add_tensor(f"{p}.attn_q_a.weight", r.mat(Q_LORA, E))
            w.add_tensor(f"{p}.attn_q_b.weight", r.mat(HEADS * (QK_NOPE + QK_ROPE), Q_LORA))
        w.add_tensor(f"{p}.attn_kv_a_norm.weight", r.norm(KV_LORA))
        w.add_tensor(f"{p}.attn_kv_a_mqa.weight", r.mat(KV_LORA + QK_ROPE, E))
        if legacy:
            w.add_tensor(f"{p}.attn_kv_b.weight", r.mat(HEADS * (QK_NOPE + V_HEAD), KV_LORA))
        else:  # GGUF shapes {QK_NOPE, KV_LORA, HEADS} and {KV_LORA, V_HEAD, HEADS}
            w.add_tensor(f"{p}.attn_k_b.weight",
                         np.stack([r.mat(KV_LORA, QK_NOPE) for _ in range(HEADS)]))
            w.add_tensor(f"{p}.attn_v_b.weight",
                         np.stack([r.mat(V_HEAD, KV_LORA) for _ in range(HEADS)]))
        w.add_tensor(f"{p}.attn_output.weight", r.mat(E, HEADS * V_HEAD))
        w.add_tensor(f"{p}.ffn_norm.weight", r.norm(E))
        if il < (1 if lite else N_DENSE):
            add_ffn(w, r, p, E, FF, norm=False)
        else:
            w.add_tensor(f"{p}.ffn_gate_inp.weight", r.mat(N_EXPERT, E, scale=3.0))
            if v3:
                w.add_tensor(f"{p}.exp_probs_b.bias", r.vec(N_EXPERT, scale=0.5))
            w.add_tensor(f"{p}.ffn_gate_exps.weight", experts(r, N_EXPERT, FF_EXP, E))
            w.add_tensor(f"{p}.ffn_up_exps.weight", experts(r, N_EXPERT, FF_EXP, E))
            w.add_tensor(f"{p}.ffn_down_exps.weight", experts(r, N_EXPERT, E, FF_EXP))
            w.add_tensor(f"{p}.ffn_gate_shexp.weight", r.mat(FF_EXP, E))
            w.add_tensor(f"{p}.ffn_up_shexp.weight", r.mat(FF_EXP, E))
            w.add_tensor(f"{p}.ffn_down_shexp.weight", r.mat(E, FF_EXP))
        if il >= n_layer:  # the multi-token-prediction block
            w.add_tensor(f"{p}.nextn.eh_proj.weight", r.mat(E, 2 * E))
            w.add_tensor(f"{p}.nextn.enorm.weight", r.norm(E))
            w.add_tensor(f"{p}.nextn.hnorm.weight", r.norm(E))
            w.add_tensor(f"{p}.nextn.shared_head_norm.weight", r.norm(E))
    return finish(w, path)
