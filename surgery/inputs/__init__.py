"""What users bring, as tensors: images and folders, concept masks, a model's preprocessing, labelled
photo folders, and the real photos bundled with scikit-image, scikit-learn and matplotlib."""

from surgery.inputs.folders import LabelledPhotos, load_concept_masks, load_labelled_photos, resolve_class
from surgery.inputs.batches import iter_batches
from surgery.inputs.images import ImageFolder, check_images, load_images
from surgery.inputs.masks import load_masks
from surgery.inputs.preprocess import Preprocess, default_input_size

__all__ = [
    "check_images",
    "load_images",
    "ImageFolder",
    "iter_batches",
    "load_masks",
    "Preprocess",
    "default_input_size",
    "LabelledPhotos",
    "load_labelled_photos",
    "load_concept_masks",
    "resolve_class",
]
