"""The concept testbed: synthetic scenes of real objects whose concepts are known by construction.

A scene is one real object (a Fashion-MNIST item or an MNIST digit, 20 classes) in front of two
concept regions, a ``backdrop`` and a ``floor``, each filled with a concept texture (real
scikit-image photographs of grass, gravel and brick, colourized, and procedural ones). Each class
prefers one concept per region (70% of its scenes), as ImageNet's cars prefer roads. Every scene
comes with its masks and every render parameter, so it can be re-rendered without its object or
with a region restyled by one of 6 transformation styles x 4 variants (snow, wood, graffiti, fall
colours, fur, black-and-white).

Quick start::

    from surgery.testbed import Testbed, make_dataset
    train = make_dataset(20_000, "train", seed=0)      # TestbedData: images, labels, masks, ...
    tb = Testbed(seed=0)
    specs = tb.sample(8, "test")
    image, masks = tb.render(specs[0], restyle={"floor": ("snow", "fresh")})

``python -m surgery.testbed --help`` writes a preview grid and prints the preference table.
"""

from .objects import CLASS_NAMES, DIGIT_CLASSES, FASHION_CLASSES, SPLITS, TestbedError
from .scenes import (
    GENERATOR_VERSION,
    Restyle,
    SceneSpec,
    Testbed,
    TestbedConfig,
    TestbedData,
    cell_overlap,
    make_dataset,
    preference_markdown,
    preference_table,
)
from .procedural_styles import STYLES
from .textures import CONCEPT_REGION, CONCEPTS, REGIONS

__all__ = [
    "CLASS_NAMES",
    "FASHION_CLASSES",
    "DIGIT_CLASSES",
    "SPLITS",
    "CONCEPTS",
    "CONCEPT_REGION",
    "REGIONS",
    "STYLES",
    "GENERATOR_VERSION",
    "Restyle",
    "SceneSpec",
    "Testbed",
    "TestbedConfig",
    "TestbedData",
    "TestbedError",
    "make_dataset",
    "preference_table",
    "preference_markdown",
    "cell_overlap",
]
