"""`OneStepGenerator`, the family-independent part of the differentiable one-step twin of a pipeline, and its
registry."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from ..scoring import to_pil
from .embeds import PromptEmbeds
from .schedulers import SCHEDULER_STEPS, SUPPORTED_SCHEDULERS, SingleStep


logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------------

_GeneratorT = TypeVar("_GeneratorT", bound="type[OneStepGenerator]")
GENERATORS: dict[type, type[OneStepGenerator]] = {}
SUPPORTED_PIPELINES: Mapping[type, type[OneStepGenerator]] = MappingProxyType(GENERATORS)
"""Live, read-only view of the registry: pipeline class -> generator adapter class."""


def register_generator(pipeline_cls: type) -> Callable[[_GeneratorT], _GeneratorT]:
    """Class decorator registering a :class:`OneStepGenerator` subclass as the adapter for `pipeline_cls`.

    Subclasses of `pipeline_cls` also resolve to it (the registry is searched along the pipeline's MRO), unless they
    have an adapter of their own.
    """

    def decorator(generator_cls: _GeneratorT) -> _GeneratorT:
        if not (isinstance(generator_cls, type) and issubclass(generator_cls, OneStepGenerator)):
            raise TypeError(f"{generator_cls!r} must be a subclass of OneStepGenerator.")
        GENERATORS[pipeline_cls] = generator_cls
        return generator_cls

    return decorator


def evaluation_seed(seed: int, index: int) -> int:
    """The noise seed of image ``(seed, index)`` in an evaluation: ``seed * 10**6 + index``, the paper's protocol, so
    the prompt at `index` gets the same noise under a given seed whatever else is evaluated with it."""
    return int(seed) * 10**6 + int(index)


def unwrap_module(module: nn.Module) -> nn.Module:
    """The model inside DDP/FSDP-style `.module` wrappers and `torch.compile`'s `_orig_mod`."""
    while True:
        if hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        elif hasattr(module, "module") and isinstance(module.module, nn.Module):
            module = module.module
        else:
            return module


# --------------------------------------------------------------------------------------------------------------------
# Base generator
# --------------------------------------------------------------------------------------------------------------------


class OneStepGenerator:
    """Differentiable single-step sampling, reference sampling and decoding for one diffusers pipeline.

    Build with :meth:`from_pipeline`. The pipeline object is shared, not copied: the denoiser that LoRA is added to
    is `pipe.unet`, so a trained adapter is live in the user's pipeline. The VAE and text encoders are frozen.

    Attributes:
        pipeline: the wrapped diffusers pipeline.
        denoiser: the module called by :meth:`sample`. It may be replaced by a wrapped version of itself
            (e.g. `accelerator.prepare(gen.denoiser)`); everything else uses :attr:`unwrapped_denoiser`.
        vae: the pipeline's VAE.
        resolution: default image side in pixels (the pipeline's default height unless given).
    """

    def __init__(self, pipeline: Any, resolution: int | None = None) -> None:
        self.pipeline = pipeline
        self.denoiser: nn.Module = self._find_denoiser(pipeline)
        self.vae: nn.Module = pipeline.vae
        self.vae_scale_factor: int = int(pipeline.vae_scale_factor)
        self.resolution: int = int(resolution) if resolution is not None else self._default_resolution()
        self._reference_denoiser: nn.Module | None = None
        self._vae_fp32: nn.Module | None = None
        self._steps: dict[str, SingleStep] = {}
        scheduler_name = type(pipeline.scheduler).__name__
        if scheduler_name not in SCHEDULER_STEPS:
            raise NotImplementedError(
                f"OneStepGenerator cannot reproduce a step of {scheduler_name}; supported schedulers: "
                f"{', '.join(SUPPORTED_SCHEDULERS)}."
            )
        self._single_step(self.device)  # validates the scheduler's single step now rather than mid-training
        # Only the denoiser is ever trained: freeze the rest so that stray gradients cannot reach it.
        for name in ("vae", "text_encoder", "text_encoder_2"):
            module = getattr(pipeline, name, None)
            if isinstance(module, nn.Module):
                module.requires_grad_(False)

    # ---------------------------------------------------------------------------------------------------- creation

    @classmethod
    def from_pipeline(cls, pipeline: Any, resolution: int | None = None) -> OneStepGenerator:
        """The registered adapter for `type(pipeline)` (searched along its MRO), built on `pipeline`.

        Raises:
            TypeError: no adapter is registered for the pipeline's class.
        """
        for klass in type(pipeline).__mro__:
            if klass in GENERATORS:
                return GENERATORS[klass](pipeline, resolution=resolution)
        supported = ", ".join(sorted(k.__name__ for k in GENERATORS)) or "none"
        raise TypeError(
            f"No one-step generator for {type(pipeline).__name__}. Supported pipelines: {supported}. To add one, "
            "subclass trl_drpo.generators.OneStepGenerator (implement `_encode` and `denoiser_kwargs`) and decorate "
            f"it with `@register_generator({type(pipeline).__name__})`."
        )

    @staticmethod
    def _find_denoiser(pipeline: Any) -> nn.Module:
        denoiser = getattr(pipeline, "unet", None)
        if not isinstance(denoiser, nn.Module):
            raise TypeError(f"{type(pipeline).__name__} has no `unet` module to train.")
        return denoiser

    def _default_resolution(self) -> int:
        # What the pipelines use when `height` is not given: the UNet's sample size times the VAE scale factor.
        sample_size = getattr(self.pipeline, "default_sample_size", None) or self.unwrapped_denoiser.config.sample_size
        if isinstance(sample_size, (tuple, list)):
            sample_size = sample_size[0]
        return int(sample_size) * self.vae_scale_factor

    # ---------------------------------------------------------------------------------------------------- properties

    @property
    def unwrapped_denoiser(self) -> nn.Module:
        """:attr:`denoiser` without DDP / `torch.compile` wrappers: the module holding the LoRA adapter."""
        return unwrap_module(self.denoiser)

    @property
    def device(self) -> torch.device:
        """Device of the denoiser's parameters."""
        return next(self.unwrapped_denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the denoiser (the dtype of noise and latents)."""
        return self.unwrapped_denoiser.dtype

    @property
    def latent_channels(self) -> int:
        """Channels of the denoiser's input latents."""
        return int(self.unwrapped_denoiser.config.in_channels)

    @property
    def has_adapter(self) -> bool:
        """Whether a PEFT adapter (e.g. LoRA) is loaded on the denoiser."""
        return bool(getattr(self.unwrapped_denoiser, "_hf_peft_config_loaded", False))

    # ---------------------------------------------------------------------------------------------------- prompts

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Encode `prompts` (no gradient) with the pipeline's own `encode_prompt`, one row per prompt.

        Duplicate prompts are encoded once. Nothing is cached across calls; the trainer encodes once per step and
        expands with :meth:`PromptEmbeds.repeat_interleave`.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt.")
        unique = list(dict.fromkeys(prompts))
        embeds = self._encode(unique)
        if len(unique) == len(prompts):
            return embeds
        position = {p: i for i, p in enumerate(unique)}
        return embeds.select([position[p] for p in prompts])

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        """Encode distinct prompts; implemented by each pipeline adapter."""
        raise NotImplementedError

    def denoiser_kwargs(self, embeds: PromptEmbeds, latents: Tensor) -> dict[str, Any]:
        """Keyword arguments of the denoiser call for `latents` (besides sample and timestep); per adapter."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------------- noise

    def latent_shape(self, batch_size: int, resolution: int | None = None) -> tuple[int, int, int, int]:
        """`(batch, channels, side, side)` of the latents for square images of `resolution` pixels."""
        resolution = int(resolution or self.resolution)
        if resolution % self.vae_scale_factor:
            raise ValueError(
                f"resolution {resolution} is not a multiple of the VAE scale factor {self.vae_scale_factor}."
            )
        side = resolution // self.vae_scale_factor
        return (int(batch_size), self.latent_channels, side, side)

    def make_noise(
        self, batch_size: int, generator: torch.Generator | None = None, resolution: int | None = None
    ) -> Tensor:
        """Standard normal initial noise with the latent shape, on :attr:`device` in :attr:`dtype`.

        The draw happens on the generator's device (CPU for a default `torch.Generator()`) in float32 and is then
        moved, so one seed gives the same noise whatever device trains.
        """
        shape = self.latent_shape(batch_size, resolution)
        draw_device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(shape, generator=generator, device=draw_device, dtype=torch.float32)
        return noise.to(device=self.device, dtype=self.dtype)

    # ---------------------------------------------------------------------------------------------------- sampling

    def _single_step(self, device: torch.device) -> SingleStep:
        key = str(device)
        if key not in self._steps:
            self._steps[key] = SingleStep.build(self.pipeline.scheduler, device)
        return self._steps[key]

    def one_step(self, denoiser: nn.Module, embeds: PromptEmbeds, noise: Tensor) -> Tensor:
        """The pipeline's single step with `denoiser`: scale by init sigma, scale the input, predict, step to x0.

        Differentiable in the denoiser's parameters and in `noise`; :meth:`sample` and :meth:`reference` call it.
        """
        if len(embeds) != noise.shape[0]:
            raise ValueError(f"{len(embeds)} prompt embeddings for {noise.shape[0]} noise samples.")
        device = self.device
        single = self._single_step(device)
        latents = noise.to(device=device) * single.scheduler.init_noise_sigma
        model_input = single.scheduler.scale_model_input(latents, single.timestep)
        model_output = denoiser(
            model_input, single.timestep, return_dict=False, **self.denoiser_kwargs(embeds.to(device), latents)
        )[0]
        return single.step(latents, model_output)

    def sample(self, embeds: PromptEmbeds, noise: Tensor) -> Tensor:
        """Clean latents from `noise` with gradient through :attr:`denoiser` (and its LoRA).

        Equals `pipe(prompt, num_inference_steps=1, guidance_scale=0.0, latents=noise, output_type="latent")`.
        """
        return self.one_step(self.denoiser, embeds, noise)

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[nn.Module]:
        """Context yielding the module that computes the *base* model.

        That is the frozen reference set by :meth:`set_reference_denoiser` if any; otherwise the unwrapped denoiser
        with its adapters disabled for the duration (re-enabled on exit only if they were enabled on entry), or
        the unwrapped denoiser itself when no adapter is loaded. No copy of the model is made.
        """
        if self._reference_denoiser is not None:
            yield self._reference_denoiser
            return
        denoiser = self.unwrapped_denoiser
        if not self.has_adapter or not self._adapters_enabled(denoiser):
            yield denoiser
            return
        denoiser.disable_adapters()
        try:
            yield denoiser
        finally:
            denoiser.enable_adapters()

    @staticmethod
    def _adapters_enabled(denoiser: nn.Module) -> bool:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return any(not m.disable_adapters for m in denoiser.modules() if isinstance(m, BaseTunerLayer))

    @torch.no_grad()
    def reference(self, embeds: PromptEmbeds, noise: Tensor) -> Tensor:
        """Latents of the base model (adapter disabled, or the frozen reference) for the same inputs; no gradient."""
        with self.adapter_disabled() as base:
            return self.one_step(base, embeds, noise)

    def set_reference_denoiser(self, module: nn.Module | None) -> None:
        """Use a frozen copy of the base denoiser for :meth:`reference` and base features (full fine-tuning).

        With LoRA this is unnecessary: the adapter is simply disabled. Pass `None` to go back to that.
        """
        if module is not None:
            module = unwrap_module(module).eval().requires_grad_(False)
        self._reference_denoiser = module

    # ---------------------------------------------------------------------------------------------------- LoRA

    def add_lora(
        self,
        rank: int = 16,
        alpha: float = 16,
        target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
        dropout: float = 0.0,
        adapter_name: str = "default",
        upcast_to_fp32: bool = True,
        config: Any = None,
        **lora_kwargs: Any,
    ) -> list[nn.Parameter]:
        """Add a LoRA adapter to the denoiser via diffusers' PEFT integration and freeze all base weights.

        Args:
            rank, alpha, target_modules, dropout: `peft.LoraConfig`'s `r`, `lora_alpha`, `target_modules`,
                `lora_dropout`. The defaults are the paper's (r16/alpha16 on the attention projections).
            adapter_name: name of the adapter in the denoiser.
            upcast_to_fp32: keep LoRA weights in fp32 when the denoiser is fp16/bf16, so that optimizer updates are
                not lost to rounding (PEFT would otherwise create them in the base dtype).
            config: a ready `peft.LoraConfig` (or other PEFT config); when given, the arguments above that build
                one (rank, alpha, target_modules, dropout, lora_kwargs) are ignored.
            **lora_kwargs: further `peft.LoraConfig` arguments (e.g. `init_lora_weights="gaussian"`).

        Returns:
            The trainable parameters (the LoRA weights), as :meth:`trainable_parameters` does.
        """
        if config is None:
            from peft import LoraConfig

            config = LoraConfig(
                r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout, **lora_kwargs
            )
        denoiser = self.unwrapped_denoiser
        denoiser.requires_grad_(False)
        denoiser.add_adapter(config, adapter_name=adapter_name)
        params = self.trainable_parameters()
        if upcast_to_fp32:
            for param in params:
                if param.dtype in (torch.float16, torch.bfloat16):
                    param.data = param.data.float()
        return params

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters of the denoiser with `requires_grad=True`."""
        return [p for p in self.unwrapped_denoiser.parameters() if p.requires_grad]

    # ---------------------------------------------------------------------------------------------------- decoding

    def _needs_vae_upcast(self) -> bool:
        return False

    def _decoding_vae(self) -> nn.Module:
        if not self._needs_vae_upcast():
            return self.vae
        # The pipeline upcasts its fp16 VAE in place for the call; we keep a frozen fp32 copy instead, because
        # flipping the dtype of shared weights between a forward and its backward would corrupt the gradient.
        device = next(self.vae.parameters()).device
        if self._vae_fp32 is None:
            self._vae_fp32 = copy.deepcopy(self.vae).to(torch.float32).eval().requires_grad_(False)
        if next(self._vae_fp32.parameters()).device != device:  # follow the pipeline when it is moved
            self._vae_fp32.to(device)
        return self._vae_fp32

    def _latent_statistics(self, latents: Tensor) -> tuple[Tensor, Tensor] | None:
        # The per-channel mean/std some VAEs declare (the SDXL pipeline applies them), shaped to broadcast.
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return None
        shape = (1, latents.shape[1], 1, 1)
        return tuple(torch.tensor(v).view(shape).to(latents.device, latents.dtype) for v in (mean, std))

    def _unscale_latents(self, latents: Tensor) -> Tensor:
        # UNet space -> VAE space.
        statistics = self._latent_statistics(latents)
        if statistics is not None:
            return latents * statistics[1] / self.vae.config.scaling_factor + statistics[0]
        return latents / self.vae.config.scaling_factor

    def _scale_latents(self, latents: Tensor) -> Tensor:
        # VAE space -> UNet space (the inverse of `_unscale_latents`).
        statistics = self._latent_statistics(latents)
        if statistics is not None:
            return (latents - statistics[0]) * self.vae.config.scaling_factor / statistics[1]
        return latents * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_images(self, images: Sequence[Any]) -> Tensor:
        """UNet-space latents of images, as :meth:`sample` returns latents: `(B, C, h, w)` in the denoiser's dtype.

        Each image (a PIL image, or a `(3, H, W)` float tensor in [0, 1]) is resized and centre-cropped to the training
        resolution by the pipeline's own image processor (`resize_mode="crop"`), encoded by the VAE (the posterior's
        mode, as the authors' offline DrPO does) and scaled into the denoiser's latent space.
        """
        images = [to_pil(image[None])[0] if isinstance(image, Tensor) else image.convert("RGB") for image in images]
        pixels = self.pipeline.image_processor.preprocess(
            images, height=self.resolution, width=self.resolution, resize_mode="crop"
        )
        vae = self._decoding_vae()
        param = next(vae.parameters())
        posterior = vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist
        return self._scale_latents(posterior.mode()).to(device=self.device, dtype=self.dtype)

    def _decode_chunk(self, latents: Tensor, watermark: bool) -> Tensor:
        vae = self._decoding_vae()
        param = next(vae.parameters())
        latents = latents.to(device=param.device, dtype=param.dtype)
        image = vae.decode(self._unscale_latents(latents), return_dict=False)[0]
        marker = getattr(self.pipeline, "watermark", None)
        if watermark and marker is not None:
            image = marker.apply_watermark(image)
        return self.pipeline.image_processor.postprocess(image, output_type="pt").to(torch.float32)

    def decode(
        self,
        latents: Tensor,
        output_type: str = "pt",
        chunk_size: int | None = None,
        requires_grad: bool = False,
    ) -> Tensor | list[Any]:
        """Decode UNet-space latents to images as the pipeline does after its last step.

        Args:
            latents: `(B, C, h, w)` latents from :meth:`sample` / :meth:`reference`.
            output_type: `"pt"` for a float32 tensor `(B, 3, H, W)` in [0, 1], `"pil"` for a list of PIL images.
            chunk_size: decode at most this many latents at once (VAE memory); None decodes all at once.
            requires_grad: keep the graph back to `latents` (pixel feature maps). Only with `output_type="pt"`;
                the SDXL invisible watermark, a non-differentiable post-process, is then skipped.

        The safety checker of `StableDiffusionPipeline` is never run.
        """
        if output_type not in ("pt", "pil"):
            raise ValueError(f"output_type must be 'pt' or 'pil', got {output_type!r}.")
        if requires_grad and output_type != "pt":
            raise ValueError("A differentiable decode needs output_type='pt'.")
        chunk_size = chunk_size or latents.shape[0]
        grad_context = contextlib.nullcontext() if requires_grad else torch.no_grad()
        with grad_context:
            images = torch.cat(
                [self._decode_chunk(chunk, watermark=not requires_grad) for chunk in latents.split(chunk_size)]
            )
        if output_type == "pil":
            return to_pil(images)
        return images

    def decode_with_grad(self, latents: Tensor, chunk_size: int | None = None) -> Tensor:
        """:meth:`decode` keeping the graph to `latents`: float32 `(B, 3, H, W)` in [0, 1]."""
        return self.decode(latents, output_type="pt", chunk_size=chunk_size, requires_grad=True)
