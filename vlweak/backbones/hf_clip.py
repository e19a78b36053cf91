"""Hugging Face transformers CLIP models behind the :class:`~vlweak.backbones.base.Backbone` interface."""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from pathlib import Path

import open_clip
import torch
from torch import Tensor
from transformers import AutoConfig, AutoTokenizer, CLIPImageProcessor, CLIPModel
from transformers.utils import logging as transformers_logging

from vlweak.backbones.base import NO_NETWORK, Backbone, Precision, check_input_size, file_digest, hub_unreachable
from vlweak.backbones.errors import CheckpointMismatchError, WeightsUnavailableError
from vlweak.progress import bars_shown

try:  # transformers >= 4.53 builds attention masks through masking_utils (what CLIPTextModel itself uses)
    from transformers.masking_utils import create_causal_mask

    # its cache argument was renamed (``past_key_values`` -> ``cache``; the old name goes in 5.40)
    _NO_CACHE = {"cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values": None}
except ImportError:  # pragma: no cover - older transformers
    create_causal_mask = None
    _NO_CACHE = {}

log = logging.getLogger(__name__)

#: Files whose content identifies a saved model directory (weights, plus the config that shapes them).
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
_SAVE_HINT = (
    "save one on a connected machine with `CLIPModel.from_pretrained(hub_id).save_pretrained(dir)`, "
    "`AutoTokenizer.from_pretrained(hub_id).save_pretrained(dir)` and "
    "`CLIPImageProcessor.from_pretrained(hub_id).save_pretrained(dir)`, then pass `model_id: /path/to/dir`"
)
#: A saved tokenizer is one of these file sets (fast tokenizer.json, or the BPE vocabulary and merges).
_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
_TRUTHY = {"1", "true", "yes", "on"}


def _looks_like_path(model_id: str) -> bool:
    """Whether ``model_id`` can only be a filesystem path (hub ids are ``name`` or ``owner/name``)."""
    return (
        model_id.startswith(("/", "./", "../", "~", "."))
        or (os.sep != "/" and os.sep in model_id)
        or model_id.count("/") > 1
        or model_id.endswith("/")
    )


def _env_offline() -> bool:
    """``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` read now (huggingface_hub reads them once, at import)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUTHY for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _dir_digest(directory: Path) -> str:
    """Digest of a saved model directory: its config and weight files (names and contents)."""
    files = {p for pattern in _WEIGHT_PATTERNS for p in directory.glob(pattern)}
    if (directory / "config.json").is_file():
        files.add(directory / "config.json")
    h = hashlib.sha256()
    for p in sorted(files):
        h.update(f"{p.name}={file_digest(p)};".encode())
    return h.hexdigest()[:16]


def _hub_revision(model_id: str, cache_dir: str | None) -> str:
    """Commit hash of the cached hub snapshot (``.../snapshots/<commit>/config.json``), if known."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_id, "config.json", cache_dir=cache_dir)
    except Exception:  # noqa: BLE001 - provenance only; never fail a load over it
        return "unknown-revision"
    return Path(cached).parent.name if isinstance(cached, str) else "unknown-revision"


