"""The paper's efficacy benchmark on the concept testbed (Santurkar et al. 2021, Sec. 4.1, Fig. 5, App. A.6).

Protocol, per architecture (the pair, target and candidate rules are :mod:`surgery.testbed.protocol`,
which ``surgery demo`` follows too):

1. **Concept-style pairs, the paper's way.** On clean ``val``-split scenes, every concept is restyled
   with every style (variant 0); a pair qualifies when the transformation lowers the accuracy of at
   least ``--min-hurt`` (3) classes by at least ``--min-drop`` (15) percentage points on their
   scenes that show the concept (classes with at least 5 such scenes). ``--pairs K`` of the
   qualifying pairs are drawn at random (seeded). If fewer qualify, the most harmful remaining pairs
   fill the list and are marked ``"qualifies": false`` in the JSON.
2. **Per pair**: one exemplar variant of the style (random); held-out = the other 3 variants. The
   evaluation pool is every ``test``-split scene that shows the concept. A random target class
   (among classes with enough scenes showing the concept); for each N in {1, 3, 10} and each draw,
   N exemplars of the target class from the pool, and the rest of the pool split 30/70 into
   validation / test at random (per draw). Exemplars are (clean scene, scene with the concept
   restyled, concept mask).
3. **Methods and grids** (each a list of candidate edits): ``edit`` (fast solver, L1, no mask: the
   paper's ``-mask``, the better one; one solve per candidate layer, then a strength grid ``alpha``
   applied at edit time), ``edit +mask``, ``reference`` (the Adam solver with a steps grid, on the
   first ``--reference-pairs`` pairs, N=3, first draw only), ``finetune local`` / ``finetune
   global`` (plain SGD; ``FT_GRID``: the paper's three largest learning rates, 200 steps, deepest
   candidate layer; ``--paper-ft-grid``: the paper's whole grid at every candidate layer). Variants: ``edit multi-class`` (exemplars
   drawn from up to 3 classes showing the concept; "target" = those classes), ``edit high-res``
   (the 10x10 candidate layers), ``edit label-free`` (the ``edit`` candidates, strength chosen
   without validation labels by :func:`surgery.evaluation.select_by_concept_match`: edited activations
   of the unlabelled transformed validation images matched to the concept's mean activation on
   clean training scenes). The variants cost as much as the main methods, so they run on N=3, first
   draw of each pair only (``variant_ns``, ``variant_draws``).
4. **Selection on validation only**: :func:`surgery.evaluation.select_strength` on the validation images
   (exemplar variant, counted on images whose clean original was right, as the paper's code),
   among candidates whose clean-accuracy drop on clean ``val``-split scenes is at most 0.25 pp.
   Clean accuracy is measured best validation score first until a candidate qualifies
   (``check_every_candidate=False``: the same choice; the JSON's selection tables leave the rest
   ``null``). If none qualifies the method makes no edit (as the paper, App. A.6.3). Test images are never
   seen by the selection (the JSON records the indices; the tests check they are disjoint).
5. **Report** on test: % errors corrected (floored at -100; counted only on images whose clean
   original the unedited model classifies correctly) for target / other classes x same / held-out
   variants, "other" as the paper (all other classes) and split into classes that prefer the
   concept and classes that do not; the clean test accuracy change; the change of the true-class
   logit on other classes' images (the prototype's failure mode: an edit that rewrites the
   object's own evidence). Mean and bootstrap 95% interval over (pair, draw) units.

Key statistics come from clean ``train``-split scenes and are cached (``surgery.collect_key_stats``).

Usage::

    python -m benchmarks.efficacy --arch all              # the full run (hours on 2 cores)
    python -m benchmarks.efficacy --arch vgg --quick      # smoke run: 3 pairs, N=3, 2 draws
    python -m benchmarks.efficacy --tiny --out DIR        # seconds, a tiny classifier trained here
    python -m benchmarks.efficacy --pool A.json B.json --name NAME   # leads pooled over runs of other seeds
"""

from .driver import main, run_arch
from .report import bootstrap_ci, headline, markdown
from .settings import GROUPS, Settings, settings_for

__all__ = ["main", "run_arch", "Settings", "settings_for", "GROUPS", "bootstrap_ci", "headline", "markdown"]
