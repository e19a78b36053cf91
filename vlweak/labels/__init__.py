"""Label sets, hierarchies and the pseudolabel artifact."""

from vlweak.labels.artifact import ArtifactError, PseudoLabels
from vlweak.labels.hierarchy import LabelHierarchy, normalize_name
from vlweak.labels.hierarchy_builtin import builtin_names as builtin_hierarchies
from vlweak.labels.hierarchy_clean import clean_subclasses
from vlweak.labels.hierarchy_errors import (
    DuplicateNameError,
    EmptySubclassesError,
    HierarchyError,
    HierarchyFormatError,
    MultipleParentsError,
    UnknownParentError,
)
from vlweak.labels.hierarchy_generate import (
    GenerationError,
    OpenAICompatibleGenerator,
    SubclassGenerator,
    TransformersGenerator,
    generate_hierarchy,
)

__all__ = [
    "ArtifactError",
    "DuplicateNameError",
    "EmptySubclassesError",
    "GenerationError",
    "HierarchyError",
    "HierarchyFormatError",
    "LabelHierarchy",
    "MultipleParentsError",
    "OpenAICompatibleGenerator",
    "PseudoLabels",
    "SubclassGenerator",
    "TransformersGenerator",
    "UnknownParentError",
    "builtin_hierarchies",
    "clean_subclasses",
    "generate_hierarchy",
    "normalize_name",
]
