"""Lightning callbacks shared by vlweak's methods."""

from vlweak.callbacks.pseudolabel_rounds import PseudolabelRounds, RoundState

__all__ = ["PseudolabelRounds", "RoundState"]
from vlweak.callbacks.figures import EvaluationFigures  # noqa: E402

__all__ += ["EvaluationFigures"]
