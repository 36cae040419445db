"""`OneStepGenerator`, the differentiable one-step twin of a pipeline built on the pipeline's own call, and the
registry of pipeline families."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from ..scoring import to_pil
from .adapters import adapters_disabled, inject_lora, lora_config, tuner_layers, upcast_half_parameters
from .call import (
    check_call_kwargs,
    encode_kwargs,
    missing_call_arguments,
    progress_bar_disabled,
    swapped_component,
    undecorated_call,
    unwrap_module,
)
from .embeds import PromptEmbeds
from .vae import decode_pixels, encode_pixels, fp32_vae


logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------------

_GeneratorT = TypeVar("_GeneratorT", bound="type[OneStepGenerator]")
GENERATORS: dict[type | str, type[OneStepGenerator]] = {}
SUPPORTED_PIPELINES: Mapping[type | str, type[OneStepGenerator]] = MappingProxyType(GENERATORS)
"""Live, read-only view of the registry: pipeline class (or a diffusers pipeline's class name) -> generator class."""


def register_generator(pipeline_cls: type | str) -> Callable[[_GeneratorT], _GeneratorT]:
    """Class decorator registering a :class:`OneStepGenerator` subclass as the adapter for `pipeline_cls`.

    `pipeline_cls` is a pipeline class, or the class name of a diffusers pipeline (`"FluxPipeline"`): a name matches
    the class of that name that diffusers defines, so registering a family does not import its pipeline (and the text
    encoders it brings) until a user's pipeline is one. Subclasses also resolve to the adapter (the registry is
    searched along the pipeline's MRO), unless they have an adapter of their own.
    """

    def decorator(generator_cls: _GeneratorT) -> _GeneratorT:
        if not (isinstance(generator_cls, type) and issubclass(generator_cls, OneStepGenerator)):
            raise TypeError(f"{generator_cls!r} must be a subclass of OneStepGenerator.")
        GENERATORS[pipeline_cls] = generator_cls
        return generator_cls

    return decorator


def registered_generator(pipeline_cls: type) -> type[OneStepGenerator] | None:
    """The adapter registered for `pipeline_cls` or its nearest registered base class (by class, or for diffusers'
    own classes by name); None when there is none."""
    for klass in pipeline_cls.__mro__:
        if klass in GENERATORS:
            return GENERATORS[klass]
        if klass.__module__.split(".")[0] == "diffusers" and klass.__name__ in GENERATORS:
            return GENERATORS[klass.__name__]
    return None


def evaluation_seed(seed: int, index: int) -> int:
    """The noise seed of image ``(seed, index)`` in an evaluation: ``seed * 10**6 + index``, the paper's protocol, so
    the prompt at `index` gets the same noise under a given seed whatever else is evaluated with it."""
    return int(seed) * 10**6 + int(index)


# --------------------------------------------------------------------------------------------------------------------
# Base generator
# --------------------------------------------------------------------------------------------------------------------


class OneStepGenerator:
    """Differentiable single-step sampling, reference sampling and decoding for one diffusers pipeline.

    The sample is the pipeline's own undecorated call (see `trl_drpo.generators.call`) with the user's one-step
    settings, `latents=noise` and `output_type="latent"`, so it is exactly what `pipe(...)` serves, with the
    autograd graph kept. This class serves every pipeline whose call accepts `latents` and `output_type`; a family
    subclass (registered with :func:`register_generator`) adds what the call does not give: encoding prompts once
    per step (:meth:`_encode`), the noise layout, decoding, and the denoiser's inputs for the `denoiser` feature map.

    Build with :meth:`from_pipeline`. The pipeline object is shared, not copied: the denoiser that LoRA is added to
    is the pipeline's (`pipe.unet` or `pipe.transformer`), so a trained adapter is live in the user's pipeline. The
    VAE and text encoders are frozen.

    Attributes:
        pipeline: the wrapped diffusers pipeline.
        denoiser: the module called by :meth:`sample`. It may be replaced by a wrapped version of itself
            (e.g. `accelerator.prepare(gen.denoiser)`); everything else uses :attr:`unwrapped_denoiser`.
        vae: the pipeline's VAE.
        resolution: image side in pixels (the call's `height` and `width`; the pipeline's default unless given).
        call_kwargs: the user's settings of the call (`DrPOConfig.pipeline_call_kwargs`) over the family's
            :attr:`default_call_kwargs`.
    """

    denoiser_attribute: ClassVar[str | None] = None
    """The pipeline attribute holding the trained denoiser (`unet` or `transformer`); None finds it."""
    default_call_kwargs: ClassVar[Mapping[str, Any]] = MappingProxyType(
        {"num_inference_steps": 1, "guidance_scale": 0.0}
    )
    """The family's one-step settings of the call, used where `pipeline_call_kwargs` does not set them."""
    lora_target_modules: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    """LoRA targets when none are given: the attention projections (the paper's choice)."""

    def __init__(
        self, pipeline: Any, resolution: int | None = None, call_kwargs: Mapping[str, Any] | None = None
    ) -> None:
        self.pipeline = pipeline
        self.denoiser_name = self.denoiser_attribute or self._find_denoiser_name(pipeline)
        self.denoiser: nn.Module = getattr(pipeline, self.denoiser_name)
        self.vae: nn.Module = pipeline.vae
        self.vae_scale_factor: int = int(pipeline.vae_scale_factor)
        self.resolution: int = int(resolution) if resolution is not None else self._default_resolution()
        user_kwargs = dict(call_kwargs or {})
        check_call_kwargs(pipeline, user_kwargs)
        self.call_kwargs: dict[str, Any] = {**self.default_call_kwargs, **user_kwargs}
        self._reference_denoiser: nn.Module | None = None
        self._vae_fp32: nn.Module | None = None
        # Only the denoiser is ever trained: freeze the rest so that stray gradients cannot reach it.
        for name, module in self._components().items():
            if name != self.denoiser_name:
                module.requires_grad_(False)

    # ---------------------------------------------------------------------------------------------------- creation

    @classmethod
    def from_pipeline(
        cls, pipeline: Any, resolution: int | None = None, call_kwargs: Mapping[str, Any] | None = None
    ) -> OneStepGenerator:
        """The registered family for `type(pipeline)` (searched along its MRO), built on `pipeline`; for a pipeline
        outside the registry, this class itself, which trains through the pipeline's call alone.

        Args:
            pipeline: a diffusers pipeline.
            resolution: image side in pixels; None uses the pipeline's default.
            call_kwargs: the call's settings (`DrPOConfig.pipeline_call_kwargs`) over the family's one-step defaults.

        Raises:
            TypeError: the pipeline is outside the registry and its call does not take `latents` and `output_type`.
            ValueError: `call_kwargs` holds an argument the call does not take, or one the generator sets itself.
        """
        generator_cls = registered_generator(type(pipeline))
        if generator_cls is not None:
            return generator_cls(pipeline, resolution=resolution, call_kwargs=call_kwargs)
        missing = missing_call_arguments(pipeline)
        if missing:
            supported = ", ".join(sorted(k if isinstance(k, str) else k.__name__ for k in GENERATORS)) or "none"
            raise TypeError(
                f"No one-step generator for {type(pipeline).__name__}: its call takes no {' and no '.join(missing)}, "
                "which training through the pipeline's own call needs (`latents=noise, output_type='latent'`). "
                f"Registered pipelines: {supported}. To add one, subclass trl_drpo.generators.OneStepGenerator and "
                f"decorate it with `@register_generator({type(pipeline).__name__})`."
            )
        return OneStepGenerator(pipeline, resolution=resolution, call_kwargs=call_kwargs)

    @staticmethod
    def _find_denoiser_name(pipeline: Any) -> str:
        for name in ("unet", "transformer"):
            if isinstance(getattr(pipeline, name, None), nn.Module):
                return name
        raise TypeError(f"{type(pipeline).__name__} has no `unet` or `transformer` module to train.")

    def _components(self) -> dict[str, nn.Module]:
        components = getattr(self.pipeline, "components", None) or vars(self.pipeline)
        return {name: module for name, module in components.items() if isinstance(module, nn.Module)}

    def _default_resolution(self) -> int:
        # What the pipelines use when `height` is not given: their default sample size (or the denoiser's) times the
        # VAE scale factor.
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
        """Channels of the latents the VAE decodes (and of the noise before any packing)."""
        return int(self.unwrapped_denoiser.config.in_channels)

    @property
    def has_adapter(self) -> bool:
        """Whether a PEFT adapter (e.g. LoRA) is injected into the denoiser."""
        return bool(tuner_layers(self.unwrapped_denoiser))

    def pipeline_call_kwargs(self, resolution: int | None = None) -> dict[str, Any]:
        """The keyword arguments of `pipe(prompt, **kwargs)` that serve what is trained: :attr:`call_kwargs` with
        `height` and `width` (the model card's quick start and `trl-drpo sample` use them)."""
        side = int(resolution or self.resolution)
        return {**self.call_kwargs, "height": side, "width": side}

    # ---------------------------------------------------------------------------------------------------- prompts

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Encode `prompts` (no gradient) with the pipeline's own `encode_prompt`, one row per prompt, with the
        encoding settings the call would use (`max_sequence_length`, ...).

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
        """Encode distinct prompts; a family subclass returns the embeddings its call takes. Outside the registry the
        texts are kept and the call encodes them itself (at every call)."""
        return PromptEmbeds(prompt_embeds=None, texts=prompts)

    def _encode_kwargs(self) -> dict[str, Any]:
        """Arguments of `encode_prompt` taken from the call's settings (see `call.encode_kwargs`)."""
        return encode_kwargs(self.pipeline, self.call_kwargs)

    # ---------------------------------------------------------------------------------------------------- noise

    def latent_shape(self, batch_size: int, resolution: int | None = None) -> tuple[int, ...]:
        """Shape of the noise the call's `latents=` takes for square images of `resolution` pixels:
        `(batch, channels, side, side)` unless the family packs latents (then see the family)."""
        return self.grid_shape(batch_size, resolution)

    def grid_shape(self, batch_size: int, resolution: int | None = None) -> tuple[int, int, int, int]:
        """`(batch, channels, side, side)`: the latents on the VAE's grid for square images of `resolution` pixels.

        Raises:
            ValueError: `resolution` is not a multiple of the VAE scale factor.
        """
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
        """Standard normal initial noise in the layout of the call's `latents=`, on :attr:`device` in :attr:`dtype`.

        The draw happens on the generator's device (CPU for a default `torch.Generator()`) in float32 and is then
        moved, so one seed gives the same noise whatever device trains.
        """
        shape = self.grid_shape(batch_size, resolution)
        draw_device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(shape, generator=generator, device=draw_device, dtype=torch.float32)
        return self.pack_latents(noise).to(device=self.device, dtype=self.dtype)

    def noise_resolution(self, noise: Tensor) -> int:
        """The image side in pixels that `noise` (in the layout of :meth:`make_noise`) is for."""
        return int(noise.shape[-1]) * self.vae_scale_factor

    # ---------------------------------------------------------------------------------------------------- sampling

    def one_step(
        self, denoiser: nn.Module, embeds: PromptEmbeds, noise: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """The pipeline's call with `denoiser` in place of its own, returning latents with the autograd graph.

        Args:
            denoiser: the module to run (the trained denoiser, a DDP/compile wrapper of it, or the frozen reference);
                it is the pipeline's denoiser for the duration of the call only.
            embeds: one row per noise sample.
            noise: the call's `latents=`, in the layout of :meth:`make_noise`.
            generator: drives any randomness inside the call (ancestral and consistency schedulers, schedulers that
                draw noise they then weigh by zero); None uses a fixed seed, so that the global RNG is never drawn
                from and a call is a function of its inputs.

        Returns:
            The call's `output_type="latent"` output, in the layout of `noise`.
        """
        if len(embeds) != noise.shape[0]:
            raise ValueError(f"{len(embeds)} prompt embeddings for {noise.shape[0]} noise samples.")
        device = self.device
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        kwargs = {
            **self.pipeline_call_kwargs(self.noise_resolution(noise)),
            **embeds.to(device).call_kwargs(),
            "latents": noise.to(device),
            "output_type": "latent",
            "return_dict": False,
            "generator": generator,
        }
        call = undecorated_call(self.pipeline)
        with swapped_component(self.pipeline, self.denoiser_name, denoiser), progress_bar_disabled(self.pipeline):
            return call(self.pipeline, **kwargs)[0]

    def sample(self, embeds: PromptEmbeds, noise: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Clean latents from `noise` with gradient through :attr:`denoiser` (and its LoRA).

        Equals `pipe(**embeds, **self.pipeline_call_kwargs(), latents=noise, output_type="latent")`.
        """
        return self.one_step(self.denoiser, embeds, noise, generator)

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[nn.Module]:
        """Context yielding the module that computes the *base* model.

        That is the frozen reference set by :meth:`set_reference_denoiser` if any; otherwise the unwrapped denoiser
        with its adapter layers disabled for the duration (re-enabled on exit only if they were enabled on entry), or
        the unwrapped denoiser itself when no adapter is injected. No copy of the model is made. The PEFT layers are
        switched directly (`trl_drpo.generators.adapters.adapters_disabled`).
        """
        if self._reference_denoiser is not None:
            yield self._reference_denoiser
            return
        denoiser = self.unwrapped_denoiser
        with adapters_disabled(denoiser):
            yield denoiser

    @torch.no_grad()
    def reference(self, embeds: PromptEmbeds, noise: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Latents of the base model (adapter disabled, or the frozen reference) for the same inputs; no gradient."""
        with self.adapter_disabled() as base:
            return self.one_step(base, embeds, noise, generator)

    def set_reference_denoiser(self, module: nn.Module | None) -> None:
        """Use a frozen copy of the base denoiser for :meth:`reference` and base features (full fine-tuning).

        With LoRA this is unnecessary: the adapter is simply disabled. Pass `None` to go back to that.
        """
        if module is not None:
            module = unwrap_module(module).eval().requires_grad_(False)
        self._reference_denoiser = module

    # ---------------------------------------------------------------------------------------------------- features

    def denoiser_inputs(self, embeds: PromptEmbeds, latents: Tensor, timestep: int) -> dict[str, Any]:
        """Keyword arguments of one direct denoiser forward on `latents` (the call's layout) at `timestep` (on the
        0-1000 training scale), for the `denoiser` feature map; per family.

        Raises:
            NotImplementedError: outside the registry, where the denoiser's inputs are unknown.
        """
        raise NotImplementedError(
            f"The `denoiser` feature map needs to know how {type(self.pipeline).__name__} calls its denoiser, which "
            "only registered pipeline families say: use feature_map='latent' or a pixel feature map, or register a "
            "family for this pipeline."
        )

    def feature_blocks(self) -> list[str]:
        """Names of the denoiser's top-level blocks in execution order (what the `denoiser` feature map hooks)."""
        denoiser = self.unwrapped_denoiser
        names = [f"down_blocks.{i}" for i in range(len(getattr(denoiser, "down_blocks", [])))]
        if getattr(denoiser, "mid_block", None) is not None:
            names.append("mid_block")
        names += [f"up_blocks.{i}" for i in range(len(getattr(denoiser, "up_blocks", [])))]
        for stack in ("transformer_blocks", "single_transformer_blocks"):
            names += [f"{stack}.{i}" for i in range(len(getattr(denoiser, stack, [])))]
        return names

    def block_image_features(self, output: Any) -> Tensor:
        """The image stream of a hooked block's output: the first element of a tuple (UNet blocks return the hidden
        states first); families whose blocks return the text stream first override this."""
        return output[0] if isinstance(output, (tuple, list)) else output

    # ---------------------------------------------------------------------------------------------------- LoRA

    def add_lora(
        self,
        rank: int = 16,
        alpha: float = 16,
        target_modules: Sequence[str] | None = None,
        dropout: float = 0.0,
        adapter_name: str = "default",
        upcast_to_fp32: bool = True,
        config: Any = None,
        **lora_kwargs: Any,
    ) -> list[nn.Parameter]:
        """Add a LoRA adapter to the denoiser and freeze all base weights.

        Through diffusers' PEFT integration (`add_adapter`) where the denoiser has it, else with PEFT's
        `inject_adapter_in_model` (PixArt's transformer); either way `peft_config` on the denoiser records it.

        Args:
            rank, alpha, target_modules, dropout: `peft.LoraConfig`'s `r`, `lora_alpha`, `target_modules`,
                `lora_dropout`. The defaults are the paper's: r16/alpha16 on the family's
                :attr:`lora_target_modules` (the attention projections).
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
            targets = target_modules or self.lora_target_modules
            config = lora_config(rank, alpha, targets, dropout, **lora_kwargs)
        inject_lora(self.unwrapped_denoiser, config, adapter_name)
        if upcast_to_fp32:
            self.upcast_trainable_parameters()
        return self.trainable_parameters()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters of the denoiser with `requires_grad=True`."""
        return [p for p in self.unwrapped_denoiser.parameters() if p.requires_grad]

    def upcast_trainable_parameters(self) -> None:
        """Put the trainable parameters (and their gradients) in fp32 where they are fp16/bf16, in place: the same
        `Parameter` objects, so an optimizer holding them keeps them. A half-precision cast of the pipeline
        (`pipe.to(torch.bfloat16)`) reaches the LoRA weights too; training them in half precision would lose small
        updates to rounding."""
        upcast_half_parameters(self.trainable_parameters())

    # ---------------------------------------------------------------------------------------------------- decoding

    def _needs_vae_upcast(self) -> bool:
        return False

    def decoding_vae(self) -> nn.Module:
        """The VAE that decodes: the pipeline's own, or a float32 copy where the family's half-precision VAE
        overflows (the pipelines' `force_upcast`)."""
        if self._needs_vae_upcast():
            self._vae_fp32 = fp32_vae(self.vae, self._vae_fp32)
            return self._vae_fp32
        return self.vae

    def pack_latents(self, latents: Tensor) -> Tensor:
        """`(B, C, h, w)` VAE-grid latents in the layout the call's `latents=` takes (identity unless the family
        packs them)."""
        return latents

    def unpack_latents(self, latents: Tensor) -> Tensor:
        """The inverse of :meth:`pack_latents`: `(B, C, h, w)` latents on the VAE's grid."""
        return latents

    @torch.no_grad()
    def encode_images(self, images: Sequence[Any]) -> Tensor:
        """Denoiser-space latents of images, as :meth:`sample` returns latents (the layout of :meth:`make_noise`), in
        the denoiser's dtype.

        Each image (a PIL image, or a `(3, H, W)` float tensor in [0, 1]) is resized and centre-cropped to the training
        resolution by the pipeline's own image processor (`resize_mode="crop"`), encoded by the VAE (the posterior's
        mode, as the authors' offline DrPO does; a deterministic autoencoder's latent) and scaled into the denoiser's
        latent space.
        """
        images = [to_pil(image[None])[0] if isinstance(image, Tensor) else image.convert("RGB") for image in images]
        pixels = self.pipeline.image_processor.preprocess(
            images, height=self.resolution, width=self.resolution, resize_mode="crop"
        )
        latents = encode_pixels(self.decoding_vae(), pixels)
        return self.pack_latents(latents).to(device=self.device, dtype=self.dtype)

    def _decode_chunk(self, latents: Tensor, watermark: bool) -> Tensor:
        image = decode_pixels(self.decoding_vae(), self.unpack_latents(latents))
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
        """Decode latents to images as the pipeline does after its last step (unpacking, scaling and shift factors).

        Args:
            latents: latents from :meth:`sample` / :meth:`reference` (the layout of :meth:`make_noise`).
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
