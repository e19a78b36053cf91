"""Multi-label losses the method papers define and no library ships."""

from vlweak.losses.asymmetric import AsymmetricLoss, asymmetric_loss, pair_to_margin
from vlweak.losses.single_positive import AsymmetricPseudoLabeler, EntropyMaximizationLoss, em_apl_loss

__all__ = [
    "AsymmetricLoss",
    "AsymmetricPseudoLabeler",
    "EntropyMaximizationLoss",
    "asymmetric_loss",
    "em_apl_loss",
    "pair_to_margin",
]
