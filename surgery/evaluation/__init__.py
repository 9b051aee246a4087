"""Measuring edits: errors corrected and clean accuracy, fast evaluation of many candidates, and the
choice of an edit's strength on validation data, and of the layer to edit (docs/method.md sections 6 and 8)."""

from surgery.evaluation.cached import CachedImages, Candidate
from surgery.evaluation.concept_match import select_by_concept_match
from surgery.evaluation.layer_ranking import rank_layers, recommended_layers
from surgery.evaluation.metrics import (
    EditReport,
    GroupResult,
    errors_corrected,
    evaluate_edit,
    predict,
)
from surgery.evaluation.select import (
    CandidateResult,
    NoCandidateError,
    Selection,
    select_strength,
    strength_grid,
)

__all__ = [
    "errors_corrected",
    "evaluate_edit",
    "predict",
    "EditReport",
    "GroupResult",
    "CachedImages",
    "Candidate",
    "select_strength",
    "select_by_concept_match",
    "strength_grid",
    "Selection",
    "CandidateResult",
    "NoCandidateError",
    "recommended_layers",
    "rank_layers",
]
