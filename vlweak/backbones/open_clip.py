"""open_clip models behind the :class:`~vlweak.backbones.base.Backbone` interface."""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer, text_global_pool
from torch import Tensor

from vlweak.backbones.base import (
    NO_NETWORK,
    Backbone,
    Precision,
    check_input_size,
    file_digest,
    hub_offline_when_unreachable,
)
from vlweak.backbones.errors import (
    BackboneError,
    CheckpointMismatchError,
    UnknownArchitectureError,
    VisualPromptError,
    WeightsUnavailableError,
)

CONFIG_DIR = Path(__file__).parent / "configs"
WEIGHTS_DIR = Path(__file__).parent / "weights"
open_clip.add_model_config(CONFIG_DIR)

#: Weights that ship inside the vlweak package: ``pretrained`` tag -> file. Both are the
#: ``vlweak-shapes`` architecture: ``vlweak-shapes`` pretrained on the world's clean captions
#: (recipes/pretrain/shapes*.yaml), ``vlweak-shapes-noisy`` fine-tuned from it on captions that misname
#: three shapes in the shifted domain (recipes/pretrain/shapes_noisy.yaml).
SHIPPED_WEIGHTS = {
    tag: WEIGHTS_DIR / f"{tag}.safetensors" for tag in ("vlweak-shapes", "vlweak-shapes-noisy")
}
#: The architecture each shipped tag was trained as.
SHIPPED_ARCHITECTURE = {tag: "vlweak-shapes" for tag in SHIPPED_WEIGHTS}

log = logging.getLogger(__name__)


_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_RESAVE_HINT = "re-save the weights with `safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')`"


def _is_local_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES)


def _unreadable(path: Path, reason: str) -> CheckpointMismatchError:
    return CheckpointMismatchError(f"{path} is not a readable checkpoint ({reason})")


def _torch_load_reason(err: Exception) -> str:
    """A short reason for a failed ``torch.load(weights_only=True)``, without torch's advice to
    retry with ``weights_only=False`` (which runs arbitrary code from the file)."""
    msg = str(err)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
    if found:
        return (
            f"it holds Python objects ({found.group(1)}) that a safe weights_only load refuses; "
            f"{_RESAVE_HINT}"
        )
    if "WeightsUnpickler error:" in msg:
        detail = msg.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
        detail = " ".join(detail.split())
        return f"not a torch checkpoint: the safe unpickler stopped at {detail!r}" if detail else "not a torch checkpoint"
    if isinstance(err, EOFError):
        return "the file ends early: truncated or not a torch checkpoint"
    first = " ".join(msg.split(". ")[0].split()) or type(err).__name__
    if "zip archive" in first:
        return f"truncated or corrupt torch zip archive: {first}"
    return f"{type(err).__name__}: {first}"


def _directory_error(path: Path) -> CheckpointMismatchError:
    files = sorted(p.name for p in path.iterdir() if p.suffix in _CHECKPOINT_SUFFIXES)
    if (path / "config.json").is_file():
        hint = "; it looks like a Hugging Face `save_pretrained` directory: use HFCLIPBackbone(model_id=...) for it"
    elif files:
        hint = f"; it holds {', '.join(files[:3])}{', ...' if len(files) > 3 else ''}: pass one of those files"
    else:
        hint = ""
    return CheckpointMismatchError(f"{path} is a directory, expected a checkpoint file ({', '.join(_CHECKPOINT_SUFFIXES)}){hint}")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a checkpoint file (safetensors, or a torch pickle with an optional ``state_dict`` key).

    Raises:
        FileNotFoundError: nothing exists at ``path``.
        CheckpointMismatchError: ``path`` is a directory, or a file that is not a readable checkpoint
            (empty, truncated, not safetensors / torch, or not a ``name -> tensor`` mapping).
    """
    path = Path(path)
    if path.is_dir():
        raise _directory_error(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise _unreadable(path, "empty file, 0 bytes")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as err:  # SafetensorError (bad header, truncated file) or OSError
            raise _unreadable(path, f"safetensors: {err}") from err
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - UnpicklingError, RuntimeError (zip), EOFError, ...
            # ``from None``: torch's own message advises weights_only=False, i.e. running the file's code.
            raise _unreadable(path, _torch_load_reason(err)) from None
        if isinstance(sd, dict) and "vlweak_backbone" in sd and not any(
                str(k).startswith("backbone.") for k in sd.get("state_dict") or {}):
            raise CheckpointMismatchError(
                f"{path} is a checkpoint of a fit's prompts or heads, without backbone weights (it names the frozen "
                f"backbone it was trained with, {sd['vlweak_backbone']}): give it as --ckpt_path (Python: "
                "load_from_checkpoint), and that backbone's weights as pretrained"
            )
        if isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise _unreadable(path, f"it holds a {type(sd).__name__}, expected a state dict mapping names to tensors")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        shown = ", ".join(f"{k!r} ({type(sd[k]).__name__})" for k in bad[:5])
        raise _unreadable(path, f"{len(bad)} entries are not name -> tensor, first: {shown}; expected a state dict")
    # Lightning checkpoints of a vlweak pretraining run prefix keys with "backbone.model.".
    for prefix in ("backbone.model.", "module.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def check_state_dict(model: torch.nn.Module, sd: dict[str, Tensor], source: str, limit: int = 5) -> None:
    """Raise :class:`CheckpointMismatchError` naming the first missing/unexpected/misshapen keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        lines = [f"checkpoint {source} does not fit this architecture:"]
        if shapes:
            lines.append(f"  {len(shapes)} shape mismatches, first: " + "; ".join(shapes[:limit]))
        if missing:
            lines.append(f"  {len(missing)} missing keys, first: " + ", ".join(missing[:limit]))
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys, first: " + ", ".join(unexpected[:limit]))
        raise CheckpointMismatchError("\n".join(lines))


