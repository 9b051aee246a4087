"""model-surgery: edit a trained image classifier's prediction rules with rank-one weight updates.

The method of "Editing a classifier by rewriting its prediction rules" (Santurkar et al., NeurIPS
2021). See the README for a quick-start.
"""

from .editable import EditableLayer, LayerIO, Site
from .errors import LayerNotFoundError, ModelLoadError, SurgeryError, UnsupportedModelError
from .hooks import StopForward, Trace, TraceDict, get_module, trace, trace_dict
from .layers import LayerInfo, describe_layers, editable_layers, get_layer

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # hooks
    "trace",
    "trace_dict",
    "Trace",
    "TraceDict",
    "StopForward",
    "get_module",
    # layers
    "editable_layers",
    "get_layer",
    "describe_layers",
    "EditableLayer",
    "LayerInfo",
    "LayerIO",
    "Site",
    # errors
    "SurgeryError",
    "LayerNotFoundError",
    "ModelLoadError",
    "UnsupportedModelError",
]
