"""The zero-shot text classifier (Radford et al. 2021, prompt ensembling).

For class ``c`` with templates ``t_1..t_T``: ``w_c = normalize(mean_j normalize(f_text(t_j(c))))``.
Class scores of an image are ``logit_scale * normalize(f_img) @ Wᵀ``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from vlweak.data.datasets import clean_classname, validate_classnames
from vlweak.prompts.templates import resolve_templates


#: prompts from which encoding them shows a progress bar
PROGRESS_MIN_PROMPTS = 4096


@torch.no_grad()
def text_classifier(
    backbone,
    classnames: Sequence[str],
    templates: str | Sequence[str] = "simple",
    batch_size: int = 256,
    clean: bool = True,
) -> Tensor:
    """Class embeddings ``[C, D]`` (unit norm) from class names × templates with ``backbone``."""
    names = validate_classnames(classnames)
    temps = resolve_templates(templates if isinstance(templates, str) else list(templates))
    texts = [t.format(clean_classname(c) if clean else c) for c in names for t in temps]
    starts = range(0, len(texts), batch_size)
    if len(texts) >= PROGRESS_MIN_PROMPTS:  # e.g. ImageNet's 1,000 classes x 80 templates: minutes on a CPU
        from vlweak.progress import progress_bar

        starts = progress_bar(starts, desc=f"encoding {len(texts):,} prompts", unit="batch")
    feats = torch.cat([backbone.encode_text(texts[i : i + batch_size]) for i in starts])
    feats = feats.view(len(names), len(temps), -1).mean(1)
    return torch.nn.functional.normalize(feats, dim=-1)


@torch.no_grad()
def cached_text_classifier(backbone, names: Sequence[str], templates: str | Sequence[str], cache=None) -> Tensor:
    """:func:`text_classifier` of ``names``, kept in an embedding cache
    (:class:`~vlweak.data.cache.EmbeddingCache`, ``None``: computed) under ``text/``, keyed by the
    backbone's fingerprint (weights and precision), the names and the templates: a vocabulary of
    thousands of classes or sub-classes times 80 templates is encoded once, not by every run."""
    from vlweak.data.cache import cache_key

    def compute() -> dict[str, Tensor]:
        return {"classifier": text_classifier(backbone, names, templates).cpu()}

    if cache is None:
        return compute()["classifier"]
    key = cache_key(backbone=backbone.fingerprint(), names=list(names), templates=resolve_templates(
        templates if isinstance(templates, str) else list(templates)))
    return cache.get_or_compute(key, compute, namespace="text", n=len(names))["classifier"]
