"""FLOP counting from an HF config, checked by hand and against the modules."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from batchlm.bench.roofline import lm_head_params, linear_params, matmul_gflops, workload_flops


def _config(**kw):
    base = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2)
    base.update(kw)
    return LlamaConfig(**base)


def test_linear_params_by_hand():
    c = _config()
    head_dim = 32 // 4
    per_layer = (32 * 4 * head_dim      # q
                 + 2 * 32 * 2 * head_dim  # k, v
                 + 4 * head_dim * 32      # o
                 + 3 * 32 * 48)           # gate, up, down
    assert linear_params(c) == 3 * per_layer == 3 * (1024 + 1024 + 1024 + 4608)
    assert lm_head_params(c) == 100 * 32


def test_linear_params_match_the_modules_and_explicit_head_dim():
    c = _config(head_dim=16)  # head_dim != hidden / heads
    model = LlamaForCausalLM(c)
    counted = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert linear_params(c) == counted
    assert linear_params(c.to_dict()) == counted  # a config.json dict works too


def test_workload_flops():
    c = _config()
    lin, head = linear_params(c), lm_head_params(c)
    assert workload_flops(c, 10, 0) == 2 * lin * 10
    assert workload_flops(c, 10, 5) == 2 * lin * 10 + 2 * (lin + head) * 5


def test_matmul_gflops_is_positive():
    assert matmul_gflops(n=64, warmup=1, repeats=3) > 0
