"""mplib.memory: exact parameter bytes, activation bytes against a real forward, no allocation."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

import mplib.plot
from mplib.memory import MemoryEstimate, estimate, measure, measure_activations
from mplib.models.bert import BERT, BERT_TINY
from mplib.models.gpt import GPT, GPT_TINY, GPTConfig

HF_GPT2_TINY = GPT2Config(vocab_size=512, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                          bos_token_id=0, eos_token_id=0)
HF_BERT_TINY = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=256, max_position_embeddings=32)  # dropout 0.1: masks saved
CONFIGS = {"gpt": (GPT_TINY, GPT), "bert": (BERT_TINY, BERT),
           "hf-gpt2": (HF_GPT2_TINY, GPT2LMHeadModel), "hf-bert": (HF_BERT_TINY, BertForMaskedLM)}


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights once


@pytest.mark.parametrize("name", list(CONFIGS))
def test_param_bytes_equal_exact_parameter_count(name):
    config, ctor = CONFIGS[name]
    n = _count(ctor(config))
    est = estimate(config, batch=2, seq=16)
    assert est.num_parameters == n
    assert est.params == est.grads == 4 * n
    assert est.optimizer == 8 * n  # Adam: two fp32 states


@pytest.mark.parametrize("name", list(CONFIGS))
def test_activation_bytes_within_5_percent_of_a_real_forward(name):
    config, ctor = CONFIGS[name]
    ids = torch.randint(0, 512, (2, 16))
    measured = measure_activations(ctor(config), ids)
    assert measured > 0
    est = estimate(config, batch=2, seq=16)
    assert abs(est.activations - measured) <= 0.05 * measured


def test_one_layer_repeated_gives_the_same_blocks_as_the_full_model():
    config = GPTConfig(vocab_size=128, block_size=32, n_layer=3, n_head=2, n_embd=16)
    from_config = estimate(config, batch=2, seq=8)
    from_module = estimate(GPT(config), batch=2, seq=8)
    assert len(from_config.per_block) == len(from_module.per_block) == 5
    assert [b.params for b in from_config.per_block] == [b.params for b in from_module.per_block]
    assert [b.activations for b in from_config.per_block] == [b.activations for b in from_module.per_block]
    assert from_config.per_block[2].activations > 0


def test_estimate_of_a_module_equals_a_real_forward_exactly():
    model = GPT(GPT_TINY)
    measured = measure_activations(model, torch.zeros(2, 16, dtype=torch.long))
    assert measured > 0
    assert estimate(model, batch=2, seq=16).activations == measured


def test_estimate_leaves_the_module_untouched_and_in_its_mode():
    model = GPT(GPT_TINY).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    estimate(model, batch=2, seq=16)
    assert not model.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
        assert type(v) is torch.Tensor  # no fake tensor left behind


def test_optimizer_states_per_parameter():
    n = estimate(GPT_TINY, 2, 16).num_parameters
    assert estimate(GPT_TINY, 2, 16, optimizer="sgd").optimizer == 4 * n  # momentum
    assert estimate(GPT_TINY, 2, 16, optimizer="none").optimizer == 0
    assert estimate(GPT_TINY, 2, 16, optimizer="adamw").optimizer == 8 * n


def test_mixed_precision_is_16_bytes_per_parameter_with_adam():
    est = estimate(GPT_TINY, 2, 16, dtype=torch.bfloat16, mixed_precision=True)
    n = est.num_parameters
    assert (est.params, est.grads, est.optimizer) == (2 * n, 2 * n, 12 * n)  # bf16, bf16, fp32 master + 2 states
    fp32 = estimate(GPT_TINY, 2, 16)
    assert 0 < est.activations < fp32.activations  # bf16 activations take less


def test_total_is_the_sum_of_the_parts():
    est = estimate(BERT_TINY, 2, 16)
    assert est.total == est.params + est.grads + est.optimizer + est.activations
    assert est.activations == sum(b.activations for b in est.per_block)


@pytest.mark.parametrize("name", ["ours", "hf"])
def test_gpt3_175b_config_is_estimated_with_the_exact_parameter_count(name):
    L, d, V, P = 96, 12288, 50257, 2048
    config = (GPTConfig(vocab_size=V, block_size=P, n_layer=L, n_head=96, n_embd=d) if name == "ours" else
              GPT2Config(vocab_size=V, n_positions=P, n_layer=L, n_head=96, n_embd=d))
    est = estimate(config, batch=1, seq=2048)
    # per layer: attention 4d^2 + 4d, MLP 8d^2 + 5d, two layer norms 4d; embeddings; final norm
    assert est.num_parameters == L * (12 * d * d + 13 * d) + V * d + P * d + 2 * d
    assert est.params == 4 * est.num_parameters
    assert est.activations > 0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_estimate_total_is_within_5_percent_of_a_measured_adam_step(name):
    config, ctor = CONFIGS[name]
    real = measure(ctor(config), torch.randint(0, 512, (2, 16)), optimizer="adam")
    assert real.activations > 0 and real.grads > 0 and real.optimizer > 0
    est = estimate(config, batch=2, seq=16, optimizer="adam")
    assert (est.params, est.grads) == (real.params, real.grads)  # parameters and .grad: exact
    # Adam's real state also holds one 4-byte step counter per parameter tensor: a few hundred bytes
    assert 0 <= real.optimizer - est.optimizer <= 4 * len(list(ctor(config).parameters()))
    assert abs(est.total - real.total) <= 0.05 * real.total


def test_measure_counts_sgd_momentum_and_plain_sgd_states():
    model, ids = GPT(GPT_TINY), torch.zeros(2, 16, dtype=torch.long)
    n = sum(p.numel() for p in model.parameters())
    assert measure(model, ids, optimizer="sgd").optimizer == 4 * n  # one momentum buffer per parameter
    assert measure(model, ids, optimizer="none").optimizer == 0


def test_measure_leaves_the_model_untouched():
    model = GPT(GPT_TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure(model, torch.zeros(2, 16, dtype=torch.long))
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_non_token_model_takes_meta_inputs():
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    measured = measure_activations(model, torch.randn(5, 8))
    assert measured > 0
    est = estimate(model, batch=5, seq=1, inputs=[torch.empty(5, 8, device="meta")])
    assert est.activations == measured


@pytest.mark.slow
def test_estimate_of_a_1_5b_config_does_not_allocate():
    # GPT-2 XL really allocated would take >6 GB of parameters alone; a fresh process shows the peak.
    code = textwrap.dedent("""
        import resource
        from mplib.memory import estimate
        from mplib.models.gpt import GPT2_XL
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        est = estimate(GPT2_XL, batch=8, seq=1024)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(est.num_parameters, est.total, grown)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    n, total, grown_kib = map(int, out.split())
    assert n > 1.5e9 and total > 25 * 2**30
    assert grown_kib < 200 * 1024, f"peak RSS grew by {grown_kib / 1024:.0f} MiB"


