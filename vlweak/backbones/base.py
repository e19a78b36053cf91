"""The one interface every CLIP-family model is used through.

Methods never import open_clip or transformers; they ask a :class:`Backbone` for what they need:
image and text embeddings, the tokenizer, token embeddings and a text forward that accepts
embeddings (prompt learners insert learnable contexts there), dense patch/region features
(region aggregation), visual prompt tokens, the preprocessing transform and ``logit_scale``.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import os
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchvision.transforms import v2

Precision = Literal["fp32", "bf16", "fp16"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Backbone(nn.Module, abc.ABC):
    """A frozen (by default) CLIP-family image/text encoder pair.

    Args:
        precision: compute precision for the encoders: ``fp32``, ``bf16`` or ``fp16`` (autocast on
            the device the backbone lives on; fp16 autocast is only honoured on CUDA).
        freeze: keep every encoder weight frozen (``requires_grad=False``, eval mode). Prompt
            learners train their own parameters around a frozen backbone.
    """

    #: Name of the pretrained weights (an open_clip tag, a hub id or a file path), for provenance.
    weights: str = ""

    def __init__(self, precision: Precision = "fp32", freeze: bool = True) -> None:
        super().__init__()
        if precision not in _DTYPES:
            raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
        self.precision = precision
        self.freeze = freeze

    # ------------------------------------------------------------------ set-up helpers
    def _finish_init(self) -> None:
        if self.freeze:
            for p in self.parameters():
                p.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> "Backbone":
        # A frozen backbone stays in eval mode (dropout off, norms fixed) whatever Lightning asks.
        return super().train(False if self.freeze else mode)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context manager applying the configured precision on the current device (fp16 runs as
        fp32 on a CPU, which has no fp16 autocast worth the name)."""
        precision = self.effective_precision
        if precision == "fp32":
            if self.precision != precision:
                _warn_once("fp16-cpu", "precision: fp16 runs as fp32 on a CPU (fp16 autocast is for CUDA); the "
                           "embedding cache keys it as fp32")
            return contextlib.nullcontext()
        device_type = self.device.type
        if device_type == "cpu" and precision == "bf16":
            _warn_once("bf16-cpu", "precision: bf16 on a CPU: unless the CPU has bf16 matrix units (AMX, "
                       "AVX512-BF16), autocast runs several times slower than fp32 here; precision: fp32 for CPU runs")
        return torch.autocast(device_type=device_type, dtype=_DTYPES[precision])

    @property
    def effective_precision(self) -> str:
        """The precision that runs on the current device: ``fp16`` is ``fp32`` on a CPU."""
        return "fp32" if self.precision == "fp16" and self.device.type == "cpu" else self.precision

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ what subclasses provide
    @property
    @abc.abstractmethod
    def image_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def image_mean(self) -> tuple[float, float, float]: ...

    @property
    @abc.abstractmethod
    def image_std(self) -> tuple[float, float, float]: ...

    @property
    @abc.abstractmethod
    def embed_dim(self) -> int: ...

    @property
    @abc.abstractmethod
    def logit_scale(self) -> Tensor:
        """The learned temperature, already exponentiated (CLIP's ``logit_scale.exp()``)."""

    @abc.abstractmethod
    def tokenize(self, texts: list[str]) -> Tensor:
        """Token ids ``[n, context_length]`` for a list of strings."""

    @abc.abstractmethod
    def token_embedding(self, token_ids: Tensor) -> Tensor:
        """Input word embeddings ``[n, L, width]`` of token ids (before positional embeddings)."""

    def eot_positions(self, token_ids: Tensor) -> Tensor:
        """Where each row's end-of-text token is (the text tower pools there): the highest id, as
        CLIP's tokenizer numbers it last; a tokenizer numbering it otherwise says where."""
        return token_ids.argmax(dim=-1)

    @abc.abstractmethod
    def encode_text_embeddings(self, embeddings: Tensor, token_ids: Tensor) -> Tensor:
        """Run the text tower on input embeddings; ``token_ids`` locate the end-of-text token.

        Returns un-normalized projected features ``[n, embed_dim]``.
        """

    @abc.abstractmethod
    def encode_image_tokens(
        self, images: Tensor, prompts: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Image tower with optional visual prompt tokens ``[P, width]`` (or ``[B, P, width]``)
        inserted after the class token, into the input sequence of the embedding stage: like the
        patch tokens they pass the tower's pre-transformer norm (CLIP's ``ln_pre``), so a prompt
        enters the transformer at the patch tokens' scale whatever its own.

        Returns ``(pooled [B, D], dense [B, HW, D])``: the projected global feature and every
        spatial token projected into the joint space (prompt tokens excluded).
        """

    @property
    @abc.abstractmethod
    def visual_width(self) -> int:
        """Width of the image tower's token sequence (size of a visual prompt token)."""

    @abc.abstractmethod
    def fingerprint_parts(self) -> dict[str, str]:
        """What identifies these weights for the embedding cache (name, weights, file digest)."""

    # ------------------------------------------------------------------ shared API
    @property
    def transform(self) -> v2.Compose:
        """Evaluation preprocessing: shortest side to ``image_size`` (bicubic), centre crop,
        scale to [0, 1], normalize. Works on PIL images and uint8 ``[C, H, W]`` tensors alike."""
        return v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(self.image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                v2.CenterCrop(self.image_size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(self.image_mean), std=list(self.image_std)),
            ]
        )

    def encode_text(self, texts: list[str] | Tensor, normalize: bool = True) -> Tensor:
        ids = self.tokenize(texts) if isinstance(texts, list) else texts
        ids = ids.to(self.device)
        with self.autocast():
            feats = self.encode_text_embeddings(self.token_embedding(ids), ids)
        feats = feats.float()
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        with self.autocast():
            feats = self._encode_image(images.to(self.device))
        feats = feats.float()
        return F.normalize(feats, dim=-1) if normalize else feats

    def _encode_image(self, images: Tensor) -> Tensor:
        return self.encode_image_tokens(images)[0]

    def dense_features(self, images: Tensor, normalize: bool = True) -> tuple[Tensor, Tensor]:
        """Global and per-region features in the joint space: ``([B, D], [B, HW, D])``."""
        with self.autocast():
            pooled, dense = self.encode_image_tokens(images.to(self.device))
        pooled, dense = pooled.float(), dense.float()
        if normalize:
            pooled, dense = F.normalize(pooled, dim=-1), F.normalize(dense, dim=-1)
        return pooled, dense

    def fingerprint(self) -> str:
        """Stable digest of the weights and compute precision (keys the embedding cache).

        Weights loaded from a file or tag are identified by the file digest / tag; randomly
        initialised or trainable weights by a digest of their current values."""
        parts = dict(self.fingerprint_parts(), precision=self.effective_precision, cls=type(self).__name__)
        if parts.get("weights") == "random-init" or not self.freeze:
            parts["weights"] = state_digest(self)
        text = "|".join(f"{k}={parts[k]}" for k in sorted(parts))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    """A warning shown once per process (autocast is entered at every batch)."""
    if key not in _WARNED:
        _WARNED.add(key)
        rank_zero_warn(message, stacklevel=3)


