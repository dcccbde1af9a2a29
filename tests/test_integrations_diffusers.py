"""diffusers with quantattn's attention processor: tiny randomly initialized DiT-style models built from
configs (no downloads), bfloat16 on CPU, where quantattn runs its reference (apply(cpu="reference")).

Each model's output with quantattn is compared with the same model on torch's SDPA, and with the whole
model under `quantattn.patched()`, which must give the same bits: the processor changes where the
attention runs, nothing else."""

from __future__ import annotations

import inspect

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import quantattn  # noqa: E402
import quantattn.integrations.diffusers as D  # noqa: E402
from quantattn.integrations import torch_sdpa as S  # noqa: E402

BF16 = torch.bfloat16


def randn(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(BF16)


def dit():
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2,
                                            sample_size=8, patch_size=2, norm_num_groups=32)  # fmt: skip
    return model, dict(hidden_states=randn(1, 2, 4, 8, 8), timestep=torch.tensor([10, 500]),
                       class_labels=torch.tensor([1, 3]))  # fmt: skip


def pixart():
    model = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                               out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                               cross_attention_dim=32, caption_channels=24, norm_num_groups=32)  # fmt: skip
    return model, dict(hidden_states=randn(2, 2, 4, 8, 8), encoder_hidden_states=randn(3, 2, 7, 24),
                       timestep=torch.tensor([10, 500]),
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None})  # fmt: skip


def sd3():
    model = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                            caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
                                            pos_embed_max_size=16)  # fmt: skip
    return model, dict(hidden_states=randn(4, 2, 4, 8, 8), encoder_hidden_states=randn(5, 2, 7, 24),
                       pooled_projections=randn(6, 2, 16), timestep=torch.tensor([10, 500]))  # fmt: skip


def flux():
    model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                             pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))  # fmt: skip
    grid = torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij")
    return model, dict(hidden_states=randn(7, 2, 16, 16), encoder_hidden_states=randn(8, 2, 7, 24),
                       pooled_projections=randn(9, 2, 16), timestep=torch.tensor([0.1, 0.5]).to(BF16),
                       img_ids=torch.stack(grid, -1).reshape(-1, 3), txt_ids=torch.zeros(7, 3))  # fmt: skip


# model class -> (builder, processors it has): self-attention and cross-attention, joint attention (SD3,
# Flux), rotary embeddings (Flux)
MODELS = {
    "DiTTransformer2DModel": (dit, 2),
    "PixArtTransformer2DModel": (pixart, 4),
    "SD3Transformer2DModel": (sd3, 2),
    "FluxTransformer2DModel": (flux, 2),
}
# max |output difference| against torch's SDPA, per model class: README, closing note
MAX_DIFFERENCE: dict[str, float] = {}


@pytest.fixture(autouse=True)
def clean():
    S.reset_fallbacks()
    yield
    assert not S._routes


def build(name):
    torch.manual_seed(0)
    model, inputs = MODELS[name][0]()
    return model.eval().to(BF16), inputs


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample.float()


@pytest.mark.parametrize("name", MODELS)
def test_processor_runs_quantattn_in_every_attention(name):
    model, inputs = build(name)
    plain = run(model, inputs)
    with quantattn.patched(cpu="reference"):
        patched = run(model, inputs)
    assert D.apply(model, cpu="reference") == MODELS[name][1]
    ours = run(model, inputs)
    assert not S.fallbacks
    assert torch.equal(ours, patched)  # every SDPA call of the model went to quantattn, nothing else changed
    MAX_DIFFERENCE[name] = float((ours - plain).abs().max())
    rel = float((ours - plain).abs().sum() / plain.abs().sum())
    assert 0 < rel < 0.04, (name, rel, MAX_DIFFERENCE[name])  # one attention alone: ~0.038 (README)
    assert D.remove(model) == MODELS[name][1]
    assert torch.equal(run(model, inputs), plain)


def test_keyword_arguments_reach_the_wrapped_processor():
    model, inputs = build("DiTTransformer2DModel")
    D.apply(model)
    attn = model.transformer_blocks[0].attn1
    wrapped = attn.processor
    assert type(wrapped).__name__ == "QuantAttnAttnProcessor2_0"
    # diffusers passes on only the keywords the processor's __call__ names: the wrapped one's
    assert inspect.signature(wrapped.__call__) == inspect.signature(wrapped.processor.__call__)


def test_skip_keeps_chosen_blocks_in_full_precision_and_apply_again_replaces():
    model, inputs = build("DiTTransformer2DModel")
    assert D.apply(model, skip="transformer_blocks.0.") == 1
    assert not isinstance(model.transformer_blocks[0].attn1.processor, D.QuantAttnProcessor)
    assert D.apply(model, config=quantattn.VARIANTS["sage1"], cpu="reference") == 2
    processor = model.transformer_blocks[1].attn1.processor
    assert processor.route.config == quantattn.VARIANTS["sage1"]
    assert not isinstance(processor.processor, D.QuantAttnProcessor)  # wrapped once, not twice


def test_masked_cross_attention_runs_quantized_with_its_mask():
    model, inputs = build("PixArtTransformer2DModel")
    mask = torch.ones(2, 7)
    mask[0, 5:] = 0
    masked = {**inputs, "encoder_attention_mask": mask}
    expected = run(model, masked)
    D.apply(model, cpu="reference")
    out = run(model, masked)
    assert not S.fallbacks  # the cross-attention's padding mask goes to the kernels
    assert (out.float() - expected.float()).abs().max() < 0.05
    # and it is applied: without it the output moves much further
    assert (run(model, inputs).float() - expected.float()).abs().max() > 2 * (
        out.float() - expected.float()
    ).abs().max()


def test_pipeline_applies_to_its_denoiser_only():
    model, _ = build("DiTTransformer2DModel")

    class Pipe:  # what apply() reads of a DiffusionPipeline
        components = {"transformer": model, "vae": torch.nn.Identity(), "scheduler": object()}

    assert D.apply(Pipe(), cpu="reference") == 2 and D.remove(Pipe()) == 2
    with pytest.raises(ValueError, match="none of the components"):
        D.apply(type("Empty", (), {"components": {"vae": torch.nn.Identity()}})())
    with pytest.raises(TypeError, match="diffusers model or pipeline"):
        D.apply(object())
    with pytest.raises(ValueError, match="cpu must be"):
        D.apply(model, cpu="gpu")


def test_compiles_with_fullgraph():
    model, inputs = build("PixArtTransformer2DModel")
    D.apply(model, cpu="reference")
    want = run(model, inputs)
    torch._dynamo.reset()
    try:
        assert torch.equal(run(torch.compile(model, fullgraph=True, backend="aot_eager"), inputs), want)
    finally:
        torch._dynamo.reset()