@pytest.mark.parametrize("kwargs, match", [
    ({"batch": 0}, "batch must be a positive int"),
    ({"seq": 2.5}, "seq must be a positive int"),
    ({"dtype": torch.int64}, "dtype must be a floating dtype"),
    ({"optimizer": "lion"}, "optimizer must be one of"),
    ({"mixed_precision": True}, "16-bit dtype"),
    ({"seq": 65}, "longer than the model reads"),
])
def test_estimate_rejects_bad_arguments(kwargs, match):
    args = {"batch": 2, "seq": 16, **kwargs}
    with pytest.raises(ValueError, match=match):
        estimate(GPT_TINY, **args)


def test_estimate_rejects_unknown_configs_and_missing_inputs():
    with pytest.raises(TypeError, match="GPTConfig / BERTConfig"):
        estimate({"n_layer": 2}, 2, 16)
    with pytest.raises(TypeError, match="pass the inputs"):
        estimate(nn.Sequential(nn.Linear(4, 4)), 2, 16)


def test_plot_memory_stacks_four_parts_per_model():
    import matplotlib.pyplot as plt

    est = {"gpt": estimate(GPT_TINY, 2, 16), "bert": estimate(BERT_TINY, 2, 16)}
    ax = mplib.plot.memory(est, logy=False)
    assert len(ax.patches) == 4 * 2
    assert isinstance(est["gpt"], MemoryEstimate)
    ax2 = mplib.plot.memory_vs_gpus(est)
    assert len(ax2.patches) == 2 * 5  # two models x five catalog GPUs
    plt.close("all")


@pytest.mark.cuda
def test_estimate_on_a_gpu_model_counts_what_the_gpu_kernels_save():
    model = GPT(GPT_TINY).cuda()
    ids = torch.zeros(2, 16, dtype=torch.long, device="cuda")
    real = measure(model, ids)
    assert real.activations > 0
    est = estimate(model, batch=2, seq=16)  # fake twins on cuda: the CUDA kernels' saved tensors
    assert est.activations == real.activations
    assert abs(est.total - real.total) <= 0.05 * real.total
