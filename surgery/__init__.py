"""model-surgery: edit a trained image classifier's prediction rules with rank-one weight updates.

The method of "Editing a classifier by rewriting its prediction rules" (Santurkar et al., NeurIPS
2021). See the README for a quick-start.
"""

__version__ = "0.1.0"

from .apply import EditHandle, apply_edit, edited, list_edits, revert_edit
from .class_folders import LabelledPhotos, Preprocess, load_concept_masks, load_labelled_photos
from .concepts import load_mask, masks_from_segmentation, paste_texture, style_transfer
from .edit import Edit
from .edit_file import load_edit
from .editable import EditableLayer, LayerIO, Site
from .errors import (
    EditFormatError,
    IncompatibleEditError,
    LayerNotFoundError,
    ModelLoadError,
    SurgeryError,
    SurgeryWarning,
    UnsupportedModelError,
)
from .finetune import finetune
from .hooks import StopForward, Trace, TraceDict, get_module, trace, trace_dict
from .layers import LayerInfo, describe_layers, editable_layers, get_layer, rank_layers, recommended_layers
from .metrics import EditReport, errors_corrected, evaluate_edit, predict
from .models import load_model
from .probe import ProbeResult, probe
from .rewrite import rewrite
from .select import (
    CachedImages,
    Candidate,
    NoCandidateError,
    Selection,
    select_by_concept_match,
    select_strength,
    strength_grid,
)
from .stats import KeyStats, collect_key_stats

from . import adapters  # noqa: E402  (``surgery.adapters``, installed from ``adapters/``, after its imports)

__all__ = [
    "__version__",
    # the method
    "rewrite",
    "collect_key_stats",
    "KeyStats",
    "finetune",
    # edits
    "Edit",
    "load_edit",
    "apply_edit",
    "revert_edit",
    "edited",
    "list_edits",
    "EditHandle",
    # evaluation
    "errors_corrected",
    "evaluate_edit",
    "predict",
    "EditReport",
    # choosing the strength
    "select_strength",
    # concepts and finding rules
    "paste_texture",
    "style_transfer",
    "load_mask",
    "masks_from_segmentation",
    "probe",
    "ProbeResult",
    "Preprocess",
    "LabelledPhotos",
    "load_labelled_photos",
    "load_concept_masks",
    # models
    "load_model",
    "CachedImages",
    "select_by_concept_match",
    "strength_grid",
    "Candidate",
    "Selection",
    "NoCandidateError",
    # layers and hooks
    "editable_layers",
    "get_layer",
    "recommended_layers",
    "rank_layers",
    "adapters",
    "describe_layers",
    "EditableLayer",
    "LayerInfo",
    "LayerIO",
    "Site",
    "trace",
    "trace_dict",
    "Trace",
    "TraceDict",
    "StopForward",
    "get_module",
    # errors
    "SurgeryError",
    "EditFormatError",
    "IncompatibleEditError",
    "LayerNotFoundError",
    "ModelLoadError",
    "UnsupportedModelError",
    "SurgeryWarning",
]
