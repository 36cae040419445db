"""Features of the pipeline's own VAE decoder, read with forward hooks (docs/method.md §5)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..generators import OneStepGenerator, PromptEmbeds
from ..generators.vae import decoder_input
from .base import FeatureMap, keep_computed, read_block_outputs, register_feature_map, spatial_stats, stat_keys


@register_feature_map("vae_decoder")
class VAEDecoderFeatureMap(FeatureMap):
    """Statistics of the frozen VAE decoder's block outputs: the decoder's view of a latent, nearer the pixels than the
    denoiser's blocks (colours, ink, edges) at a fraction of a full decode's cost (docs/method.md §5).

    The latents are unscaled as the pipeline decodes them and run through the decoder (the float32 copy where the
    family's VAE upcasts) until every chosen block has run; forward hooks capture each block's output `(B, C, h, w)`.
    For a block `b` (`mid_block` and `up_blocks.{i}`, as the decoder names them) the keys are `b_mean` and `b_std`
    (one token: the mean / std over positions) and `b_mean_p`, `b_std_p` for each `p` in `patch_sizes` (one token
    per non-overlapping p x p patch of the block's map; a side not divisible by `p` skips the key, with a warning for
    default keys). The defaults are the mid block's patch keys: on the digit world's 8 x 8 latents and
    `patch_sizes=(4,)`, one token for each 2 x 2 cell of the scene. Features are float32.

    Raises:
        ValueError: the decoder has neither a `mid_block` nor `up_blocks` (e.g. `AutoencoderTiny`), or no keys are
            chosen for a decoder without a `mid_block` (SANA's `AutoencoderDC`: choose `up_blocks.{i}` keys).
    """

    takes_call_layout = True  # the generator unpacks (Flux) before decoding

    def __init__(
        self, generator: OneStepGenerator, keys: Sequence[str] | None = None, patch_sizes: Sequence[int] = (4,)
    ) -> None:
        super().__init__()
        self._generator = generator
        self.patch_sizes = tuple(int(p) for p in patch_sizes)
        decoder = getattr(generator.vae, "decoder", None)
        blocks = [] if getattr(decoder, "mid_block", None) is None else ["mid_block"]
        blocks += [f"up_blocks.{i}" for i in range(len(getattr(decoder, "up_blocks", None) or ()))]
        if not blocks:
            raise ValueError(
                f"feature_map='vae_decoder' reads the blocks of an AutoencoderKL-style decoder (`mid_block`, "
                f"`up_blocks`); {type(generator.vae).__name__} has none. Use feature_map='denoiser' instead."
            )
        self._blocks = tuple(blocks)
        if keys is None and "mid_block" not in blocks:
            raise ValueError(
                f"{type(generator.vae).__name__}'s decoder has no mid_block, whose statistics are the default keys: "
                f"choose feature_keys among {list(self.available_keys)}."
            )
        self._select_keys(keys)
        self._freeze()

    @property
    def available_keys(self) -> tuple[str, ...]:
        return tuple(key for block in self._blocks for key in stat_keys(block, self.patch_sizes))

    @property
    def default_keys(self) -> tuple[str, ...]:
        return tuple(f"mid_block_{stat}_{p}" for p in self.patch_sizes for stat in ("mean", "std"))

    def _block_of(self, key: str) -> str:
        return next(block for block in self._blocks if key in stat_keys(block, self.patch_sizes))

    def compute(self, latents: Tensor, embeds: PromptEmbeds | None) -> dict[str, Tensor]:
        generator = self._generator
        vae = generator.decoding_vae()
        wanted = list(dict.fromkeys(self._block_of(key) for key in self.keys))
        z = decoder_input(vae, generator.unpack_latents(latents))
        if getattr(vae, "post_quant_conv", None) is not None:
            z = vae.post_quant_conv(z)
        # The decoder itself rather than `vae.decode`, whose slicing or tiling (`enable_slicing()`) would run the
        # blocks once per slice or tile.
        captured = read_block_outputs(vae.decoder, wanted, lambda: vae.decoder(z))
        features: dict[str, Tensor] = {}
        for block in wanted:
            features.update(spatial_stats(block, captured[block].float(), self.keys, self.patch_sizes))
        return keep_computed(self, features, latents.shape)
