"""Probing a classifier's prediction rules with concept-level counterfactuals (the paper's Section 5).

Transform one concept at a time (e.g. cover the grass in snow) and measure, per class, how much the
accuracy drops on the images of that class that show the concept: :func:`probe` runs it,
:class:`ProbeResult` reports it, :data:`PIXEL_STYLES` are built-in transformations.
"""

from surgery.probe.result import ProbeCell, ProbeResult, ProbeRow
from surgery.probe.run import probe
from surgery.probe.pixel_styles import PIXEL_STYLES, StyleFn, Transform, masked_transform

__all__ = ["probe", "ProbeResult", "ProbeCell", "ProbeRow", "PIXEL_STYLES", "StyleFn", "Transform", "masked_transform"]
