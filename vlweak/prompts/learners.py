"""Learnable prompts around a frozen backbone.

* :class:`TextPromptLearner` — CoOp (Zhou et al. 2022): ``M`` learnable context vectors around each
  class name, ``[SOS] v_1 … v_M <class name> . [EOS]`` (or the name first, or in the middle), shared
  by all classes or one set per class, initialised randomly (N(0, 0.02)) or from a phrase's word
  embeddings.
* :class:`DualPromptLearner` — DualCoOp (Sun et al. 2022): a positive and a negative context.
* :class:`VisualPromptLearner` — learnable tokens inserted into the image encoder's input sequence
  (visual prompt tuning as used by Menghini et al. 2023).

Each learner's ``forward`` returns unit-norm class embeddings ``[C, D]`` (text) or prompt tokens.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlweak.data.datasets import clean_classname, validate_classnames
from vlweak.prompts.classifier import cut_by_the_context

#: where the class name sits in a textual prompt (CoOp's class token position)
Position = Literal["end", "middle", "front"]

_PLACEHOLDER = "X"


class TextPromptLearner(nn.Module):
    """CoOp learnable context for a class vocabulary.

    Args:
        backbone: a frozen :class:`~vlweak.backbones.Backbone` (only used to tokenize, embed and
            run the text tower; it is not registered as a sub-module).
        classnames: the class vocabulary.
        n_ctx: number of context vectors (CoOp's default 16; ignored when ``init`` is given).
        init: a phrase whose word embeddings initialise the context (e.g. ``"a photo of a"``);
            ``None`` draws N(0, 0.02).
        class_specific: one context per class (CoOp's CSC) instead of one shared context.
        position: where the class name goes (CoOp's class token position): ``end`` (after the
            context, CoOp's default), ``middle`` (between its two halves) or ``front`` (before it).
    """

    POSITIONS = get_args(Position)

    def __init__(
        self,
        backbone,
        classnames: list[str],
        n_ctx: int = 16,
        init: str | None = None,
        class_specific: bool = False,
        position: Position = "end",
    ) -> None:
        super().__init__()
        if position not in self.POSITIONS:
            raise ValueError(f"position (of the class name) must be one of {self.POSITIONS}, got {position!r}")
        names = [clean_classname(c) for c in validate_classnames(classnames)]
        object.__setattr__(self, "backbone", backbone)  # not a sub-module: stays frozen, not saved twice
        width = backbone.token_embedding(backbone.tokenize(["a"])).shape[-1]
        with torch.no_grad():
            if init:
                init_ids = backbone.tokenize([init])
                n_ctx = int(backbone.eot_positions(init_ids).item()) - 1  # tokens between SOS and EOS
                if n_ctx < 1:
                    raise ValueError(f"context initialisation phrase {init!r} has no tokens")
                init_vec = backbone.token_embedding(init_ids)[0, 1 : 1 + n_ctx].float().cpu()
            elif n_ctx < 1:
                raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
            else:
                init_vec = torch.randn(n_ctx, width) * 0.02
        ctx = init_vec.unsqueeze(0).repeat(len(names), 1, 1) if class_specific else init_vec
        self.ctx = nn.Parameter(ctx.clone())
        self.n_ctx, self.class_specific, self.classnames, self.position = n_ctx, class_specific, names, position
        prompts = [" ".join([_PLACEHOLDER] * n_ctx) + f" {name}." for name in names]
        ids = backbone.tokenize(prompts)
        too_long = [names[i] for i in cut_by_the_context(backbone, prompts, ids)]
        if too_long:
            raise ValueError(
                f"class names too long for the text encoder's context of {ids.shape[1]} tokens with {n_ctx} "
                f"learned context tokens before them: {too_long[:3]}{' ...' if len(too_long) > 3 else ''} "
                "(a smaller n_ctx, or shorter names, leaves them room)"
            )
        with torch.no_grad():
            emb = backbone.token_embedding(ids).float().cpu()
        # the sequence is built name-last, then each row is reordered to put its name where asked
        order = None if position == "end" else _name_order(backbone, names, n_ctx, ids.shape[1], position)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("token_ids", ids if order is None else ids.gather(1, order), persistent=False)
        self.register_buffer("prefix", emb[:, :1], persistent=False)  # SOS
        self.register_buffer("suffix", emb[:, 1 + n_ctx :], persistent=False)  # class name, '.', EOS, padding

    def embeddings(self) -> Tensor:
        """Input word embeddings ``[C, L, width]`` with the learnable context in place."""
        ctx = self.ctx if self.class_specific else self.ctx.unsqueeze(0).expand(len(self.classnames), -1, -1)
        out = torch.cat([self.prefix.to(ctx.dtype), ctx, self.suffix.to(ctx.dtype)], dim=1)
        if self.order is not None:
            out = out.gather(1, self.order.unsqueeze(-1).expand(-1, -1, out.shape[-1]))
        return out

    def forward(self) -> Tensor:
        """Unit-norm class embeddings ``[C, D]`` through the frozen text tower."""
        with self.backbone.autocast():
            feats = self.backbone.encode_text_embeddings(self.embeddings(), self.token_ids)
        return F.normalize(feats.float(), dim=-1)


def _name_order(backbone, names: list[str], n_ctx: int, length: int, position: str) -> Tensor:
    """``[C, L]`` positions into the name-last sequence ``[SOS] ctx <name> . [EOS] …`` that put each
    class name first (``front``) or between the context's halves (``middle``); the rest, from the
    '.' on, keeps its place, so the end-of-text token does too."""
    name_len = (backbone.eot_positions(backbone.tokenize(names)) - 1).tolist()  # the name's tokens between SOS and EOS
    half = n_ctx // 2 if position == "middle" else 0
    rows = []
    for n in name_len:
        ctx = list(range(1, 1 + n_ctx))
        name = list(range(1 + n_ctx, 1 + n_ctx + n))
        rows.append([0] + ctx[:half] + name + ctx[half:] + list(range(1 + n_ctx + n, length)))
    return torch.tensor(rows, dtype=torch.long)


class DualPromptLearner(nn.Module):
    """DualCoOp's positive and negative contexts: ``forward()`` returns ``(pos [C, D], neg [C, D])``.

    Args:
        backbone: the frozen backbone.
        classnames: the class vocabulary.
        n_ctx: context length of each prompt.
        init_pos: phrase initialising the positive context (``None``: random).
        init_neg: phrase initialising the negative context (``None``: random).
        class_specific: class-specific contexts (DualCoOp's default for partial labels).
    """

    def __init__(
        self,
        backbone,
        classnames: list[str],
        n_ctx: int = 16,
        init_pos: str | None = None,
        init_neg: str | None = None,
        class_specific: bool = True,
    ) -> None:
        super().__init__()
        self.positive = TextPromptLearner(backbone, classnames, n_ctx, init_pos, class_specific)
        self.negative = TextPromptLearner(backbone, classnames, n_ctx, init_neg, class_specific)

    def forward(self) -> tuple[Tensor, Tensor]:
        # One pass of the text tower for both prompts of every class.
        pos, neg = self.positive, self.negative
        emb = torch.cat([pos.embeddings(), neg.embeddings()])
        ids = torch.cat([pos.token_ids, neg.token_ids])
        with pos.backbone.autocast():
            feats = pos.backbone.encode_text_embeddings(emb, ids)
        feats = F.normalize(feats.float(), dim=-1)
        return feats[: len(pos.classnames)], feats[len(pos.classnames) :]


class VisualPromptLearner(nn.Module):
    """Learnable tokens ``[n_tokens, width]`` inserted after the image encoder's class token.

    Args:
        width: token width of the image tower (``backbone.visual_width``).
        n_tokens: number of visual prompt tokens.
        init_std: standard deviation of their normal initialisation; ``None``: ``width ** -0.5``,
            the scale of the pseudolabel prompt tuning paper's public code (0.036 at ViT-B's 768).
            The tokens pass the tower's pre-transformer norm, so this scale does not change the
            first forward, only how far a gradient step moves them (a larger scale, a smaller
            relative step).
    """

    def __init__(self, width: int, n_tokens: int = 8, init_std: float | None = None) -> None:
        super().__init__()
        if n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
        if init_std is not None and not init_std > 0:
            raise ValueError(f"init_std (of the visual prompt tokens) must be positive, got {init_std!r}")
        self.init_std = float(width**-0.5 if init_std is None else init_std)
        self.tokens = nn.Parameter(torch.randn(n_tokens, width) * self.init_std)

    def forward(self) -> Tensor:
        return self.tokens
