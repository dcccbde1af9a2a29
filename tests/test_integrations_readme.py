"""The README's integration examples ("Use it in place of torch SDPA", "Use it with …"), run as written.

Without a GPU, "cuda" becomes "cpu", sequences of 1024 become 128, and quantattn's CPU tensors run its
reference (cpu="reference" where the example registers or applies; torch.compile through aot_eager, as
CI promises no C++ toolchain for inductor). `from_pretrained` returns tiny random models of the same families (no downloads). The CUDA
graph example needs a GPU and runs on one."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import torch

import quantattn
from quantattn.integrations import torch_sdpa as S

README = Path(__file__).resolve().parents[1] / "README.md"
HAS_GPU = torch.cuda.is_available()

pytestmark = pytest.mark.usefixtures("fresh_integrations")


def examples() -> dict[str, str]:
    """The python blocks of the two sections, named by the bold lead-in before each (or the section)."""
    text = README.read_text()
    start = text.index("### Use it in place of torch SDPA")
    end = text.index("\n### ", text.index("### Use it with"))
    blocks, name = {}, "sdpa"
    for part in re.split(r"(```python\n.*?```)", text[start:end], flags=re.S):
        if part.startswith("```python"):
            blocks[name] = part.removeprefix("```python\n").removesuffix("```")
        else:
            leads = re.findall(r"\*\*([^*]+)\*\*", part)
            name = leads[-1].rstrip(":.") if leads else name
    return blocks


def on_this_machine(code: str) -> str:
    if HAS_GPU:
        return code
    code = code.replace('"cuda"', '"cpu"').replace(", 1024, ", ", 128, ")  # the reference is slow
    code = code.replace("qa_transformers.register()", 'qa_transformers.register(cpu="reference")')
    code = code.replace("qa_diffusers.apply(pipe)", 'qa_diffusers.apply(pipe, cpu="reference")')
    return code.replace("fullgraph=True)", 'fullgraph=True, backend="aot_eager")')


def run(code: str, **namespace):
    exec(compile(on_this_machine(code), str(README), "exec"), namespace)  # noqa: S102
    return namespace


def test_the_sections_have_the_examples():
    assert set(examples()) == {"sdpa", "transformers", "diffusers", "torch.compile", "CUDA graphs"}


def test_sdpa_example():
    """With the Quick start's tensors: grouped-query attention (fewer kv heads), small."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 64, 32, generator=g).bfloat16() for h in (8, 2, 2))
    model = torch.nn.Linear(4, 4)
    ns = run(examples()["sdpa"], q=q, k=k, v=v, model=model)
    assert ns["out"].shape == q.shape
    assert torch.nn.functional.scaled_dot_product_attention is S.ORIGINAL_SDPA


def test_transformers_example(monkeypatch):
    transformers = pytest.importorskip("transformers")

    def tiny_qwen2(name, attn_implementation=None, torch_dtype=None, **kwargs):
        config = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
        return model.to(torch_dtype)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", tiny_qwen2)
    ns = run(examples()["transformers"])
    assert ns["tokens"].shape == (1, 16)
    assert ns["model"].config._attn_implementation == "sdpa"
    assert not S.fallbacks  # prefill and decoding ran on quantattn


class TinyPipeline:
    """What the example uses of a DiffusionPipeline: components, .to(), and a call that runs the
    transformer for each step (here on random latents; the text encoders and VAE are left out)."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.components = {"transformer": transformer, "scheduler": None}
        self.steps_run = 0

    def to(self, device):
        self.transformer.to(device)
        return self

    def __call__(self, prompt, num_inference_steps=4):
        dev, dt = self.transformer.device, self.transformer.dtype
        g = torch.Generator().manual_seed(len(prompt))
        latents = torch.randn(1, 16, 16, generator=g).to(dev, dt)
        text = torch.randn(1, 7, 24, generator=g).to(dev, dt)
        grid = torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij")
        img_ids = torch.stack(grid, -1).reshape(-1, 3).to(dev)
        with torch.no_grad():
            for step in range(num_inference_steps):
                t = torch.tensor([1 - step / num_inference_steps], device=dev, dtype=dt)
                latents = latents - 0.25 * self.transformer(
                    hidden_states=latents, encoder_hidden_states=text, pooled_projections=text[:, 0, :16],
                    timestep=t, img_ids=img_ids, txt_ids=torch.zeros(7, 3, device=dev),
                ).sample  # fmt: skip
                self.steps_run += 1
        return types.SimpleNamespace(images=[latents])


def test_diffusers_example(monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    pipes = []

    def tiny_flux(name, torch_dtype=None, **kwargs):
        torch.manual_seed(0)
        transformer = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                                       attention_head_dim=16, num_attention_heads=2,
                                                       joint_attention_dim=24, pooled_projection_dim=16,
                                                       axes_dims_rope=(4, 6, 6))  # fmt: skip
        pipes.append(TinyPipeline(transformer.to(torch_dtype)))
        return pipes[-1]

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", tiny_flux)
    calls = []
    real = S.routed_sdpa
    monkeypatch.setattr(S, "routed_sdpa", lambda *a: calls.append(1) or real(*a))
    ns = run(examples()["diffusers"])
    assert ns["image"].shape == (1, 16, 16) and pipes[0].steps_run == 4
    assert len(calls) == 2 * 4 and not S.fallbacks  # two attentions per step, all quantized
    assert not any(type(m.processor).__name__.startswith("QuantAttn") for m in pipes[0].transformer.modules()
                   if hasattr(m, "processor"))  # removed  # fmt: skip


def test_torch_compile_example():
    ns = run(examples()["torch.compile"])
    assert torch.equal(ns["out"], quantattn.sageattn(ns["q"], ns["k"], ns["v"], is_causal=True))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="CUDA graphs need an NVIDIA GPU")
def test_cuda_graph_example():
    ns = run(examples()["CUDA graphs"])
    assert torch.equal(ns["out"], quantattn.sageattn(ns["q"], ns["k"], ns["v"]))