def check_input_size(image_size: int | None, step: int, native: int, what: str) -> int | None:
    """An ``image_size`` asked of a backbone: ``None`` when unset or the tower's own ``native`` size
    (nothing changes), else the size, which must be a positive multiple of ``step`` (``what`` names
    the step in the error, e.g. ``"ViT-B-32's patch size 32"``)."""
    if image_size is None:
        return None
    if not isinstance(image_size, int) or image_size < step or image_size % step:
        raise ValueError(f"image_size must be a positive multiple of {what}, got {image_size!r}")
    return None if image_size == native else image_size


def state_digest(module: nn.Module) -> str:
    """sha256 of a module's current tensors (first 16 hex digits)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's content (first 16 hex digits)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


#: What a weights error says when the hub's host did not resolve (only the hub cache was read).
NO_NETWORK = "no network: the Hugging Face hub's host does not resolve, so only its cache was read"


def hub_unreachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub's host name fails to resolve: a machine with no network.

    Without this, each hub request on such a machine is retried with back-off for about a minute
    before the cache is read or the error is raised. Only a resolver's definite "no such host"
    counts; a slow resolver (``timeout`` seconds) leaves the hub client to its own handling.
    """
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return False
    failed: list[bool] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, 443)
            failed.append(False)
        except socket.gaierror:
            failed.append(True)
        except OSError:
            failed.append(False)

    probe = threading.Thread(target=resolve, daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(failed and failed[0])


@contextlib.contextmanager
def hub_offline_when_unreachable():
    """Hugging Face hub offline mode (the cache only, no retries) while the hub cannot be resolved.

    Yields whether offline mode was switched on here. huggingface_hub reads ``HF_HUB_OFFLINE`` once,
    at import, and checks its module constant on every request; that constant is set for the block.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or not hub_unreachable():
        yield False
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        constants.HF_HUB_OFFLINE = False
