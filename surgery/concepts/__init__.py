"""Transform a concept in images: the transformed exemplars ``x'`` that :func:`surgery.rewrite` needs.

:func:`paste_texture` pastes a texture inside a mask; :func:`style_transfer` (Gatys et al.) and
:func:`adain_transfer` restyle the masked region with a style image; :func:`masks_from_segmentation`
finds concept masks with a torchvision segmentation model. Pretrained weights are read from the torch
hub cache, never downloaded silently.
"""

from surgery.concepts.paste import paste_texture
from surgery.concepts.segmentation import VOC_CLASSES, masks_from_segmentation, segmentation_model
from surgery.concepts.neural_style import ADAIN_WEIGHTS_URL, VGGFeatures, adain_transfer, style_transfer, vgg_features

__all__ = [
    "paste_texture",
    "style_transfer",
    "adain_transfer",
    "vgg_features",
    "VGGFeatures",
    "ADAIN_WEIGHTS_URL",
    "masks_from_segmentation",
    "segmentation_model",
    "VOC_CLASSES",
]