class HFCLIPBackbone(Backbone):
    """A Hugging Face transformers ``CLIPModel`` (ViT image tower).

    Args:
        model_id: a Hugging Face hub id (``openai/clip-vit-base-patch32``; downloaded to the hub
            cache on first use) or a local directory holding a ``CLIPModel.save_pretrained``
            checkpoint together with the tokenizer (and, optionally, the image processor) saved
            with ``save_pretrained``.
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast.
        freeze: keep the encoders frozen.
        cache_dir: hub cache directory (default: the Hugging Face cache).
        local_files_only: never touch the network; only the hub cache or a local directory. Also
            implied by ``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1``.
        image_size: run the image tower at this input size instead of the config's: the position
            embeddings are interpolated to the new patch grid (bicubic, class position kept). A
            multiple of the patch size; the preprocessing transform follows it.

    Raises:
        FileNotFoundError: ``model_id`` is a path that does not exist, or a directory lacking the
            config, weights or tokenizer.
        WeightsUnavailableError: a hub id that cannot be fetched (offline, unknown id).
        CheckpointMismatchError: the directory holds no CLIP model, or its weights do not fit its
            config (the first missing / misshapen keys are named).
    """

    def __init__(
        self,
        model_id: str = "openai/clip-vit-base-patch32",
        precision: Precision = "fp32",
        freeze: bool = True,
        cache_dir: str | None = None,
        local_files_only: bool = False,
        image_size: int | None = None,
    ) -> None:
        super().__init__(precision=precision, freeze=freeze)
        self.model_id = model_id
        self.cache_dir = cache_dir
        self.local_files_only = local_files_only or _env_offline()
        local = Path(model_id).expanduser()
        self._local_dir: Path | None = None
        self._no_network = False
        if local.exists() or _looks_like_path(model_id):
            self._local_dir = self._check_local_dir(local)
        elif not self.local_files_only and hub_unreachable():
            # The hub's cache only: hub requests on a machine without network retry for a minute.
            self.local_files_only = self._no_network = True
        source = str(self._local_dir) if self._local_dir is not None else model_id

        config = self._load_config(source)
        self.model = self._load_model(source, config)
        patch = int(config.vision_config.patch_size)
        self.input_size = check_input_size(
            image_size, patch, int(config.vision_config.image_size), f"{model_id}'s patch size {patch}"
        )
        self._tokenizer = self._load_tokenizer(source)
        self._processor_cfg = self._load_processor_config(source)
        if self._local_dir is not None:
            self._weights_digest = _dir_digest(self._local_dir)
        else:
            self._weights_digest = f"hub:{_hub_revision(model_id, cache_dir)}"
        self.weights = str(self._local_dir.resolve()) if self._local_dir is not None else model_id  # a path that reads anywhere
        self._finish_init()

    # ------------------------------------------------------------------ loading
    @staticmethod
    def _check_local_dir(path: Path) -> Path:
        if not path.exists():
            raise FileNotFoundError(f"model directory not found: {path}")
        if not path.is_dir():
            raise FileNotFoundError(
                f"{path} is a file; HFCLIPBackbone needs a directory saved with `save_pretrained` "
                "(for a single checkpoint file use OpenCLIPBackbone with `pretrained: /path/to/file`)"
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in model directory {path}; {_SAVE_HINT}")
        if not any(any(path.glob(p)) for p in _WEIGHT_PATTERNS):
            raise FileNotFoundError(
                f"no weight files (*.safetensors / *.bin) in model directory {path}; {_SAVE_HINT}"
            )
        return path

    def _unavailable(self, what: str, err: Exception) -> WeightsUnavailableError:
        offline = (
            f" ({NO_NETWORK})"
            if self._no_network
            else " (offline mode)" if self.local_files_only else ""
        )
        return WeightsUnavailableError(
            f"could not fetch the {what} of {self.model_id!r} from the Hugging Face hub{offline} "
            f"({type(err).__name__}: {err}). It is not a local directory either. Offline? {_SAVE_HINT}."
        )

    def _hub_kwargs(self) -> dict:
        return {"cache_dir": self.cache_dir, "local_files_only": self.local_files_only}

    def _load_config(self, source: str):
        try:
            config = AutoConfig.from_pretrained(source, **self._hub_kwargs())
        except Exception as err:  # hub / network errors differ across versions
            if self._local_dir is not None:
                raise CheckpointMismatchError(f"cannot read config.json of {source}: {err}") from err
            raise self._unavailable("config", err) from err
        if config.model_type != "clip":
            raise CheckpointMismatchError(
                f"{source} holds a {config.model_type!r} model ({type(config).__name__}); HFCLIPBackbone "
                "loads CLIP models (model_type 'clip', saved from CLIPModel)"
            )
        return config

    def _load_model(self, source: str, config) -> CLIPModel:
        bars = transformers_logging.is_progress_bar_enabled()
        if not bars_shown():  # transformers' "Loading weights" bar, hidden with vlweak's own
            transformers_logging.disable_progress_bar()
        try:
            model, info = CLIPModel.from_pretrained(
                source,
                config=config,
                dtype=torch.float32,
                ignore_mismatched_sizes=True,  # report mismatches ourselves, naming them
                output_loading_info=True,
                **self._hub_kwargs(),
            )
        except Exception as err:
            if self._local_dir is not None:
                raise CheckpointMismatchError(f"cannot load the weights in {source}: {err}") from err
            raise self._unavailable("weights", err) from err
        finally:
            if bars:
                transformers_logging.enable_progress_bar()
        self._check_loading_info(info, source)
        return model

    @staticmethod
    def _check_loading_info(info: dict, source: str, limit: int = 5) -> None:
        """Raise :class:`CheckpointMismatchError` naming the first missing / misshapen keys."""
        missing = sorted(info.get("missing_keys") or [])
        mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: m[0])
        unexpected = sorted(k for k in info.get("unexpected_keys") or [] if not k.endswith("position_ids"))
        errors = list(info.get("error_msgs") or [])
        if not (missing or mismatched or errors):
            if unexpected:
                log.warning("%s has %d weights CLIPModel does not use, first: %s", source, len(unexpected),
                            ", ".join(unexpected[:limit]))
            return
        lines = [f"weights in {source} do not fit its CLIP config:"]
        if mismatched:
            shapes = [f"{k}: checkpoint {tuple(ck)} vs model {tuple(mod)}" for k, ck, mod in mismatched]
            lines.append(f"  {len(shapes)} shape mismatches, first: " + "; ".join(shapes[:limit]))
        if missing:
            lines.append(f"  {len(missing)} missing keys, first: " + ", ".join(missing[:limit]))
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys, first: " + ", ".join(unexpected[:limit]))
        if errors:
            lines.append("  " + "; ".join(errors[:limit]))
        raise CheckpointMismatchError("\n".join(lines))

    def _load_tokenizer(self, source: str):
        if self._local_dir is not None and not any(
            all((self._local_dir / f).is_file() for f in files) for files in _TOKENIZER_FILES
        ):
            # AutoTokenizer would silently build an empty tokenizer from config.json alone.
            raise FileNotFoundError(
                f"no tokenizer (tokenizer.json, or vocab.json + merges.txt) in model directory {source}; {_SAVE_HINT}"
            )
        try:
            return AutoTokenizer.from_pretrained(source, **self._hub_kwargs())
        except Exception as err:
            if self._local_dir is not None:
                raise FileNotFoundError(
                    f"no usable tokenizer in model directory {source} ({type(err).__name__}: {err}); {_SAVE_HINT}"
                ) from err
            raise self._unavailable("tokenizer", err) from err

    def _load_processor_config(self, source: str) -> dict:
        """``preprocessor_config.json`` as a dict; ``{}`` (OpenAI statistics) when there is none."""
        try:
            cfg, _ = CLIPImageProcessor.get_image_processor_dict(source, **self._hub_kwargs())
            return cfg
        except Exception as err:  # noqa: BLE001 - optional file
            log.info("no image processor config for %s (%s); using OpenAI mean/std", source, err)
            return {}

    def fingerprint_parts(self) -> dict[str, str]:
        model = self._local_dir.name if self._local_dir is not None else self.model_id
        parts = {"model": model, "weights": self._weights_digest}
        if self.input_size is not None:
            parts["image_size"] = str(self.input_size)
        return parts

    # ------------------------------------------------------------------ properties
    @property
    def image_size(self) -> int:
        # The vision config's, unless image_size asked for another (positions interpolated to it).
        return self.input_size or int(self.model.config.vision_config.image_size)

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self._processor_cfg.get("image_mean") or open_clip.OPENAI_DATASET_MEAN)

    @property
    def image_std(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self._processor_cfg.get("image_std") or open_clip.OPENAI_DATASET_STD)

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.out_features)

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp()

    @property
    def context_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    @property
    def visual_width(self) -> int:
        return int(self.model.config.vision_config.hidden_size)

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: list[str]) -> Tensor:
        if isinstance(texts, str):
            texts = [texts]
        enc = self._tokenizer(
            list(texts), padding="max_length", max_length=self.context_length, truncation=True, return_tensors="pt"
        )
        return enc["input_ids"]

    def token_embedding(self, token_ids: Tensor) -> Tensor:
        return self.model.text_model.embeddings.token_embedding(token_ids.to(self.device))

    def eot_positions(self, token_ids: Tensor) -> Tensor:
        """Where ``CLIPTextModel.forward`` pools: the highest id for legacy configs (``eos_token_id ==
        2``), else the first occurrence of ``eos_token_id`` (padding may reuse the EOS id)."""
        ids = token_ids.to(torch.int)
        eos = self.model.text_model.eos_token_id
        if eos == 2:
            return ids.argmax(dim=-1)
        return (ids == eos).int().argmax(dim=-1)

    def encode_text_embeddings(self, embeddings: Tensor, token_ids: Tensor) -> Tensor:
        tm = self.model.text_model
        if embeddings.shape[:2] != token_ids.shape:
            raise ValueError(
                f"embeddings {tuple(embeddings.shape)} and token_ids {tuple(token_ids.shape)} must agree on [n, L]"
            )
        x = tm.embeddings(inputs_embeds=embeddings)  # + position embeddings
        if create_causal_mask is not None:
            mask = create_causal_mask(config=tm.config, inputs_embeds=x, attention_mask=None, **_NO_CACHE)
        else:  # pragma: no cover - older transformers: additive 4D mask
            L = x.shape[1]
            mask = torch.full((L, L), torch.finfo(x.dtype).min, device=x.device, dtype=x.dtype).triu(1)
            mask = mask[None, None].expand(x.shape[0], 1, L, L)
        x = tm.encoder(inputs_embeds=x, attention_mask=mask, is_causal=True).last_hidden_state
        x = tm.final_layer_norm(x)
        pos = self.eot_positions(token_ids.to(x.device))
        pooled = x[torch.arange(x.shape[0], device=x.device), pos]
        return self.model.text_projection(pooled)

    # ------------------------------------------------------------------ image
    def _vision_hidden(self, images: Tensor, prompts: Tensor | None) -> Tensor:
        """Encoder output ``[B, 1 + HW, width]`` (prompt tokens removed), before ``post_layernorm``."""
        vm = self.model.vision_model
        x = vm.pre_layrnorm(vm.embeddings(images, interpolate_pos_encoding=self.input_size is not None))
        n_prompt = 0
        if prompts is not None:
            if prompts.dim() not in (2, 3) or prompts.shape[-1] != self.visual_width:
                raise ValueError(
                    f"visual prompts must be [P, {self.visual_width}] or [B, P, {self.visual_width}], "
                    f"got {tuple(prompts.shape)}"
                )
            # pre_layrnorm acts per token: normalising the prompts alone equals inserting them before it
            p = vm.pre_layrnorm(prompts.to(device=x.device, dtype=x.dtype))
            p = p.expand(x.shape[0], -1, -1) if p.dim() == 2 else p
            if p.shape[0] != x.shape[0]:
                raise ValueError(f"visual prompts for {p.shape[0]} images given a batch of {x.shape[0]}")
            n_prompt = p.shape[1]
            x = torch.cat([x[:, :1], p, x[:, 1:]], dim=1)
        x = vm.encoder(inputs_embeds=x).last_hidden_state
        if n_prompt:
            x = torch.cat([x[:, :1], x[:, 1 + n_prompt :]], dim=1)
        return x

    def encode_image_tokens(self, images: Tensor, prompts: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = self.model.vision_model.post_layernorm(self._vision_hidden(images, prompts))
        x = self.model.visual_projection(x)
        return x[:, 0], x[:, 1:]

    def _encode_image(self, images: Tensor) -> Tensor:
        x = self._vision_hidden(images, None)[:, 0]
        return self.model.visual_projection(self.model.vision_model.post_layernorm(x))
