"""Frozen feature maps phi: the space in which DrPO's drift field is computed (docs/method.md, section 5).

Every map takes generator latents (UNet space, as :meth:`OneStepGenerator.sample` returns them) and returns a dict
`key -> (batch, tokens, dim)` tensor, differentiable with respect to the latents. Keys are independent particle
sets: the drift loss runs once per key and aggregates. Build one by name::

    fmap = build_feature_map("denoiser", generator)                   # default (docs/method.md §8.5)
    fmap = build_feature_map("latent_mae", generator, model_name_or_path="mae_latent_256_torch.pth")
    fmap = build_feature_map("dinov2", generator, model_name_or_path="facebook/dinov2-base")
    fmap = build_feature_map("denoiser+vae_decoder", generator, denoiser={"pool_size": 1}, vae_decoder={})
    features = fmap(latents, embeds)                                   # embeds only needed by "denoiser"

Maps are frozen (`requires_grad=False`, always in eval mode). Add one with :func:`register_feature_map`.

| name | input | default keys |
|---|---|---|
| `denoiser` | base denoiser blocks at t=100 (adapter disabled) | last down block, `mid_block`, `up_blocks.0` |
| `latent_mae` | the latent-MAE ResNet of the paper (local checkpoint) | `layer4_{mean,std}{,_2,_4}` |
| `dinov2`, `vit_mae`, `clip_vision` | decoded pixels, `transformers` encoder | `layer{L}_{patch_mean,patch_std,cls}` |
| `vae_decoder` | the VAE decoder's blocks (`mid_block`, `up_blocks.{i}`) | `mid_block_{mean,std}_4` |
| `latent` | the raw latents (the collapsing ablation) | `latent`, `latent_{mean,std}{,_2,_4}` |

Names joined with ``+`` (``"denoiser+vae_decoder"``) build a :class:`CombinedFeatureMap`: its keys are
``"<map>/<key>"`` and its keyword arguments are given per map.
"""

from .base import FEATURE_MAPS, CombinedFeatureMap, FeatureMap, build_feature_map, register_feature_map
from .decoder import VAEDecoderFeatureMap
from .denoiser import DenoiserFeatureMap
from .latent import LatentFeatureMap, LatentMAEFeatureMap, LatentMAEResNet
from .pixel import CLIPVisionFeatureMap, Dinov2FeatureMap, PixelEncoderFeatureMap, ViTMAEFeatureMap


__all__ = [
    "FEATURE_MAPS",
    "CLIPVisionFeatureMap",
    "CombinedFeatureMap",
    "DenoiserFeatureMap",
    "Dinov2FeatureMap",
    "FeatureMap",
    "LatentFeatureMap",
    "LatentMAEFeatureMap",
    "LatentMAEResNet",
    "PixelEncoderFeatureMap",
    "VAEDecoderFeatureMap",
    "ViTMAEFeatureMap",
    "build_feature_map",
    "register_feature_map",
]
