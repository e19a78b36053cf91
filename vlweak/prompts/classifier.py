"""The zero-shot text classifier (Radford et al. 2021, prompt ensembling).

For class ``c`` with templates ``t_1..t_T``: ``w_c = normalize(mean_j normalize(f_text(t_j(c))))``.
Class scores of an image are ``logit_scale * normalize(f_img) @ Wᵀ``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn
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
    _warn_if_cut(backbone, names, [max(texts[k * len(temps) : (k + 1) * len(temps)], key=len) for k in range(len(names))])
    starts = range(0, len(texts), batch_size)
    if len(texts) >= PROGRESS_MIN_PROMPTS:  # e.g. ImageNet's 1,000 classes x 80 templates: minutes on a CPU
        from vlweak.progress import progress_bar

        starts = progress_bar(starts, desc=f"encoding {len(texts):,} prompts", unit="batch")
    feats = torch.cat([backbone.encode_text(texts[i : i + batch_size]) for i in starts])
    feats = feats.view(len(names), len(temps), -1).mean(1)
    return torch.nn.functional.normalize(feats, dim=-1)


def cut_by_the_context(backbone, texts: Sequence[str], ids: Tensor | None = None) -> list[int]:
    """The positions of ``texts`` whose tokens do not fit the text encoder's context: the tokenizer
    cuts them, so their ends never reach the encoder. A text that fills the context exactly ends with
    the end-of-text token in the last slot, as a cut one does; it fits when the token before that is
    the text's own last token (that of its last word alone). ``ids``: the texts' tokens, when the
    caller has them."""
    texts = list(texts)
    ids = backbone.tokenize(texts) if ids is None else ids
    eos_at = backbone.eot_positions(ids)
    rows = (eos_at >= ids.shape[1] - 1).nonzero().flatten()
    if not len(rows):
        return []
    tails = backbone.tokenize([(texts[i].split() or [texts[i]])[-1] for i in rows.tolist()])
    last = tails.gather(1, (backbone.eot_positions(tails).unsqueeze(1) - 1).clamp(min=0)).flatten()
    kept = ids[rows].gather(1, (eos_at[rows] - 1).unsqueeze(1)).flatten()
    return [i for i, ok in zip(rows.tolist(), (kept == last).tolist()) if not ok]


def _warn_if_cut(backbone, names: list[str], longest: list[str]) -> None:
    """Warn when a class's longest prompt is cut to the text encoder's context (two long names that
    share a beginning then score alike)."""
    if not hasattr(backbone, "eot_positions"):
        return
    cut = cut_by_the_context(backbone, longest)
    if cut:
        shown = ", ".join(repr(names[i]) for i in cut[:3]) + (" ..." if len(cut) > 3 else "")
        rank_zero_warn(
            f"the prompts of {len(cut)} class(es) are longer than the text encoder's context and are cut "
            f"({shown}): what follows the cut never reaches the classifier; shorter names keep them apart",
            stacklevel=4,  # the caller of text_classifier (past its no_grad wrapper)
        )


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
