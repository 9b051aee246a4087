"""model-surgery: edit a trained image classifier's prediction rules with rank-one weight updates.

The method of "Editing a classifier by rewriting its prediction rules" (Santurkar et al., NeurIPS
2021), in exact terms in docs/method.md. The names below follow a user's steps; docs/api.md has one
line per name. The rooms behind them: :mod:`surgery.models` (loading), :mod:`surgery.adapters` (where a
family's layers are), :mod:`surgery.stats`, :mod:`surgery.solvers`, :mod:`surgery.edits` (edits, their
files, apply/revert, checkpoints), :mod:`surgery.evaluation`, :mod:`surgery.inputs` (images, masks,
preprocessing, labelled folders), :mod:`surgery.concepts`, :mod:`surgery.probe`, :mod:`surgery.testbed`.
"""

from surgery import adapters  # noqa: E402  (reachable as surgery.adapters after `import surgery`)
from surgery._version import __version__

# 6. concepts, photos, and the rules a model relies on
from surgery.concepts.paste import paste_texture

# 4. patch a model, take the patch off
from surgery.edits.apply import apply_edit, edited, list_edits, revert_edit
from surgery.edits.edit import Edit

# errors
from surgery.errors import (
    EditFormatError,
    IncompatibleEditError,
    LayerNotFoundError,
    ModelLoadError,
    SurgeryError,
    SurgeryWarning,
    UnsupportedModelError,
)
from surgery.evaluation.layer_ranking import recommended_layers

# 5. measure an edit, choose its strength
from surgery.evaluation.metrics import errors_corrected, evaluate_edit
from surgery.evaluation.select import select_strength, strength_grid
from surgery.finetune import finetune
from surgery.hooks import Trace
from surgery.inputs.folders import load_labelled_photos
from surgery.inputs.masks import load_masks
from surgery.inputs.preprocess import Preprocess
from surgery.layers import editable_layers, get_layer

# 1. a model and the layers that can be edited
from surgery.models import load_model
from surgery.probe import probe

# 3. an edit, and the baseline it is compared with
from surgery.rewrite import rewrite

# 2. the second moment of a layer's keys
from surgery.stats import KeyStats, collect_key_stats

__all__ = [
    "__version__",
    "adapters",
    # 1. a model and its layers
    "load_model",
    "editable_layers",
    "get_layer",
    "recommended_layers",
    "Trace",
    # 2. key statistics
    "collect_key_stats",
    "KeyStats",
    # 3. edits
    "rewrite",
    "finetune",
    "Edit",
    # 4. apply and revert
    "apply_edit",
    "revert_edit",
    "edited",
    "list_edits",
    # 5. measure, choose the strength
    "evaluate_edit",
    "errors_corrected",
    "select_strength",
    "strength_grid",
    # 6. concepts, photos, rules
    "paste_texture",
    "load_masks",
    "Preprocess",
    "load_labelled_photos",
    "probe",
    # errors
    "SurgeryError",
    "SurgeryWarning",
    "EditFormatError",
    "IncompatibleEditError",
    "LayerNotFoundError",
    "ModelLoadError",
    "UnsupportedModelError",
]
