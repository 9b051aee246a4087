"""``surgery demo``: the method end to end in a few minutes on a CPU.

:func:`run_concept_demo` edits a trained testbed classifier (:mod:`surgery.testbed`) and compares the
edit with fine-tuning; :func:`run_photo_demo` runs the real EfficientNet-Lite0 on real photos.
"""

from surgery.demo.concept import run_concept_demo
from surgery.demo.photos import classify_photos, run_photo_demo

__all__ = ["run_concept_demo", "run_photo_demo", "classify_photos"]
