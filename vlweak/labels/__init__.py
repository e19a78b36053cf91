"""Label sets, hierarchies and the pseudolabel artifact."""

from vlweak.labels.artifact import ArtifactError, PseudoLabels

__all__ = ["ArtifactError", "PseudoLabels"]
