"""CLIP-style contrastive pretraining of an open_clip architecture on image-caption data.

Symmetric InfoNCE (Radford et al. 2021): for a batch of ``B`` pairs, logits
``s * f_img @ f_txtᵀ`` with a learnable temperature ``s = exp(t)`` (clamped at 100), cross-entropy
over rows (image→text) and columns (text→image), averaged. Under DDP the features of all ranks are
gathered (with gradients) so every rank contrasts against the global batch.

Fully sharded training (``--trainer.strategy=fsdp`` on GPUs) works with the same recipe: the
temperature is held as a one-element vector (FSDP refuses scalar parameters), weight decay is
assigned by parameter name from the unsharded shapes (sharded views are flat), and the exported
weights are gathered through the strategy's full state dict, in open_clip's own layout.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from jsonargparse import lazy_instance
from torch import Tensor

from vlweak.backbones import Backbone, OpenCLIPBackbone
from vlweak.data.cache import atomic_save_tensors
from vlweak.distributed import gather_rows
from vlweak.methods.base import ResumedStepNumbers, StopsOnUnreadableEpochs, check_options, own_backbone


# prefixes that wrappers (nested FSDP units, activation checkpointing, torch.compile) put in parameter names
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _unwrapped_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE over matching rows of L2-normalized image and text features."""
    logits = logit_scale * image_features @ text_features.T
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class CLIPPretrain(ResumedStepNumbers, StopsOnUnreadableEpochs, L.LightningModule):
    """Contrastive image-text pretraining (symmetric InfoNCE, learnable temperature).

    Args:
        backbone: the open_clip model to train (``freeze: false``; ``pretrained: null`` for a
            random start, or a tag/file to continue from).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay (not applied to biases, norms, embeddings' gains or the temperature).
        warmup_steps: linear warm-up steps before the cosine decay.
        export_path: where to write the trained weights as safetensors when fitting ends (loadable
            with ``pretrained: <export_path>``); ``null`` writes ``backbone.safetensors`` into the
            run's own folder (:func:`vlweak.runs.run_folder`: every run of a W&B sweep its own).
        export_dtype: ``fp32``, ``fp16`` or ``bf16`` storage for the exported weights.
        classnames: set by the CLI from the data module (unused by pretraining).
        multilabel: set by the CLI from the data module (unused by pretraining).
    """

    def __init__(
        self,
        backbone: Backbone = lazy_instance(
            OpenCLIPBackbone, model_name="vlweak-shapes", pretrained=None, freeze=False
        ),
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        export_path: str | None = None,
        export_dtype: Literal["fp32", "fp16", "bf16"] = "fp32",
        classnames: list[str] | None = None,
        multilabel: bool = False,
    ) -> None:
        super().__init__()
        check_options(positive={"lr": lr}, weight_decay=(weight_decay, 0.0, None), warmup_steps=(warmup_steps, 0, None))
        if export_dtype not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"export_dtype must be fp32, fp16 or bf16, got {export_dtype!r}")
        if export_path and Path(export_path).expanduser().is_dir():
            raise ValueError(f"export_path {export_path} is a folder: give the weights file to write, e.g. "
                             f"{Path(export_path) / 'backbone.safetensors'}")
        backbone = own_backbone(backbone)
        if not isinstance(backbone, OpenCLIPBackbone):
            raise TypeError(
                f"CLIPPretrain trains open_clip models (it exports open_clip's layout, which `pretrained:` reads "
                f"back); got a {type(backbone).__name__}: use vlweak.backbones.OpenCLIPBackbone"
            )
        if backbone.freeze:
            raise ValueError("CLIPPretrain needs a trainable backbone: set backbone.init_args.freeze: false")
        self.backbone = backbone
        model = backbone.model
        if model.logit_scale.ndim == 0:  # FSDP cannot shard a scalar parameter; the export squeezes it back
            model.logit_scale = torch.nn.Parameter(model.logit_scale.detach().reshape(1))
        # CLIP's rule (no decay on vectors, the temperature, embeddings), fixed here by name: under FSDP
        # the optimizer is built after sharding, when every parameter is a flat view
        self._no_decay = {
            n for n, p in backbone.named_parameters() if p.ndim < 2 or "logit_scale" in n or "embedding" in n
        }
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.export_path, self.export_dtype = export_path, export_dtype
        self.save_hyperparameters(ignore=["backbone"])

    def _features(self, batch: dict) -> tuple[Tensor, Tensor, Tensor | None]:
        """Image and text features of the batch's pairs, and for a batch whose images were all
        skipped as unreadable (``{}``), none: then one blank pair runs through both encoders and is
        dropped, its zero-weighted sum returned as an anchor for the loss, so that every parameter
        takes part in the step as on the other ranks (DDP's and FSDP's gradient hooks)."""
        if batch:
            return self.backbone.encode_image(batch["image"]), self.backbone.encode_text(list(batch["caption"])), None
        size = self.backbone.image_size
        img = self.backbone.encode_image(torch.zeros(1, 3, size, size, device=self.device))
        txt = self.backbone.encode_text([""])
        return img[:0], txt[:0], (img.sum() + txt.sum()) * 0.0

    def _loss(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """The loss over the global batch and its features. Under several processes the ranks'
        pairs are gathered with their gradients; ranks that skipped unreadable images hold fewer
        pairs (or none) than the others. When no rank has a pair the loss is the zero anchor (the
        step still runs on every rank: Lightning cannot skip one under DDP)."""
        img, txt, anchor = self._features(batch)
        if self.trainer.world_size > 1:  # both in one gather: one exchange of the ranks' sizes
            pairs = gather_rows(self.trainer.strategy, torch.cat([img, txt], 1), sync_grads=True)
            img, txt = pairs.split(img.shape[1], 1)
        if len(img) == 0:
            return anchor, img, txt
        loss = clip_loss(img, txt, self.backbone.logit_scale)
        return (loss if anchor is None else loss + anchor), img, txt

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        if not batch and self.trainer.world_size == 1:
            return None  # every image skipped as unreadable: nothing to learn from
        loss, img, _ = self._loss(batch)
        if len(img):
            self.log("train/loss", loss, prog_bar=True, batch_size=len(img))
            self.log("train/logit_scale", self.backbone.logit_scale.squeeze(), batch_size=len(img))
        return loss

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.trainer.world_size > 1:
            # validation keeps one pair per sample index, so the sampler's padding is not scored twice
            warnings.filterwarnings("ignore", message=r"Using `DistributedSampler` with the dataloaders\. During `trainer\.validate\(\)`")

    def on_validation_epoch_start(self) -> None:
        self._validated: set[int] = set()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if not batch and self.trainer.world_size == 1:
            return
        if self.trainer.world_size > 1:
            # the global batch, less the pairs the distributed sampler repeats to even out the ranks
            img, txt, _ = self._features(batch)
            index = batch["index"].to(self.device) if batch else torch.empty(0, dtype=torch.long, device=self.device)
            pairs = gather_rows(self.trainer.strategy, torch.cat([img, txt], 1))
            keep = []  # the rows of pairs not validated before in this epoch (padding repeats earlier ones)
            for row, i in enumerate(gather_rows(self.trainer.strategy, index.long()).tolist()):
                if i not in self._validated:
                    self._validated.add(i)
                    keep.append(row)
            img, txt = pairs[keep].split(img.shape[1], 1)
            if len(img) == 0:
                return
            loss = clip_loss(img, txt, self.backbone.logit_scale)
        else:
            loss, img, txt = self._loss(batch)
        if len(img) == 0:
            return
        acc = ((img @ txt.T).argmax(1) == torch.arange(len(img), device=img.device)).float().mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(img))
        self.log("val/i2t_acc", acc, sync_dist=True, batch_size=len(img))

    def on_train_batch_end(self, *args) -> None:
        with torch.no_grad():  # CLIP clamps the temperature at 100
            self.backbone.model.logit_scale.clamp_(0, math.log(100))

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.backbone.named_parameters():
            if p.requires_grad:
                (no_decay if _unwrapped_name(name) in self._no_decay else decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
            betas=(0.9, 0.98),
            eps=1e-6,
        )
        total = max(1, self.trainer.estimated_stepping_batches)
        warm = min(self.warmup_steps, total // 2)

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / max(1, warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule), "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        sd = checkpoint.get("state_dict", {})
        key = "backbone.model.logit_scale"
        if key in sd and sd[key].ndim == 0:  # a checkpoint written before the temperature became a vector
            sd[key] = sd[key].reshape(1)

    def on_fit_end(self) -> None:
        # collectives on every rank: trainer.log_dir broadcasts under DDP, and the strategy's state dict
        # gathers the shards under FSDP (onto rank 0); then rank 0 alone writes
        from vlweak.runs import run_folder

        path = Path(self.export_path) if self.export_path else run_folder(self.trainer) / "backbone.safetensors"
        full = self.trainer.strategy.lightning_module_state_dict()
        if self.trainer.global_rank != 0:
            return
        prefix = "backbone.model."
        sd = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        sd["logit_scale"] = sd["logit_scale"].reshape(())  # open_clip's layout
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.export_dtype]
        sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
        atomic_save_tensors(sd, path, {"model_name": self.backbone.model_name, "format": "open_clip"})
        print(f"exported backbone weights to {path}")
