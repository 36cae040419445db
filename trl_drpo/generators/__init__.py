"""One-step generators: the differentiable twin of `pipe(prompt, num_inference_steps=1, guidance_scale=0.0)`.

DrPO regresses what the user's pipeline *serves*, so the trainer must differentiate through exactly the computation
that the diffusers pipeline runs at inference (docs/method.md, section 8.1). Diffusers pipelines run under
`torch.no_grad()`, so this module re-expresses their single step with the pipeline's own pieces (its prompt encoder,
its scheduler's timestep, input scaling and x0 arithmetic, its VAE post-processing), keeping the autograd graph.

A :class:`OneStepGenerator` wraps one pipeline family. Pick one with :meth:`OneStepGenerator.from_pipeline`, which
looks the pipeline's class up in a small registry; add a family by subclassing and decorating with
:func:`register_generator`::

    @register_generator(MyPipeline)
    class MyGenerator(OneStepGenerator):
        def _encode(self, prompts): ...  # -> PromptEmbeds
        def denoiser_kwargs(self, embeds, latents): ...  # -> keyword arguments of the denoiser call

Typical use in a training step::

    gen = OneStepGenerator.from_pipeline(pipe)
    gen.add_lora(rank=16, alpha=16)
    embeds = gen.encode_prompts(prompts).repeat_interleave(k)
    noise = gen.make_noise(len(embeds), torch.Generator().manual_seed(0))
    latents = gen.sample(embeds, noise)  # with gradient through the LoRA
    reference = gen.reference(embeds, noise)  # adapter disabled, no gradient
    images = gen.decode(latents)  # (B, 3, H, W) in [0, 1], no gradient
"""

from .base import GENERATORS, SUPPORTED_PIPELINES, OneStepGenerator, evaluation_seed, register_generator, unwrap_module
from .embeds import PromptEmbeds, map_rows
from .schedulers import SUPPORTED_SCHEDULERS
from .stable_diffusion import StableDiffusionGenerator, StableDiffusionXLGenerator


__all__ = [
    "GENERATORS",
    "SUPPORTED_PIPELINES",
    "SUPPORTED_SCHEDULERS",
    "OneStepGenerator",
    "PromptEmbeds",
    "StableDiffusionGenerator",
    "StableDiffusionXLGenerator",
    "evaluation_seed",
    "map_rows",
    "register_generator",
    "unwrap_module",
]
