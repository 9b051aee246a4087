"""Tests of the concept testbed (surgery/testbed): masks, styles, determinism, preferences."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from surgery.testbed import (
    CLASS_NAMES,
    CONCEPT_REGION,
    CONCEPTS,
    REGIONS,
    STYLES,
    SceneSpec,
    Testbed,
    TestbedConfig,
    make_dataset,
    preference_table,
)
from surgery.testbed.objects import SPLITS, load_object_bank

VARIANTS = [(style, v) for style, names in STYLES.items() for v in range(len(names))]


@pytest.fixture(scope="module")
def testbed() -> Testbed:
    return Testbed(TestbedConfig(), seed=0)


@pytest.fixture(scope="module")
def specs(testbed: Testbed) -> list[SceneSpec]:
    return testbed.sample(40, "val")


@pytest.fixture(scope="module")
def rendered(testbed: Testbed, specs: list[SceneSpec]) -> tuple[torch.Tensor, torch.Tensor]:
    return testbed.render_batch(specs)


@pytest.fixture(scope="module")
def bare(testbed: Testbed, specs: list[SceneSpec]) -> tuple[torch.Tensor, torch.Tensor]:
    return testbed.render_batch(specs, object=False)


# ----------------------------------------------------------------------------- inventory
def test_inventory_classes_styles_concepts() -> None:
    assert len(CLASS_NAMES) >= 20 and len(set(CLASS_NAMES)) == len(CLASS_NAMES)
    assert len(STYLES) >= 6
    assert all(len(variants) >= 3 for variants in STYLES.values())
    assert set(CONCEPT_REGION.values()) == set(REGIONS)
    for region in REGIONS:
        assert sum(r == region for r in CONCEPT_REGION.values()) >= 3
    assert not set(CONCEPTS) & {"snow", "wood", "graffiti", "fall", "fur", "black-and-white"}


def test_object_pools_are_disjoint_and_used() -> None:
    bank = load_object_bank()
    for label in range(len(CLASS_NAMES)):
        pools = [set(bank.pools[s][label].tolist()) for s in SPLITS]
        assert all(len(p) >= 50 for p in pools), label
        assert not pools[0] & pools[1] and not pools[0] & pools[2] and not pools[1] & pools[2]
    tb = Testbed(seed=3)
    for split in SPLITS:
        for s in tb.sample(60, split):
            assert s.source_index in set(bank.pools[split][s.label].tolist())
            assert s.source == ("fashion" if s.label < 10 else "mnist")


# ----------------------------------------------------------------------------- masks
def test_object_mask_is_exactly_what_the_object_changes(rendered, bare) -> None:
    images, seg = rendered
    images0, seg0 = bare
    assert images.shape == (40, 3, 80, 80) and images.dtype == torch.uint8
    changed = (images != images0).any(1)
    assert torch.equal(changed, seg == 0)
    assert (seg0 > 0).all()  # without the object the regions cover the canvas
    assert torch.equal(seg[seg > 0], seg0[seg > 0])  # and the object only hides them
    area = (seg == 0).float().mean((1, 2))
    assert (area > 0.03).all() and (area < 0.3).all()  # clearly visible, not filling the scene


def test_region_masks_partition_and_follow_the_horizon(testbed: Testbed, specs) -> None:
    for spec in specs[:5]:
        image, masks = testbed.render(spec)
        assert image.shape == (80, 80, 3) and image.dtype == np.uint8
        stacked = np.stack([masks["object"]] + [masks[r] for r in REGIONS])
        assert (stacked.sum(0) == 1).all()
        y, x = np.mgrid[0:80, 0:80] + 0.5
        line = spec.horizon + spec.wave_amplitude * np.sin(
            2 * math.pi * x / spec.wave_period + spec.wave_phase
        )
        floor = y >= line
        assert np.array_equal(masks["floor"], floor & ~masks["object"])
        assert np.array_equal(masks["backdrop"], ~floor & ~masks["object"])
        # the object sits in the middle band, separate from the canvas border
        ys, xs = np.nonzero(masks["object"])
        assert ys.min() > 5 and ys.max() < 75 and xs.min() > 5 and xs.max() < 75


def test_swapping_a_concept_changes_only_its_region(testbed: Testbed, specs) -> None:
    for spec in specs[:6]:
        _, masks = testbed.render(spec, object=False)
        base, _ = testbed.render(spec, object=False)
        for concept in CONCEPTS:
            if concept in spec.concepts:
                continue
            other, _ = testbed.render(spec.with_concept(concept), object=False)
            diff = (other != base).any(-1)
            region = masks[CONCEPT_REGION[concept]]
            assert not (diff & ~region).any(), concept
            assert diff[region].mean() > 0.5, concept


# ----------------------------------------------------------------------------- styles
def test_styles_stay_inside_their_region(testbed: Testbed, specs, rendered, bare) -> None:
    n = 8
    images, seg = rendered[0][:n].numpy(), rendered[1][:n].numpy()
    images0, seg0 = bare[0][:n].numpy(), bare[1][:n].numpy()
    for region_index, region in enumerate(REGIONS):
        inside0 = seg0 == 1 + region_index
        allowed = (seg == 1 + region_index) | (seg == 0)
        for style, variant in VARIANTS:
            restyle = {region: (style, variant)}
            styled0, _ = testbed.render_batch(specs[:n], object=False, restyle=restyle)
            diff0 = (styled0.numpy() != images0).any(1)
            assert not (diff0 & ~inside0).any(), (region, style, variant)
            changed = diff0[inside0].mean()
            assert changed > 0.3, (region, style, variant, changed)
            styled, seg1 = testbed.render_batch(specs[:n], restyle=restyle)
            assert np.array_equal(seg1.numpy(), seg)
            # only the region changes, and the object's soft edge and outline that blend with it
            diff = (styled.numpy() != images).any(1)
            assert not (diff & ~allowed).any(), (region, style, variant)


def test_restyle_by_concept_touches_only_scenes_with_it(testbed: Testbed, specs, rendered) -> None:
    images, _ = rendered
    styled, _ = testbed.render_batch(specs, restyle={"grass": ("snow", "fresh")})
    has = torch.tensor(["grass" in s.concepts for s in specs])
    assert has.any() and (~has).any()
    changed = (styled != images).flatten(1).any(1)
    assert torch.equal(changed, has)


def test_style_variants_differ(testbed: Testbed, specs) -> None:
    spec = specs[0]
    seen = []
    for style, variant in VARIANTS:
        image, _ = testbed.render(spec, object=False, restyle={"floor": (style, variant)})
        seen.append(image)
    for i in range(len(seen)):
        for j in range(i):
            assert not np.array_equal(seen[i], seen[j]), (VARIANTS[i], VARIANTS[j])
    with pytest.raises(KeyError):
        testbed.render(spec, restyle={"floor": ("snow", 99)})
    with pytest.raises(KeyError):
        testbed.render(spec, restyle={"ceiling": ("snow", 0)})


# ----------------------------------------------------------------------------- determinism
def test_same_seed_same_scenes_other_seed_other_scenes(specs, rendered) -> None:
    again = Testbed(TestbedConfig(), seed=0)
    assert again.sample(40, "val") == specs
    images, _ = again.render_batch(specs, batch_size=7)
    assert torch.equal(images, rendered[0])
    other = Testbed(TestbedConfig(), seed=1).sample(40, "val")
    images1, _ = again.render_batch(other)
    assert (images1 != rendered[0]).flatten(1).any(1).all()
    restyle = {"backdrop": ("graffiti", 1)}
    a, _ = again.render_batch(specs[:4], restyle=restyle)
    b, _ = Testbed(seed=0).render_batch(specs[:4], restyle=restyle)
    assert torch.equal(a, b)


def test_sampling_is_prefix_stable_and_specs_round_trip(testbed: Testbed, specs) -> None:
    assert testbed.sample(10, "val") == specs[:10]
    assert testbed.sample(15, "val", start=25) == specs[25:]
    assert testbed.sample(3, "train") != testbed.sample(3, "test")
    spec = SceneSpec.from_dict(json.loads(json.dumps(specs[7].to_dict())))
    assert spec == specs[7]
    image, _ = testbed.render(spec)
    assert np.array_equal(image, testbed.render(specs[7])[0])


# ----------------------------------------------------------------------------- preferences
def test_preference_table_is_balanced() -> None:
    table = preference_table(0)
    assert set(table) == set(range(len(CLASS_NAMES)))
    for concept, region in CONCEPT_REGION.items():
        assert sum(t[region] == concept for t in table.values()) == 4, concept
    assert len({(t["backdrop"], t["floor"]) for t in table.values()}) == len(table)
    assert preference_table(1) != table


def test_preferred_concepts_appear_about_70_percent(testbed: Testbed) -> None:
    scenes = testbed.sample(4000, "train")
    for r, region in enumerate(REGIONS):
        preferred = np.array([testbed.table[s.label][region] == s.concepts[r] for s in scenes])
        assert abs(preferred.mean() - 0.7) < 0.03, region
        per_class = [
            preferred[[s.label == k for s in scenes]].mean() for k in range(len(CLASS_NAMES))
        ]
        assert min(per_class) > 0.55 and max(per_class) < 0.85
        # the other concepts of the region share the rest evenly
        others = [s.concepts[r] for s in scenes if testbed.table[s.label][region] != s.concepts[r]]
        counts = np.unique(others, return_counts=True)[1]
        assert counts.min() > 0.8 * counts.mean()
    assert Testbed(TestbedConfig(p_prefer=1.0)).sample(40, "train")[5].concepts == tuple(
        testbed.table[5][r] for r in REGIONS
    )


# ----------------------------------------------------------------------------- datasets
def test_make_dataset_tensors_masks_and_cache(tmp_path) -> None:
    data = make_dataset(30, "test", seed=2, cache_dir=tmp_path)
    assert data.images.shape == (30, 3, 80, 80) and data.labels.tolist() == [
        i % 20 for i in range(30)
    ]
    assert data.segmentation.shape == (30, 80, 80) and data.concepts.shape == (30, len(REGIONS))
    for i, s in enumerate(data.specs):
        assert [CONCEPTS[c] for c in data.concepts[i]] == list(s.concepts)
    floor = data.mask("floor")
    for concept in ("grass", "sand", "water"):
        m = data.mask(concept)
        assert not (m & ~floor).any()
        assert torch.equal(m.flatten(1).any(1), data.has_concept(concept))
    assert len(list(tmp_path.glob("*.npz"))) == 1
    again = make_dataset(30, "test", seed=2, cache_dir=tmp_path)
    assert torch.equal(again.images, data.images) and torch.equal(
        again.segmentation, data.segmentation
    )
    assert data.float_images().max() <= 1.0
