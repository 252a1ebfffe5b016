"""lightning_lrcnn: train CNNs on high-resolution images with row-centric (LR-CNN) execution."""

from .auto import Candidate, Choice, NoPlanFitsError, choose_plan
from .callback import RowCentricTraining
from .convert import is_row_centric, restore, row_centric_config, to_row_centric
from .errors import PlanError, RowCentricError, TraceError

__all__ = [
    "to_row_centric",
    "restore",
    "is_row_centric",
    "row_centric_config",
    "RowCentricTraining",
    "choose_plan",
    "Candidate",
    "Choice",
    "NoPlanFitsError",
    "RowCentricError",
    "TraceError",
    "PlanError",
]
__version__ = "0.1.0"
