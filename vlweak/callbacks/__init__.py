"""Lightning callbacks shared by vlweak's methods."""

from vlweak.callbacks.figures import EvaluationFigures
from vlweak.callbacks.interrupt import CheckpointOnInterrupt
from vlweak.callbacks.pseudolabel_rounds import PseudolabelRounds, RoundState

__all__ = ["CheckpointOnInterrupt", "EvaluationFigures", "PseudolabelRounds", "RoundState"]
