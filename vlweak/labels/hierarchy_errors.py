"""Errors raised while building, loading or applying a :class:`~vlweak.labels.LabelHierarchy`."""


class HierarchyError(ValueError):
    """Base class of label-hierarchy errors (a ``ValueError``)."""


class MultipleParentsError(HierarchyError):
    """A name is listed under two different parents (the message names it and both parents)."""


class EmptySubclassesError(HierarchyError):
    """A parent has an empty sub-class list."""


class DuplicateNameError(HierarchyError):
    """A name appears twice where names must be unique (e.g. twice in one sub-class list)."""


class UnknownParentError(HierarchyError):
    """A hierarchy parent is not in the dataset's class vocabulary, or a vocabulary class has no
    entry in the hierarchy (the message lists the offending names)."""


class HierarchyFormatError(HierarchyError):
    """A file or mapping cannot be read as a hierarchy (bad shape, cycle, unknown built-in name,
    a level deeper than a branch)."""
