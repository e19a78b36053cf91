"""Pseudolabel prompt tuning (Menghini et al. 2023, *Enhancing CLIP with CLIP*).

A frozen CLIP model, a learnable prompt, and one loss for every learning paradigm: cross-entropy
over the labeled samples and the pseudolabeled unlabeled samples,

    L = Σ_{(x, y) ∈ X_L ∪ X̃_U} CE(s · f(x) · g(C)ᵀ, y),        s = logit_scale,

where ``f`` is the (optionally visually prompted) image encoder, ``g`` the (optionally textually
prompted) text encoder over the class names, and ``X̃_U`` the class-balanced top-K pseudolabels
(:mod:`vlweak.labels.selection`), every sample weighing the same (a batch's mean). The paper's
public code for textual prompts weighs the means of a batch's labeled and pseudolabeled samples
by the two sets' sizes: for IFPL and GRIP in the semi-supervised setting that is the same
per-sample weighting, up to a factor near 1; for FPL there, and for every strategy in the
transductive setting, it weighs a labeled sample ``(|X̃_U| / |X_L|)²`` times a pseudolabeled one.

The paradigms are data settings of the data module:

* semi-supervised: ``shots`` labels per class, the rest of the train split unlabeled;
* transductive zero-shot: ``seen_classes`` labeled, the unseen classes' images unlabeled and
  pseudolabeled among the unseen classes only; test reports seen / unseen accuracy and their
  harmonic mean;
* unsupervised: ``shots: 0``.

Prompt types: ``textual`` (CoOp's context and prompt, ``X … X name.``; the paper's code leaves out the
period, which moves the end-of-text token by one; :class:`~vlweak.prompts.TextPromptLearner`), ``visual``
(tokens in the image encoder's input, :class:`~vlweak.prompts.VisualPromptLearner`, text side the
hand-written template classifier), ``multimodal`` (both, trained jointly as two independent sets of
tokens; the paper's multimodal prompts follow UPT, which generates both from one shared set through
a small transformer, so the numbers of the two are not interchangeable). Strategies (FPL, IFPL,
GRIP) run as rounds inside one fit (:class:`~vlweak.callbacks.PseudolabelRounds`), each round
retraining the prompt from scratch. Round 0's pseudolabels come from zero-shot CLIP or from any saved
pseudolabel artifact (CHiLS, ZLaP, ...), aligned by sample id.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Subset

from vlweak.backbones import Backbone
from vlweak.callbacks.pseudolabel_rounds import PseudolabelRounds
from vlweak.data.datamodule import FeatureDataset
from vlweak.data.datasets import SampleIndices
from vlweak.labels.artifact import ArtifactError, PseudoLabels
from vlweak.labels.selection import STRATEGIES, Strategy
from vlweak.methods.base import DEFAULT_BACKBONE, VLMethod, check_options
from vlweak.metrics import multiclass_report
from vlweak.prompts import TextPromptLearner, VisualPromptLearner, text_classifier
from vlweak.prompts.learners import Position

PromptType = Literal["textual", "visual", "multimodal"]
PROMPT_TYPES = get_args(PromptType)


class PromptTuning(VLMethod):
    """Prompt tuning on CLIP pseudolabels: FPL, IFPL and GRIP (Menghini et al. 2023).

    Args:
        backbone: the frozen CLIP-family model (default: the shipped ``vlweak-shapes`` model).
        classnames: class vocabulary; set by the CLI from the data module.
        multilabel: set by the CLI from the data module; must be false (single-label method).
        prompt: ``textual`` (CoOp context), ``visual`` (visual prompt tokens; needs a ViT image
            tower and images, not ``embeddings: true``) or ``multimodal`` (both, as independent
            tokens trained jointly, not UPT's shared generator).
        strategy: ``fpl`` (one round, fixed K), ``ifpl`` (``rounds`` rounds, fixed K) or ``grip``
            (``rounds`` rounds, K growing until the unlabeled pool is covered).
        k: pseudolabels per class of FPL and IFPL (paper: 16).
        rounds: rounds of IFPL and GRIP (paper: 10).
        pseudolabels: source of the first round's pseudolabels: ``zeroshot`` (computed here with
            ``templates``) or the path of a saved pseudolabel artifact over the train split (e.g.
            from ZLaP or CHiLS; aligned by sample id, same class vocabulary).
        templates: prompt templates of the zero-shot classifier (``simple``, ``imagenet80``, a list or a file; see :class:`~vlweak.methods.ZeroShot`).
        n_ctx: textual context length (paper: 16).
        ctx_init: phrase initialising the textual context (``null``: N(0, 0.02), as in the paper).
        class_specific: one textual context per class instead of a shared one.
        position: where the class name sits in the textual prompt: ``end`` (after the context, as
            in the paper), ``middle`` or ``front`` (CoOp's class token position).
        n_visual_tokens: visual prompt tokens (paper: 16).
        visual_init_std: standard deviation of the visual tokens' normal initialisation; ``null``:
            ``width ** -0.5`` of the image tower, as the paper's public code draws them. The tokens
            pass the tower's pre-transformer norm, so the scale sets how far an SGD step moves them
            relative to their size (it acts like a learning-rate factor of ``scale⁻²``).
        epochs_per_round: training epochs of each round (paper: 150).
        lr: SGD learning rate (paper: 0.1 for textual and visual prompts, 0.01 for multimodal).
        momentum: SGD momentum (paper: 0.9).
        weight_decay: SGD weight decay (paper: 0.1).
        warmup_epochs: warm-up epochs before the cosine decay of each round (paper: 5).
        warmup_lr: learning rate of constant warm-up epochs (the paper's configuration: 1e-4).
        warmup: ``constant`` (``warmup_lr`` in every warm-up epoch) or ``linear`` (``lr · e /
            warmup_epochs`` in warm-up epoch ``e``, from 0 up: what the paper's public code runs,
            its cosine schedule leaving the configured 1e-4 unused).
        cache_features: textual prompts only: image features never change, so the train pool is
            encoded once per run and training steps read those features instead of loading and
            encoding images again. Not used when the data module augments the train split
            (``augment``): each step then encodes its augmented images.
        rounds_dir: folder of the per-round checkpoints; a run started with the same folder resumes
            at the round it was in. Default: ``<logger save_dir>/<logger name>/rounds/<hash>``, the
            hash of the run's identity (labeled set, source, schedule, hyper-parameters, batch size, devices, precision), so rerunning
            the same configuration resumes and any other configuration starts afresh. A fit given
            a Lightning checkpoint (``--ckpt_path``) continues at the step it was written and reads
            its round's training set from here.
        resume: resume from ``rounds_dir`` when it holds round checkpoints of the same run.
        holdout: fraction of each round's training set (labels and pseudolabels alike) held out to
            choose the round's prompt: the epoch with the best accuracy on the held-out labels, the
            latest of equals; ``0``: train on all of it and keep each round's last epoch. (The
            paper's public code holds out 20% of the labeled images, only logs the accuracy there,
            and keeps the last epoch.)
        warm_start: IFPL / GRIP rounds after the first start from the previous round's prompt
            instead of a fresh initialisation (the learning-rate schedule and the optimizer state
            still restart each round). The paper re-initialises every round; its public code in
            effect continues textual prompts (the new parameter shares the storage of the
            initial context, which training overwrote). On the built-in world continuing does worse
            than a fresh start (README).
        seed: seed of each round's prompt initialisation and data order (round ``r`` uses
            ``seed + r``), so a resumed run repeats what an uninterrupted one does.
        artifact_path: where test/predict write the pseudolabel artifact (default
            ``<log dir>/pseudolabels-<stage>.safetensors``); a folder (an existing one, or a path ending in
            ``/``) holds ``pseudolabels-<stage>.safetensors``; ``""`` writes none.
    """

    classnames_at_construction = True

    def __init__(
        self,
        backbone: Backbone = DEFAULT_BACKBONE,
        classnames: list[str] | None = None,
        multilabel: bool = False,
        prompt: PromptType = "textual",
        strategy: Strategy = "grip",
        k: int = 16,
        rounds: int = 10,
        pseudolabels: str = "zeroshot",
        templates: str | list[str] = "simple",
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_specific: bool = False,
        position: Position = "end",
        n_visual_tokens: int = 16,
        visual_init_std: float | None = None,
        epochs_per_round: int = 150,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.1,
        warmup_epochs: int = 5,
        warmup_lr: float = 1e-4,
        warmup: Literal["constant", "linear"] = "constant",
        cache_features: bool = True,
        rounds_dir: str | None = None,
        resume: bool = True,
        holdout: float = 0.2,
        warm_start: bool = False,
        seed: int = 0,
        artifact_path: str | None = None,
    ) -> None:
        super().__init__(backbone, classnames, multilabel, artifact_path)
        if multilabel:
            raise ValueError("PromptTuning is single-label: use a single-label data module (multilabel: false)")
        if prompt not in PROMPT_TYPES:
            raise ValueError(f"prompt must be one of {PROMPT_TYPES}, got {prompt!r}")
        strategy = strategy.lower()
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be fpl, ifpl or grip, got {strategy!r}")
        if epochs_per_round < 1:
            raise ValueError(f"epochs_per_round must be >= 1, got {epochs_per_round}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if k < 0 or rounds < 1:
            raise ValueError(f"need k >= 0 and rounds >= 1; got k={k}, rounds={rounds}")
        if warmup_epochs >= epochs_per_round:
            raise ValueError(
                f"warmup_epochs ({warmup_epochs}) must be below epochs_per_round ({epochs_per_round}): "
                "every epoch of a round would train at warmup_lr"
            )
        check_options(templates=templates, n_ctx=(n_ctx, 1, None), momentum=(momentum, 0.0, 1.0), positive={"lr": lr},
                      weight_decay=(weight_decay, 0.0, None), warmup_lr=(warmup_lr, 0.0, None))
        if warmup not in ("constant", "linear"):
            raise ValueError(f"warmup must be 'constant' or 'linear', got {warmup!r}")
        if not 0.0 <= holdout < 1.0:
            raise ValueError(f"holdout is the fraction of a round's training set held out, in [0, 1); got {holdout}")
        if isinstance(pseudolabels, PseudoLabels):
            raise TypeError("pseudolabels takes 'zeroshot' or the path of a saved artifact (the run's identity and "
                            "checkpoints name it): save it first, e.g. pl.save('pseudolabels.safetensors')")
        if pseudolabels != "zeroshot":
            # an artifact present now is checked now (vocabulary, damage), not after the pool is read; a
            # missing .safetensors may be written before fit (test / predict never read it)
            if Path(pseudolabels).exists():
                PseudoLabels.load(pseudolabels, classnames or None)
            elif not pseudolabels.endswith(".safetensors"):
                raise ValueError(f"pseudolabels must be 'zeroshot' or the path of a pseudolabel artifact (.safetensors); {pseudolabels!r} is neither")
        self.save_hyperparameters(ignore=["backbone"])
        self.prompt_type, self.strategy, self.k, self.rounds = prompt, strategy, k, rounds
        self.pseudolabels, self.templates = pseudolabels, templates
        self.epochs_per_round, self.lr, self.momentum, self.weight_decay = epochs_per_round, lr, momentum, weight_decay
        self.warmup_epochs, self.warmup_lr, self.warmup = warmup_epochs, warmup_lr, warmup
        self.cache_features, self.rounds_dir, self.resume, self.seed = cache_features, rounds_dir, resume, seed
        self.warm_start, self.holdout = warm_start, holdout
        self._held: tuple[Tensor, Tensor] | None = None  # (indices, labels) held out this round
        self._best: tuple[float, dict[str, Tensor]] | None = None  # best held-out accuracy, its prompt
        names = self.require_classnames()
        self.text_prompt = (
            TextPromptLearner(self.backbone, names, n_ctx, ctx_init, class_specific, position) if prompt != "visual" else None
        )
        if prompt != "textual":
            self.visual_prompt = VisualPromptLearner(self.backbone.visual_width, n_visual_tokens, visual_init_std)
        else:
            self.visual_prompt = None
        self._phrase_init = (
            {n: p.detach().clone() for n, p in self.prompt_parameters() if n.startswith("text.")} if ctx_init else {}
        )
        self.register_buffer("classifier", torch.empty(0), persistent=False)
        self.pool_index = torch.empty(0, dtype=torch.long)
        self.pool_label = torch.empty(0, dtype=torch.long)
        self.pool_truth: Tensor | None = None
        self.pseudolabel_classes: list[int] = list(range(len(names)))
        self.seen_classes: list[int] | None = None
        self._pool_features: Tensor | None = None
        self._feature_row: Tensor | None = None
        self._train_target = torch.empty(0, dtype=torch.long)
        self._pool_dataset: Any = None
        self._scan_dataset: Any = None
        self._eval_classes: Tensor | None = None

    # ---------------------------------------------------------------- prompts
    def trains_per_class(self) -> bool:
        return getattr(self, "text_prompt", None) is not None and self.text_prompt.class_specific

    def prompt_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        out = []
        if self.text_prompt is not None:
            out += [(f"text.{n}", p) for n, p in self.text_prompt.named_parameters()]
        if self.visual_prompt is not None:
            out += [(f"visual.{n}", p) for n, p in self.visual_prompt.named_parameters()]
        return out

    def round_hyperparameters(self) -> dict[str, Any]:
        """What a round's training depends on beyond the data: the backbone and every training
        hyper-parameter (part of a run's identity; a resumed run must match it)."""
        skip = ("classnames", "multilabel", "rounds_dir", "resume", "artifact_path", "cache_features", "pseudolabels",
                "warm_start", "holdout", "position", "warmup", "visual_init_std")
        out = {k: v for k, v in self.hparams.items() if k not in skip}
        out["backbone"] = self.backbone.fingerprint()
        # named only when set, so runs from before these options keep their identity
        if self.warm_start:
            out["warm_start"] = True
        if self.holdout:
            out["holdout"] = self.holdout
        if self.hparams.get("position", "end") != "end":
            out["position"] = self.hparams["position"]
        if self.hparams.get("warmup", "constant") != "constant":
            out["warmup"] = self.hparams["warmup"]
        if self.train_augment is not None:
            out["augment"] = self.train_augment
        if self.visual_prompt is not None and self.visual_prompt.init_std != 0.02:  # 0.02: the scale before the option
            out["visual_init_std"] = self.visual_prompt.init_std  # resolved: the width^-0.5 default is named too
        return out

    def prompt_state(self) -> dict[str, Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.prompt_parameters()}

    def load_prompt_state(self, state: dict[str, Tensor]) -> None:
        params = dict(self.prompt_parameters())
        if set(state) != set(params):
            raise ValueError(f"prompt state has {sorted(state)}, this prompt has {sorted(params)}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n].to(p.device, p.dtype))

    def reset_prompts(self, generator: torch.Generator) -> None:
        """Re-initialise every prompt parameter as the learners do: a phrase's embeddings, or normal
        draws (textual contexts N(0, 0.02), visual tokens the learner's ``init_std``)."""
        with torch.no_grad():
            for n, p in self.prompt_parameters():
                if n in self._phrase_init:
                    p.copy_(self._phrase_init[n])
                else:
                    std = self.visual_prompt.init_std if n.startswith("visual.") else 0.02
                    p.copy_(torch.randn(p.shape, generator=generator) * std)

    def zero_shot_classifier(self) -> Tensor:
        if self.classifier.numel() == 0:
            self.classifier = text_classifier(self.backbone, self.require_classnames(), self.templates).to(self.device)
        return self.classifier

    def class_features(self) -> Tensor:
        """Unit-norm class embeddings ``[C, D]``: the prompted text tower, or the template classifier."""
        return self.text_prompt() if self.text_prompt is not None else self.zero_shot_classifier()

    def encode_images(self, images: Tensor, prompted: bool = True) -> Tensor:
        """Unit-norm image features, through the visual prompt when there is one."""
        if self.visual_prompt is None or not prompted:
            return self.backbone.encode_image(images)
        with self.backbone.autocast():
            pooled, _ = self.backbone.encode_image_tokens(images.to(self.device), self.visual_prompt())
        return F.normalize(pooled.float(), dim=-1)

    def batch_features(self, batch: dict[str, Any], train: bool = False) -> Tensor:
        if self.visual_prompt is None:
            if "features" in batch:
                return F.normalize(batch["features"].float(), dim=-1)
            if train and self._trains_on_pool_features():
                # the batch's rows, picked where the pool lies, then moved (never the whole pool per step)
                rows = self._feature_row[batch["index"].to(self._feature_row.device)]
                return self._pool_features[rows.to(self._pool_features.device)].to(self.device, non_blocking=True)
            return self.backbone.encode_image(batch["image"])
        if "image" not in batch:
            raise ValueError(f"{self.prompt_type} prompts need images: set data.init_args.embeddings: false")
        return self.encode_images(batch["image"])

    def logits(self, image_features: Tensor, class_features: Tensor) -> Tensor:
        return self.backbone.logit_scale * image_features @ class_features.T

    def forward(self, images: Tensor) -> Tensor:
        """Class probabilities ``[B, C]`` of a batch of preprocessed images, through the current
        prompts (``model(images)`` after a fit, in a notebook)."""
        return self.logits(self.encode_images(images), self.class_features()).float().softmax(-1)

    # ---------------------------------------------------------------- the unlabeled pool
    def setup_pool(self, trainer: Any) -> None:
        """Scan the train split once: indices, budget labels, features for scoring (and training,
        for textual prompts), the seen/unseen class split."""
        dm = trainer.datamodule
        if dm is None or "train" not in getattr(dm, "datasets", {}):
            raise RuntimeError("PromptTuning needs a vlweak data module with a train split")
        ds = dm.datasets["train"]
        if self.visual_prompt is not None and isinstance(ds, FeatureDataset):
            raise ValueError(f"{self.prompt_type} prompts need images: set data.init_args.embeddings: false")
        # augmented training images, but pool scans (features, scores) read the evaluation transform
        scan = dm.eval_dataset("train") if hasattr(dm, "eval_dataset") else ds
        self._pool_dataset, self._scan_dataset = ds, scan
        seen = getattr(dm, "seen_class_indices", None)
        self.seen_classes = list(seen) if seen is not None else None
        c = len(self.require_classnames())
        # transductive zero-shot: the unlabeled pool holds only unseen classes' images, so they are
        # pseudolabeled among the unseen classes (with a shots/fraction budget on top, among all)
        budget = getattr(dm, "budget", None)
        partial = budget is not None and (budget.shots is not None or budget.fraction is not None)
        restrict = seen is not None and not partial
        self.pseudolabel_classes = [i for i in range(c) if not restrict or i not in seen]
        index, label, feats = [], [], []
        only = self.pool_positions(dm)
        if only is not None:
            scan = Subset(scan, only.tolist())
        with torch.no_grad():
            for batch in self.scan_loader(scan):
                if not batch:
                    continue
                if "label" not in batch:
                    raise ValueError("PromptTuning needs single-label train data (items with 'label')")
                index.append(batch["index"].cpu())
                label.append(batch["label"].cpu())
                f = batch["features"] if "features" in batch else self.backbone.encode_image(batch["image"].to(self.device))
                feats.append(F.normalize(f.float(), dim=-1).cpu())
        if not index:
            raise ValueError("the train split is empty")
        self.set_pool(torch.cat(index), torch.cat(label), torch.cat(feats))
        if self.strategy != "fpl" and int((self.pool_label < 0).sum()) == 0:
            raise ValueError("the train split has no unlabeled images to pseudolabel (set shots or seen_classes)")

    def set_pool(self, index: Tensor, label: Tensor, features: Tensor) -> None:
        """The pool's dataset indices, budget labels and features, the row of each index, and the
        hidden ground truth where the data module has it (to measure pseudolabels only)."""
        self.pool_index, self.pool_label, self._pool_features = index, label, features
        self._feature_row = torch.full((int(index.max()) + 1,), -1, dtype=torch.long)
        self._feature_row[index] = torch.arange(len(index))
        dm = self.datamodule
        raw = dm.raw("train") if hasattr(dm, "raw") else None
        truth = raw.true_targets() if raw is not None and hasattr(raw, "true_targets") else None
        self.pool_truth = truth[index] if truth is not None else None

    def pool_positions(self, dm: Any) -> Tensor | None:
        """Positions of the train split to scan (``None``: all of it, the unlabeled pool included)."""
        return None

    def _positions(self, index: Tensor) -> Tensor:
        ds = self._pool_dataset
        if isinstance(ds, FeatureDataset):
            pos = torch.full((int(ds.index.max()) + 1,), -1, dtype=torch.long)
            pos[ds.index] = torch.arange(len(ds.index))
            return pos[index]
        return index

    def unlabeled_sample_ids(self) -> list[str]:
        ids = self.datamodule.sample_ids("train") if hasattr(self.datamodule, "sample_ids") else []
        idx = self.pool_index[self.pool_label < 0]
        return [ids[int(i)] for i in idx] if ids else [str(int(i)) for i in idx]

    def _restrict(self, scores: Tensor) -> Tensor:
        """Probabilities over the classes that may be pseudolabeled (others 0)."""
        allowed = torch.zeros(scores.shape[1], dtype=torch.bool)
        allowed[self.pseudolabel_classes] = True
        return scores.masked_fill(~allowed, float("-inf")).softmax(-1)

    @torch.no_grad()
    def score_unlabeled(self, source: bool) -> Tensor:
        """``[U, C]`` class probabilities of the unlabeled pool: from the pseudolabel source
        (``source=True``: zero-shot CLIP or a saved artifact) or from the current prompt."""
        unl = self.pool_label < 0
        if source and self.pseudolabels != "zeroshot":
            art = PseudoLabels.load(self.pseudolabels, self.require_classnames())
            if art.multilabel:
                raise ValueError(f"pseudolabels {self.pseudolabels} are multi-label; prompt tuning needs single-label scores")
            wanted = self.unlabeled_sample_ids()
            if 0 < len(art) < len(wanted) and len(set(wanted) & set(art.sample_ids)) == len(art):
                raise ArtifactError(
                    f"pseudolabels {self.pseudolabels} score {len(art)} of the {len(wanted)} unlabeled images: "
                    f"{self.strategy.upper()} chooses its own pseudolabels among all of them, so give the "
                    "artifact of the whole pool (unfiltered), as `vlweak predict` writes it"
                )
            scores = art.aligned_to(wanted).scores.float()
            scores = scores.masked_fill(~torch.isin(torch.arange(scores.shape[1]), torch.tensor(self.pseudolabel_classes)), 0.0)
            return scores / scores.sum(1, keepdim=True).clamp_min(1e-12)
        if source or self.visual_prompt is None:
            feats = self._pool_features[unl].to(self.device)
            classes = self.zero_shot_classifier() if source else self.class_features()
            return self._restrict(self.logits(feats, classes).float().cpu())
        scores, idx = self._prompted_logits(self.pool_index[unl])
        if not torch.equal(idx, self.pool_index[unl]):
            raise RuntimeError("unreadable images changed between scans of the train split")
        return self._restrict(scores)

    def _prompted_logits(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Logits ``[n, C]`` of the current (visual) prompt for the pool images ``index``, read with
        the evaluation transform, and the indices actually read (unreadable images skipped)."""
        classes = self.class_features()
        out, idx = [], []
        for batch in self.scan_loader(Subset(self._scan_dataset, self._positions(index).tolist())):
            if batch:
                out.append(self.logits(self.encode_images(batch["image"].to(self.device)), classes).float().cpu())
                idx.append(batch["index"].cpu())
        return torch.cat(out), torch.cat(idx)

    def use_training_set(self, index: Tensor, label: Tensor, r: int = 0) -> None:
        """Serve only ``index`` (labeled + pseudolabeled) as the train split, with ``label`` (round
        ``r``; with ``holdout``, a fraction drawn from ``seed + r`` is held out to choose the prompt)."""
        self._held = None
        n_held = int(len(index) * self.holdout)
        if n_held and len(index) - n_held >= 1:
            perm = torch.randperm(len(index), generator=torch.Generator().manual_seed(self.seed + r))
            held, kept = perm[:n_held].sort().values, perm[n_held:].sort().values
            self._held = (index[held], label[held])
            index, label = index[kept], label[kept]
        target = torch.full((int(self.pool_index.max()) + 1,), -1, dtype=torch.long)
        target[index] = label
        self._train_target = target
        if self._trains_on_pool_features():  # the items' indices alone: no image read
            self.datamodule.datasets["train"] = SampleIndices(index)
        else:
            self.datamodule.datasets["train"] = Subset(self._pool_dataset, self._positions(index).tolist())

    def _trains_on_pool_features(self) -> bool:
        """Training steps read the pool's kept features (textual prompts, ``cache_features``, no augmentation)."""
        return (self.visual_prompt is None and self.cache_features and self.train_augment is None
                and self._pool_features is not None)

    @torch.no_grad()
    def held_out_accuracy(self) -> float | None:
        """Accuracy of the current prompt on the round's held-out labels (``None`` without)."""
        if self._held is None:
            return None
        index, label = self._held
        if self.visual_prompt is None:
            feats = self._pool_features[self._feature_row[index]].to(self.device)
            pred = self.logits(feats, self.class_features()).argmax(-1).cpu()
        else:  # images (skipped unreadable ones drop out of both sides)
            logits, seen = self._prompted_logits(index)
            pred, label = logits.argmax(-1), label[torch.isin(index, seen)]
        return float((pred == label).float().mean())

    def track_best_prompt(self) -> float | None:
        """After an epoch: keep the prompt if it is the round's best on the held-out labels so far.
        A tie goes to the later epoch: held-out pseudolabels are often all right from the first
        epoch on, and the first epochs' prompt (warm-up) has barely left its initialisation."""
        acc = self.held_out_accuracy()
        if acc is not None and self._trainer is not None and self.trainer.world_size > 1:
            acc = self.trainer.strategy.broadcast(acc, src=0)  # every rank keeps the prompt rank 0 keeps
        if acc is not None and (self._best is None or acc >= self._best[0]):
            self._best = (acc, self.prompt_state())
        return acc

    def restore_best_prompt(self) -> None:
        """At the end of a round: go back to its best prompt on the held-out labels (if any)."""
        if self._best is not None:
            self.load_prompt_state(self._best[1])
        self._best = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # the round's best prompt so far on the held-out labels: a fit resumed mid-round chooses
        # the round's prompt as an uninterrupted one does
        if self._best is not None:
            checkpoint["prompt_tuning_best"] = {"accuracy": self._best[0], "prompt": self._best[1]}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        best = checkpoint.get("prompt_tuning_best")
        self._best = (float(best["accuracy"]), dict(best["prompt"])) if best is not None else None

    def release_pool(self) -> None:
        """Give the data module its whole train split and its own training order back and drop the
        pool features."""
        if self._pool_dataset is not None:
            self.datamodule.datasets["train"] = self._pool_dataset
            self.datamodule.train_order = None
        self._pool_dataset, self._scan_dataset, self._pool_features = None, None, None

    # ---------------------------------------------------------------- rounds
    def start_round(self, r: int) -> None:
        """Round ``r`` trains from scratch: fresh prompts (drawn from ``seed + r``; with ``warm_start``
        rounds after the first keep the previous round's prompt) and fresh optimizer state;
        :class:`~vlweak.callbacks.PseudolabelRounds` draws the round's data order."""
        if r == 0 or not self.warm_start:
            self.reset_prompts(torch.Generator().manual_seed(self.seed + r))
        self._best = None
        for opt in self.trainer.optimizers:
            opt.state.clear()

    def lr_at(self, epoch: int) -> float:
        """Constant or linear warm-up, then cosine decay over the round's remaining epochs."""
        if epoch < self.warmup_epochs:
            return self.lr * epoch / self.warmup_epochs if self.warmup == "linear" else self.warmup_lr
        span = max(1, self.epochs_per_round - self.warmup_epochs)
        return 0.5 * self.lr * (1 + math.cos(math.pi * (epoch - self.warmup_epochs) / span))

    def set_round_epoch(self, epoch: int) -> None:
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = self.lr_at(epoch)

    def configure_callbacks(self) -> list[PseudolabelRounds]:
        """The rounds callback, once per trainer: a test after a fit on the same trainer keeps it
        (no "will override existing callbacks" notice on every run)."""
        mine = self.__dict__.get("_rounds_callback")
        if mine is not None and self._trainer is not None and any(cb is mine for cb in self._trainer.callbacks):
            return []
        self._rounds_callback = PseudolabelRounds(self.rounds_dir, self.resume)
        return [self._rounds_callback]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for _, p in self.prompt_parameters()]
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    # ---------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        if not batch:
            return self.empty_step()
        target = self._train_target[batch["index"].to(self._train_target.device)].to(self.device)
        logits = self.logits(self.batch_features(batch, train=True), self.class_features())
        loss = F.cross_entropy(logits.float(), target, ignore_index=-1)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(target))
        return loss

    # ---------------------------------------------------------------- evaluation
    def prepare_eval(self, stage: str) -> None:
        with torch.no_grad():
            self._eval_classes = self.class_features().detach()

    def eval_step(self, batch: dict[str, Any], stage: str) -> dict[str, Tensor]:
        with torch.no_grad():
            scores = self.logits(self.batch_features(batch), self._eval_classes).float().softmax(-1)
        out = {"scores": scores, "index": batch["index"]}
        if "label" in batch:
            out["target"] = batch["label"]
        return out

    def evaluate(self, stage: str, scores: Tensor, targets: Tensor, mask: Tensor | None = None) -> dict[str, float]:
        """Accuracy metrics, plus the spread of per-class accuracy (std and min over the classes
        present) and, with a seen/unseen split, seen and unseen accuracy and their harmonic mean."""
        metrics = super().evaluate(stage, scores, targets, mask)
        extra = spread_and_split(scores, targets, self._seen_classes())
        extra = {f"{stage}/{k}": v for k, v in extra.items()}
        self.log_metrics(extra)
        metrics.update(extra)
        self.last_metrics = metrics
        return metrics

    def _seen_classes(self) -> list[int] | None:
        if self.seen_classes is not None:
            return self.seen_classes
        seen = getattr(self.datamodule, "seen_class_indices", None)
        return list(seen) if seen is not None else None



def spread_and_split(scores: Tensor, targets: Tensor, seen: list[int] | None = None) -> dict[str, float]:
    """Per-class accuracy spread (``per_class_acc_std``, ``per_class_acc_min`` over the classes
    present in ``targets``) and, given ``seen`` classes, ``acc_seen`` / ``acc_unseen`` (accuracy on
    the samples of seen / unseen classes, predicting among all classes) and ``acc_harmonic``."""
    keep = targets >= 0
    scores, targets = scores[keep], targets[keep].long()
    per_class = multiclass_report(scores, targets)["per_class"]
    pc = per_class[~per_class.isnan()]
    out = {
        "per_class_acc_std": float(pc.std(unbiased=False)) if len(pc) else float("nan"),
        "per_class_acc_min": float(pc.min()) if len(pc) else float("nan"),
    }
    if seen is not None:
        correct = scores.argmax(1) == targets
        is_seen = torch.isin(targets, torch.as_tensor(seen, dtype=torch.long))
        s = float(correct[is_seen].float().mean()) if is_seen.any() else float("nan")
        u = float(correct[~is_seen].float().mean()) if (~is_seen).any() else float("nan")
        if math.isnan(s) or math.isnan(u):
            harmonic = float("nan")
        else:
            harmonic = 2 * s * u / (s + u) if s + u > 0 else 0.0
        out.update(acc_seen=s, acc_unseen=u, acc_harmonic=harmonic)
    return out