class OpenCLIPBackbone(Backbone):
    """An open_clip model (any architecture open_clip knows, plus vlweak's registered ones).

    Args:
        model_name: open_clip architecture name, e.g. ``ViT-B-32``, ``RN50`` or vlweak's own
            ``vlweak-shapes`` (the small model shipped with the package) and ``vlweak-tiny``.
        pretrained: an open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``; downloaded to
            the open_clip cache on first use), ``vlweak-shapes`` for the shipped weights
            (``vlweak-shapes-noisy``: the variant pretrained on noisy captions), a local
            checkpoint file (``.safetensors``/``.pt``/``.bin``/Lightning ``.ckpt``), or ``None`` for
            random initialisation. OpenAI's weights need QuickGELU: with the ``openai`` tag it is
            used whatever the name; for a local copy name the ``-quickgelu`` architecture
            (``ViT-B-32-quickgelu``, ``RN50-quickgelu``).
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast.
        freeze: keep the encoders frozen.
        config_overrides: open_clip architecture entries to change before the model is built, merged
            one level deep, e.g. ``{"vision_cfg": {"pool_type": "tok"}}`` (part of the fingerprint).
        cache_dir: where open_clip downloads tagged weights.
        image_size: run the image tower at this input size instead of the architecture's (e.g. 448
            for DualCoOp's multi-label setting with RN101): the pretrained positional embeddings
            (ViT tokens, or a ResNet's attention pool) are resized to the new grid, bicubically, the
            class position kept. A multiple of the patch size (ViT) or of 32 (ResNet). The
            preprocessing transform follows it.
    """

    def __init__(
        self,
        model_name: str = "vlweak-shapes",
        pretrained: str | None = "vlweak-shapes",
        precision: Precision = "fp32",
        freeze: bool = True,
        config_overrides: dict[str, Any] | None = None,
        cache_dir: str | None = None,
        image_size: int | None = None,
    ) -> None:
        super().__init__(precision=precision, freeze=freeze)
        known = open_clip.list_models()
        if model_name not in known:
            close = difflib.get_close_matches(model_name, known, n=5, cutoff=0.5)
            hint = f" Close names: {', '.join(close)}." if close else ""
            if model_name in SHIPPED_ARCHITECTURE:  # a weights tag given as the architecture
                hint = (f" {model_name!r} names shipped weights: model_name: {SHIPPED_ARCHITECTURE[model_name]}, "
                        f"pretrained: {model_name}.")
            raise UnknownArchitectureError(f"unknown open_clip architecture {model_name!r}.{hint}")
        self.model_name = model_name
        self.pretrained = pretrained
        self.config_overrides = dict(config_overrides or {})
        self.input_size = self._check_image_size(image_size)
        build = dict(self.config_overrides)
        if image_size is not None:
            build["vision_cfg"] = {**build.get("vision_cfg", {}), "image_size": image_size}
        root_logger = logging.getLogger()
        level = root_logger.level
        root_logger.setLevel(logging.ERROR)  # open_clip warns about random init before we load weights
        if isinstance(pretrained, str) and pretrained.strip().lower() in ("", "none", "null"):
            pretrained = None  # a sweep tool or a script formatting None writes the text "None"
        # OpenAI's weights were trained with QuickGELU; the plain architecture names build GELU
        self.forced_quick_gelu = self._tag_needs_quick_gelu(pretrained)
        self._warn_if_openai_file_without_quick_gelu(pretrained)
        try:
            self.model = open_clip.create_model(
                model_name, pretrained=None, force_quick_gelu=self.forced_quick_gelu, **self._merged(build)
            )
        finally:
            root_logger.setLevel(level)
        self._weights_digest = "random-init"
        self.weights = self._load_weights(pretrained, cache_dir) if pretrained else "random-init"
        self._tokenizer = open_clip.get_tokenizer(model_name)
        self._finish_init()

    def _merged(self, overrides: dict[str, Any] | None) -> dict[str, Any]:
        """The top-level config entries to pass to ``open_clip.create_model`` for ``overrides``."""
        if not overrides:
            return {}
        base = open_clip.get_model_config(self.model_name) or {}
        unknown = sorted(set(overrides) - set(base))
        if unknown:
            raise ValueError(f"config_overrides names {unknown}, not in {self.model_name!r}'s config ({sorted(base)})")
        return {
            k: {**base[k], **v} if isinstance(base[k], dict) and isinstance(v, dict) else v
            for k, v in overrides.items()
        }

    def _check_image_size(self, image_size: int | None) -> int | None:
        vision = (open_clip.get_model_config(self.model_name) or {}).get("vision_cfg", {})
        step = vision.get("patch_size") or 32  # a ResNet tower downsamples by 32
        kind = f"patch size {step}" if vision.get("patch_size") else "ResNet stride 32"
        native = vision.get("image_size")
        native = native[0] if isinstance(native, (tuple, list)) else native
        return check_input_size(image_size, step, native, f"{self.model_name}'s {kind}")

    def _fit_positions(self, sd: dict[str, Tensor]) -> dict[str, Tensor]:
        """Resize the image tower's positional embeddings of ``sd`` to this model's grid (only when
        ``image_size`` asked for another size; a mismatch otherwise is the checkpoint's own)."""
        if self.input_size is None:
            return sd
        own = self.model.state_dict()
        out = dict(sd)
        for key in ("visual.positional_embedding", "visual.attnpool.positional_embedding"):
            if key in sd and key in own and sd[key].shape != own[key].shape:
                out[key] = resize_positions(sd[key], own[key].shape[0] - 1)
        return out

    # ------------------------------------------------------------------ weights
    def _tag_needs_quick_gelu(self, pretrained: str | None) -> bool:
        """Whether ``pretrained`` is an open_clip tag whose weights were trained with QuickGELU (OpenAI's)
        while ``model_name`` builds GELU. A local file cannot tell: name the ``-quickgelu`` architecture
        (e.g. ``ViT-B-32-quickgelu``) for a saved copy of OpenAI's weights."""
        if not pretrained or pretrained in SHIPPED_WEIGHTS or self.model_name.endswith("-quickgelu"):
            return False
        if pretrained not in open_clip.list_pretrained_tags_by_model(self.model_name):
            return False
        return bool(open_clip.get_pretrained_cfg(self.model_name, pretrained).get("quick_gelu", False))

    def _warn_if_openai_file_without_quick_gelu(self, pretrained: str | None) -> None:
        """A local file named like OpenAI's weights under a plain (GELU) architecture name: it runs
        without error on slightly wrong features, so say which name builds QuickGELU."""
        if (not pretrained or self.model_name.endswith("-quickgelu") or pretrained in SHIPPED_WEIGHTS
                or "openai" not in Path(str(pretrained)).name.lower() or not Path(str(pretrained)).expanduser().is_file()):
            return
        quick = f"{self.model_name}-quickgelu"
        if quick in open_clip.list_models():
            rank_zero_warn(
                f"{pretrained} looks like OpenAI's weights, which were trained with QuickGELU; {self.model_name} "
                f"builds GELU, which runs on slightly wrong features: model_name: {quick}",
                stacklevel=3,
            )

    def _load_weights(self, pretrained: str, cache_dir: str | None) -> str:
        """Load ``pretrained`` into the model; returns the name the weights go by (a file by its
        absolute path, which reads from any folder: provenance, artifacts)."""
        if pretrained in SHIPPED_WEIGHTS:
            path = SHIPPED_WEIGHTS[pretrained]
            arch = SHIPPED_ARCHITECTURE[pretrained]
            if self.model_name != arch:
                raise CheckpointMismatchError(
                    f"the shipped weights {pretrained!r} are for the {arch} architecture, not {self.model_name}: "
                    f"use model_name: {arch}"
                )
            if not path.is_file():
                raise WeightsUnavailableError(
                    f"the shipped weights {pretrained!r} are missing from the installation ({path}); "
                    "reinstall vlweak or retrain them with recipes/pretrain/shapes.yaml"
                )
            self._load_file(path)
        elif _is_local_path(pretrained) or Path(pretrained).expanduser().is_file():
            path = Path(pretrained).expanduser()
            self._load_file(path)
            return str(path.resolve())
        else:
            tags = open_clip.list_pretrained_tags_by_model(self.model_name)
            if pretrained not in tags and Path(pretrained).expanduser().is_dir():
                raise _directory_error(Path(pretrained).expanduser())  # a directory given by mistake
            if pretrained not in tags:
                import difflib

                known = [*tags, *(t for t, arch in SHIPPED_ARCHITECTURE.items() if arch == self.model_name)]
                near = difflib.get_close_matches(pretrained, known, n=1, cutoff=0.75)
                raise WeightsUnavailableError(
                    f"{pretrained!r} is neither a local file nor an open_clip pretrained tag of "
                    f"{self.model_name!r} (tags: {', '.join(tags) or 'none'}"
                    f"{'; shipped: ' + ', '.join(known[len(tags):]) if len(known) > len(tags) else ''})"
                    f"{f'; did you mean {near[0]!r}?' if near else ''}"
                )
            offline = False
            try:
                with hub_offline_when_unreachable() as offline:
                    url_model = open_clip.create_model(
                        self.model_name, pretrained=pretrained, cache_dir=cache_dir, force_quick_gelu=self.forced_quick_gelu
                    )
            except Exception as err:  # network / hub errors differ across versions
                arch = f" with `model_name: {self.model_name}-quickgelu` (these weights need QuickGELU)" if self.forced_quick_gelu else ""
                where = f" ({NO_NETWORK})" if offline else ""
                raise WeightsUnavailableError(
                    f"could not fetch open_clip weights {self.model_name}/{pretrained}{where} ({type(err).__name__}: "
                    f"{err}). Offline? Download them on a connected machine (open_clip.create_model("
                    f"'{self.model_name}', pretrained='{pretrained}') and save model.state_dict()), "
                    f"then pass the file: `pretrained: /path/to/weights.safetensors`{arch}."
                ) from err
            self.model.load_state_dict(self._fit_positions(url_model.state_dict()))
            self._weights_digest = f"tag:{pretrained}"
        return pretrained

    def _load_file(self, path: Path) -> None:
        sd = load_state_dict_file(path)
        scale = sd.get("logit_scale")
        if scale is not None and scale.numel() == 1:  # CLIPPretrain's Lightning checkpoints hold it as a vector
            sd["logit_scale"] = scale.reshape(self.model.logit_scale.shape)
        sd = self._fit_positions(sd)
        check_state_dict(self.model, sd, str(path))
        self.model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
        self._weights_digest = file_digest(path)

    def fingerprint_parts(self) -> dict[str, str]:
        parts = {"model": self.model_name, "weights": self._weights_digest}
        if self.forced_quick_gelu:
            parts["activation"] = "quick_gelu"
        if self.config_overrides:
            parts["config"] = json.dumps(self.config_overrides, sort_keys=True)
        if self.input_size is not None:
            parts["image_size"] = str(self.input_size)
        return parts

    # ------------------------------------------------------------------ properties
    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return tuple(getattr(self.model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)

    @property
    def image_std(self) -> tuple[float, float, float]:
        return tuple(getattr(self.model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[-1])

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp()

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    @property
    def visual_width(self) -> int:
        visual = self.model.visual
        if isinstance(visual, VisionTransformer):
            return int(visual.class_embedding.shape[-1])
        raise self._no_visual_prompts()

    def _no_visual_prompts(self) -> VisualPromptError:
        return VisualPromptError(
            f"visual prompt tokens go into a ViT image tower's token sequence; {self.model_name}'s tower is a "
            f"{type(self.model.visual).__name__}: use prompt: textual, or a ViT architecture"
        )

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: list[str]) -> Tensor:
        return self._tokenizer(texts)

    def token_embedding(self, token_ids: Tensor) -> Tensor:
        return self.model.token_embedding(token_ids.to(self.device))

    def encode_text_embeddings(self, embeddings: Tensor, token_ids: Tensor) -> Tensor:
        m = self.model
        x = embeddings + m.positional_embedding.to(embeddings.dtype)
        x = m.transformer(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)
        x = text_global_pool(x, token_ids.to(x.device), m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if isinstance(m.text_projection, torch.nn.Linear):
            return m.text_projection(x)
        return x @ m.text_projection

    # ------------------------------------------------------------------ image
    def encode_image_tokens(self, images: Tensor, prompts: Tensor | None = None) -> tuple[Tensor, Tensor]:
        visual = self.model.visual
        if isinstance(visual, VisionTransformer):
            return self._vit_tokens(visual, images, prompts)
        if isinstance(visual, ModifiedResNet):
            if prompts is not None:
                raise self._no_visual_prompts()
            return self._resnet_tokens(visual, images)
        raise BackboneError(
            f"region features (DualCoOp, visual prompts) read a ViT's patch tokens or a ModifiedResNet's attention "
            f"pool; {self.model_name}'s image tower is a {type(visual).__name__}: use a ViT or ResNet architecture"
        )

    def _encode_image(self, images: Tensor) -> Tensor:
        return self.model.encode_image(images)

    @staticmethod
    def _vit_tokens(visual: VisionTransformer, images: Tensor, prompts: Tensor | None) -> tuple[Tensor, Tensor]:
        x = visual._embeds(images)  # [B, 1 + HW, width], positional embeddings and ln_pre applied
        n_prompt = 0
        if prompts is not None:
            # ln_pre acts per token: normalising the prompts alone equals inserting them before it
            p = visual.ln_pre(prompts.to(x.dtype))
            p = p.expand(x.shape[0], -1, -1) if p.dim() == 2 else p
            n_prompt = p.shape[1]
            x = torch.cat([x[:, :1], p, x[:, 1:]], dim=1)
        x = visual.transformer(x)
        if n_prompt:
            x = torch.cat([x[:, :1], x[:, 1 + n_prompt :]], dim=1)
        if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
            pooled, _ = visual._pool(x)
            dense = visual.ln_post(x[:, 1:])
        else:
            x = visual.ln_post(x)
            pooled, dense = x[:, 0], x[:, 1:]
        if visual.proj is not None:
            pooled, dense = pooled @ visual.proj, dense @ visual.proj
        return pooled, dense

    @staticmethod
    def _resnet_tokens(visual: ModifiedResNet, images: Tensor) -> tuple[Tensor, Tensor]:
        """Global feature through the attention pool; every spatial position projected by the
        pool's value and output projections (the class-agnostic region features of DualCoOp), its
        positional embedding resized bicubically when the grid differs. Spatial positions only: the
        DualCoOp authors' code also passes the pool's mean token (the spatial mean at the class
        position) through the projections and scores it as one more region."""
        x = visual.stem(images.to(visual.conv1.weight.dtype))
        x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
        pooled = visual.attnpool(x)
        pool = visual.attnpool
        tokens = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        pos = pool.positional_embedding[1:].to(tokens.dtype)
        if pos.shape[0] != tokens.shape[1]:
            side = int(pos.shape[0] ** 0.5)
            h, w = x.shape[-2:]
            pos = F.interpolate(pos.T.reshape(1, -1, side, side), size=(h, w), mode="bicubic", align_corners=False)
            pos = pos.reshape(-1, h * w).T
        dense = pool.c_proj(pool.v_proj(tokens + pos))
        return pooled, dense


def resize_positions(pos: Tensor, n_grid: int) -> Tensor:
    """Positional embeddings ``[1 + g*g, D]`` (class position first) resized to ``[1 + n_grid, D]``:
    the square grid interpolated bicubically, the class position kept."""
    side, new_side = int(round((pos.shape[0] - 1) ** 0.5)), int(round(n_grid**0.5))
    if side * side != pos.shape[0] - 1 or new_side * new_side != n_grid:
        raise CheckpointMismatchError(
            f"positional embeddings of {pos.shape[0] - 1} (+1 class) positions cannot be resized to "
            f"{n_grid}: only square grids are"
        )
    grid = pos[1:].float().T.reshape(1, -1, side, side)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1].float(), grid.reshape(pos.shape[1], -1).T]).to(pos.dtype)
