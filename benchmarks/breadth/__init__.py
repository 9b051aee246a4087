"""Breadth: does an edit reach the prediction on today's architectures? (issue 17)

For each of ~40 architectures from torchvision, timm and open_clip (random weights, with norm scales
and layer-scales re-randomized and BatchNorm statistics recalibrated on the benchmark's images), a
synthetic concept -- one fixed texture pasted as a square into smooth images -- is rewritten away at
the adapter's recommended layers with the library's own ``collect_key_stats`` / ``rewrite`` /
``edited``. Reported per model: the adapter and the layer's block, ``block_forward``'s error against
the hooked value, and how far the edit moves

(a) the value and (b) the logits of the transformed exemplars toward the originals',
(c) the logits of held-out images carrying the same texture toward their originals' (generalization),
(d) the logits of clean images (the cost),

as ratios after/before (1 = no effect, 0 = the originals' exactly). ``--sweep`` measures many
candidate layers per model (attention and MLP outputs at several depths, and prefix-token weights)
and the two published layer-choice ideas: attention output vs MLP for ViTs, and ranking layers by an
attribution score before editing.

    python -m benchmarks.breadth            # every model, the recommended layers
    python -m benchmarks.breadth --quick    # 6 small models, 1 layer each
    python -m benchmarks.breadth --sweep    # candidate layers at several depths (slow)
    python -m benchmarks.breadth --measured -k 1  # the layer recommended_layers ranks first on the exemplars

Results: ``benchmarks/results/breadth.{md,json}`` (``breadth-sweep.*`` for ``--sweep``, ``breadth-measured.*``
for ``--measured``).

The package, by job: :mod:`.weights` (random weights that exercise every block), :mod:`.concept` (the
synthetic concept and the images), :mod:`.models` (the model zoo), :mod:`.measure` (editing one layer
and measuring it), :mod:`.sweep` (candidate layers, what the sweep says), :mod:`.branch` (values after
the residual add vs the branch alone), :mod:`.report` (Markdown), :mod:`.driver` (the run and the
command line); studies of issue 26: :mod:`.clip_prefix` (why open_clip's edit moved away),
:mod:`.rank` (more directions at the recommended site, or the loss on the mask), :mod:`.strength` (the
edit at other strengths), :mod:`.span` (span edits beside it), :mod:`.ranking` (the measured ranking), :mod:`.reach`
(what a weight edit reaches when fitted on the held-out images themselves, and sites edited in sequence).
"""

from __future__ import annotations

from .branch import BRANCH_CASES, branch_markdown, run_branch_comparison
from .concept import Data, concept_texture, make_data, paste_concept, smooth_images
from .driver import main, run
from .measure import measure_layer
from .models import MODELS, QUICK, ModelSpec
from .report import markdown
from .sweep import summarize_sweep, sweep_layers
from .weights import (
    prepare_model,
    randomize_norms,
    randomize_scales,
    randomize_zero_weights,
    recalibrate_batchnorm,
)

__all__ = [
    "MODELS",
    "QUICK",
    "ModelSpec",
    "randomize_norms",
    "randomize_scales",
    "randomize_zero_weights",
    "recalibrate_batchnorm",
    "prepare_model",
    "smooth_images",
    "concept_texture",
    "paste_concept",
    "Data",
    "make_data",
    "measure_layer",
    "sweep_layers",
    "summarize_sweep",
    "BRANCH_CASES",
    "run_branch_comparison",
    "branch_markdown",
    "run",
    "markdown",
    "main",
]
