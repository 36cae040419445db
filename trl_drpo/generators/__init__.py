"""One-step generators: the differentiable twin of what a diffusers pipeline serves in one step.

DrPO regresses what the user's pipeline *serves*, so the trainer must differentiate through exactly the computation
that the pipeline runs at inference (docs/method.md, section 8.1). Diffusers pipelines run their call under
`torch.no_grad()`; a :class:`OneStepGenerator` runs the same call undecorated (`call.py`), with the user's one-step
settings (`DrPOConfig.pipeline_call_kwargs`), `latents=noise` and `output_type="latent"`, keeping the autograd
graph to the LoRA weights.

A family module adds only what the call does not give: encoding prompts once per step, the noise layout (Flux packs
latents), decoding, the denoiser's inputs for the `denoiser` feature map. Families:

- `stable_diffusion.py`: `StableDiffusionPipeline`, `StableDiffusionXLPipeline` (with a hand-written fast path for
  the plain one-step Euler/DDIM call, `schedulers.py`);
- `sd3.py`: `StableDiffusion3Pipeline`; `flux.py`: `FluxPipeline`; `pixart.py`: `PixArtAlphaPipeline`,
  `PixArtSigmaPipeline`; `sana.py`: `SanaSprintPipeline`.

What every family shares sits beside `base.py`: the LoRA adapter on the denoiser (`adapters.py`) and the VAE's side,
latent scaling and the fp32 copy of a half-precision VAE (`vae.py`).

:meth:`OneStepGenerator.from_pipeline` looks the pipeline's class up in the registry; a pipeline outside it is
served by :class:`OneStepGenerator` itself when its call takes `latents` and `output_type`. Add a family by
subclassing and decorating with :func:`register_generator`::

    @register_generator(MyPipeline)
    class MyGenerator(OneStepGenerator):
        def _encode(self, prompts): ...  # -> PromptEmbeds holding what the call takes as prompt_embeds=...

The built-in families register diffusers' pipelines by class name (`@register_generator("FluxPipeline")`), so that
importing them imports no pipeline (nor the text encoders it brings) that the user's code does not load.

Typical use in a training step::

    gen = OneStepGenerator.from_pipeline(pipe, call_kwargs={"num_inference_steps": 1, "guidance_scale": 0.0})
    gen.add_lora(rank=16, alpha=16)
    embeds = gen.encode_prompts(prompts).repeat_interleave(k)
    noise = gen.make_noise(len(embeds), torch.Generator().manual_seed(0))
    latents = gen.sample(embeds, noise)  # with gradient through the LoRA
    reference = gen.reference(embeds, noise)  # adapter disabled, no gradient
    images = gen.decode(latents)  # (B, 3, H, W) in [0, 1], no gradient
"""

from .base import (
    GENERATORS,
    SUPPORTED_PIPELINES,
    OneStepGenerator,
    evaluation_seed,
    register_generator,
    registered_generator,
)
from .call import unwrap_module
from .embeds import PromptEmbeds, map_rows
from .flux import FluxGenerator
from .pixart import PixArtGenerator
from .sana import SanaSprintGenerator
from .schedulers import SUPPORTED_SCHEDULERS
from .sd3 import StableDiffusion3Generator
from .stable_diffusion import StableDiffusionGenerator, StableDiffusionXLGenerator, UNetGenerator


__all__ = [
    "GENERATORS",
    "SUPPORTED_PIPELINES",
    "SUPPORTED_SCHEDULERS",
    "FluxGenerator",
    "OneStepGenerator",
    "PixArtGenerator",
    "PromptEmbeds",
    "SanaSprintGenerator",
    "StableDiffusion3Generator",
    "StableDiffusionGenerator",
    "StableDiffusionXLGenerator",
    "UNetGenerator",
    "evaluation_seed",
    "map_rows",
    "register_generator",
    "registered_generator",
    "unwrap_module",
]
