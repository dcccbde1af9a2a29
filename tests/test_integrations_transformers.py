"""transformers with attn_implementation="quantattn": tiny randomly initialized models built from configs
(no downloads), bfloat16 on CPU, where quantattn runs its reference (register(cpu="reference")).

Each model's output with quantattn is compared with the same model on transformers' SDPA; the max
|difference| per model class is what the README reports. Masks the kernels cannot take fall back to
transformers' SDPA path, counted."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import quantattn  # noqa: E402
import quantattn.integrations.transformers as T  # noqa: E402
from quantattn.integrations import torch_sdpa as S  # noqa: E402

VOCAB, SEQ = 128, 32
LM = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
          max_position_embeddings=128)  # fmt: skip

# model class -> config; query heads 4, so kv heads 2 and 1 are GQA and MQA
MODELS = {
    "LlamaForCausalLM": lambda: transformers.LlamaConfig(num_key_value_heads=2, **LM),
    "Qwen2ForCausalLM": lambda: transformers.Qwen2Config(num_key_value_heads=2, **LM),
    "MistralForCausalLM": lambda: transformers.MistralConfig(num_key_value_heads=1, sliding_window=None, **LM),
    "GPT2LMHeadModel": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0
    ),  # fmt: skip
    "BertModel": lambda: transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
    ),  # fmt: skip
}
# max |logit (or hidden state) difference| against transformers' SDPA, per model class: README, closing note
MAX_DIFFERENCE: dict[str, float] = {}


@pytest.fixture(autouse=True)
def registered():
    T.register(cpu="reference")
    S.reset_fallbacks()


def build(name):
    torch.manual_seed(0)
    return getattr(transformers, name)._from_config(MODELS[name](), attn_implementation="quantattn").eval().bfloat16()


def ids(seed, batch=2, n=SEQ):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def forward(model, implementation, *args, **kwargs):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(*args, **kwargs)[0].float()


def rel_l1(a, b):
    return float((a - b).abs().sum() / b.abs().sum())


@pytest.mark.parametrize("name", MODELS)
def test_model_runs_quantattn_and_matches_sdpa(name, monkeypatch):
    model, x = build(name), ids(1)
    calls = []
    real = S.routed_sdpa
    monkeypatch.setattr(S, "routed_sdpa", lambda *a: calls.append(a[1].shape) or real(*a))
    ours, theirs = forward(model, "quantattn", x), forward(model, "sdpa", x)
    assert len(calls) == 2 and not S.fallbacks  # both layers, quantized
    MAX_DIFFERENCE[name] = float((ours - theirs).abs().max())
    # one default-variant attention alone has relative L1 ~0.038 on random inputs (README, Performance)
    assert rel_l1(ours, theirs) < 0.04, (name, rel_l1(ours, theirs), MAX_DIFFERENCE[name])


def test_gqa_passes_kv_heads_unrepeated(monkeypatch):
    model = build("MistralForCausalLM")  # 4 query heads, 1 kv head
    seen = []
    real = quantattn.sageattn
    monkeypatch.setattr(
        S, "sageattn", lambda q, k, v, *a, **kw: seen.append((q.shape[1], k.shape[1])) or real(q, k, v, *a, **kw)
    )
    forward(model, "quantattn", ids(2))
    assert seen == [(4, 1), (4, 1)]


def test_decoding_with_a_cache_uses_quantattn():
    model, x = build("LlamaForCausalLM"), ids(3, batch=1)
    outs = {}
    for implementation in ("quantattn", "sdpa"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            cache = model(x[:, :-1], use_cache=True).past_key_values
            outs[implementation] = model(x[:, -1:], past_key_values=cache, use_cache=True).logits.float()
    assert not S.fallbacks  # prefill (causal) and the one-token step (no mask) are both quantized
    assert rel_l1(outs["quantattn"], outs["sdpa"]) < 0.04


def test_greedy_generation_runs():
    model = build("Qwen2ForCausalLM")
    with torch.no_grad():
        out = model.generate(ids(4, batch=1, n=8), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12) and not S.fallbacks


def test_padding_mask_runs_quantized_with_the_mask():
    for name in ("LlamaForCausalLM", "BertModel"):
        model, x = build(name), ids(5)
        mask = torch.ones_like(x)
        mask[0, :5] = 0  # left padding of the first sequence (for Bert: any padding)
        ours = forward(model, "quantattn", x, attention_mask=mask)
        assert not S.fallbacks, name  # transformers' bool padding mask goes to the kernels
        expected = forward(model, "sdpa", x, attention_mask=mask)
        real = mask.bool()  # padded positions' outputs are not compared (fully masked rows: zeros here)
        assert rel_l1(ours[real], expected[real]) < 0.04, name
        unmasked = forward(model, "quantattn", x)
        assert rel_l1(unmasked[0][real[0]], expected[0][real[0]]) > 2 * rel_l1(ours[real], expected[real]), name


def test_float32_and_training_with_dropout_fall_back():
    model, x = build("LlamaForCausalLM"), ids(6)
    model.float()
    assert torch.equal(forward(model, "quantattn", x), forward(model, "sdpa", x))
    assert any(reason.startswith("dtype torch.float32") for reason in S.fallbacks)
    model.bfloat16().train()
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    model.set_attn_implementation("quantattn")
    model(x).logits.float().sum().backward()  # gradients flow: torch's SDPA ran
    assert "dropout_p > 0" in S.fallbacks


def test_cpu_fallback_mode_is_exactly_sdpa():
    T.register(cpu="fallback")
    model, x = build("LlamaForCausalLM"), ids(7)
    assert torch.equal(forward(model, "quantattn", x), forward(model, "sdpa", x))
    # the hint names the call that takes cpu= here: register, not patch
    assert list(S.fallbacks) == ["CPU tensors (register(cpu='reference') runs quantattn's slow reference on them)"]


def test_register_is_idempotent_and_takes_a_config():
    assert T.register() == "quantattn" and T.register() == "quantattn"
    name = T.register("quantattn-sage1", config=quantattn.VARIANTS["sage1"], cpu="reference")
    model, x = build("LlamaForCausalLM"), ids(8)
    sage1 = forward(model, name, x)
    assert not torch.equal(sage1, forward(model, "quantattn", x))  # another variant, another rounding
    with pytest.raises(ValueError, match="transformers' own"):
        T.register("sdpa")
    with pytest.raises(ValueError, match="cpu must be"):
        T.register(cpu="gpu")


def test_compiles_with_fullgraph():
    model, x = build("LlamaForCausalLM"), ids(9)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
            assert torch.equal(compiled(x).logits, model(x).logits)
    finally:
        torch._dynamo.reset()
