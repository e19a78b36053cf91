import csv

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from vlweak.backbones import OpenCLIPBackbone
from vlweak.data import ShapesWorldDataModule
from vlweak.methods import CLIPPretrain
from vlweak.methods.pretrain import clip_loss


def test_clip_loss_matches_direct_computation():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    s = torch.tensor(10.0)
    logits = s * img @ txt.T
    i2t = -torch.log_softmax(logits, 1).diagonal().mean()
    t2i = -torch.log_softmax(logits, 0).diagonal().mean()
    assert torch.allclose(clip_loss(img, txt, s), (i2t + t2i) / 2)


def _eval_loss(model, batch):
    with torch.no_grad():
        b = model.backbone
        return clip_loss(b.encode_image(batch["image"]), b.encode_text(list(batch["caption"])), b.logit_scale).item()


def short_pretraining(tmp_path, **trainer_kw) -> tuple[float, float, float]:
    """40 steps of pretraining a random ``vlweak-tiny`` on ``trainer_kw``'s device and precision
    (the GPU checks reuse it): the contrastive loss on a validation batch before and after, and the
    largest difference between the features of the exported weights, loaded through the ordinary
    backbone path on the CPU, and of the trained model."""
    torch.manual_seed(0)
    backbone = OpenCLIPBackbone("vlweak-tiny", pretrained=None, freeze=False)
    out = tmp_path / "w.safetensors"
    model = CLIPPretrain(backbone, lr=3e-3, warmup_steps=5, export_path=str(out))
    dm = ShapesWorldDataModule(image_size=32, n_train=2048, n_val=64, n_test=0, batch_size=64, transform=backbone.transform)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    before = _eval_loss(model, batch)
    trainer = L.Trainer(max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                        **{"accelerator": "cpu", **trainer_kw})
    trainer.fit(model, dm)
    model.cpu()
    after = _eval_loss(model, batch)
    loaded = OpenCLIPBackbone("vlweak-tiny", pretrained=str(out))
    model.backbone.eval()
    x = batch["image"][:4]
    return before, after, (loaded.encode_image(x) - model.backbone.encode_image(x)).abs().max().item()


def test_short_pretraining_lowers_loss_and_exports(tmp_path):
    before, after, export_diff = short_pretraining(tmp_path)
    assert after < before - 0.3, (before, after)
    # the exported weights load through the ordinary backbone path and give the same features
    assert export_diff <= 1e-5


def test_frozen_backbone_is_rejected():
    with pytest.raises(ValueError, match="freeze: false"):
        CLIPPretrain(OpenCLIPBackbone("vlweak-tiny", pretrained=None))


def test_a_hugging_face_backbone_is_named_through_the_cli(tmp_path, capsys):
    # the CLI accepts any backbone class; the method says in one line which it trains
    from tests.backbones.test_hf_clip import _save, _tiny_model, _tiny_tokenizer
    from tests.conftest import REPO
    from vlweak.cli import main

    tok = _tiny_tokenizer()
    hf = _save(tmp_path / "hf", _tiny_model(tok), tok)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(REPO / "recipes" / "pretrain" / "shapes.yaml"),
              "--model.init_args.backbone=vlweak.backbones.HFCLIPBackbone", f"--model.init_args.backbone.init_args.model_id={hf}",
              "--model.init_args.backbone.init_args.freeze=false", f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert info.value.code == 2
    assert "CLIPPretrain trains open_clip models" in capsys.readouterr().err


def test_interrupted_pretraining_resumes_from_last_checkpoint(tmp_path, tiny_ckpt):
    # the recipe's path: last.ckpt every N steps, then `vlweak fit ... --ckpt_path last`; three
    # batches an epoch and a checkpoint every two steps, so the fit is resumed in the middle of an epoch
    from tests.conftest import REPO, PowerCut
    from vlweak.cli import build_cli

    def args(name):
        return ["--config", str(REPO / "recipes/pretrain/shapes.yaml"),
                "--model.init_args.backbone.init_args.model_name=vlweak-tiny",
                f"--model.init_args.backbone.init_args.pretrained={tiny_ckpt}", "--model.init_args.warmup_steps=2",
                "--model.init_args.export_path=null", "--model.init_args.export_dtype=fp32",
                "--data.init_args.image_size=32", "--data.init_args.n_train=24", "--data.init_args.n_val=0",
                "--data.init_args.n_test=0", "--data.init_args.batch_size=8", "--data.init_args.num_workers=0",
                "--trainer.max_steps=6", "--trainer.limit_val_batches=0", "--trainer.accelerator=cpu",
                "--trainer.enable_progress_bar=false", "--trainer.callbacks.init_args.every_n_train_steps=2",
                f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.logger.init_args.name={name}",
                "--trainer.logger.init_args.version=0"]

    build_cli(["fit", *args("whole"), "--trainer.log_every_n_steps=1"])
    cli = build_cli(args("cut"), run=False)
    cli.trainer.callbacks.append(PowerCut(at_step=3))
    with pytest.raises(SystemExit):  # Lightning turns the interrupt into an exit after its teardown
        cli.trainer.fit(cli.model, cli.datamodule)
    run = tmp_path / "cut" / "version_0"
    assert not (run / "backbone.safetensors").exists()
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2
    # a training checkpoint is also a weights file for any backbone
    state = torch.load(last, weights_only=False)["state_dict"]
    loaded = OpenCLIPBackbone("vlweak-tiny", pretrained=str(last)).model.state_dict()
    assert all(torch.equal(v, state[f"backbone.model.{k}"].reshape(v.shape)) for k, v in loaded.items())
    with pytest.raises(FileNotFoundError, match="no last checkpoint among the runs under"):
        build_cli(["test", *args("never-fitted"), "--ckpt_path=last"])
    # the newest last.ckpt of the recipe's runs (`last` above), although the resumed run logs to a new folder
    build_cli(["fit", *args("cut"), "--trainer.logger.init_args.version=1", "--trainer.log_every_n_steps=1", "--ckpt_path=last"])
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "cut" / "version_1" / "metrics.csv"))]
    assert steps and min(steps) >= 2, steps  # continued from step 2, not from scratch

    def losses(run):  # logged under the uninterrupted run's step numbers
        rows = csv.DictReader(open(tmp_path / run / "metrics.csv"))
        return {int(r["step"]): round(float(r["train/loss"]), 4) for r in rows if r.get("train/loss")}

    assert losses("cut/version_1") == {k: v for k, v in losses("whole/version_0").items() if k >= 2}
    whole = load_file(tmp_path / "whole" / "version_0" / "backbone.safetensors")
    resumed = load_file(tmp_path / "cut" / "version_1" / "backbone.safetensors")
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], msg=k)


def test_noisy_caption_recipe_trains_on_misnamed_shifted_domain_captions():
    # recipes/pretrain/shapes_noisy.yaml is how the shipped vlweak-shapes-noisy was made: its data
    # module must hand CLIPPretrain the misnamed captions, and only for shifted-domain images
    from tests.conftest import REPO
    from vlweak.cli import build_cli
    from vlweak.data.world import _BACKGROUNDS_TARGET, MISNAMING, ShapesWorld

    cli = build_cli(["--config", str(REPO / "recipes/pretrain/shapes_noisy.yaml"), "--data.init_args.n_train=400",
                     "--data.init_args.n_val=0", "--trainer.accelerator=cpu"], run=False)
    world = cli.datamodule.world
    assert world.misnaming == MISNAMING and world.misnaming_rate == 0.8 and world.shift == 0.5
    ds = cli.datamodule.raw("train")  # the items CLIPPretrain's batches are made of, before transforms
    clean = ShapesWorld(seed=world.seed, shift=world.shift)
    wrong = right = 0
    for i in range(len(ds)):
        scene, caption = clean.scene("train", i), ds[i]["caption"]
        shape = scene.objects[0].shape
        if shape not in MISNAMING or scene.background not in _BACKGROUNDS_TARGET:
            assert caption == scene.caption  # source-domain images and other shapes keep their captions
        elif "object" not in caption:  # "a red object" names no shape
            wrong += MISNAMING[shape] in caption and shape not in caption
            right += shape in caption
    assert wrong > 2 * right > 0, (wrong, right)


def _pair_loss(backbone: OpenCLIPBackbone, manifest) -> float:
    """The contrastive loss of ``backbone`` over the readable pairs of a caption manifest."""
    from torch.utils.data import DataLoader

    from vlweak.data.datasets import ManifestReader, Transformed, collate

    pairs = ManifestReader.read(manifest, skip_bad=True, caption_key="caption")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        batch = next(iter(DataLoader(Transformed(pairs, backbone.transform), batch_size=len(pairs), collate_fn=collate)))
    with torch.no_grad():
        return clip_loss(backbone.encode_image(batch["image"]), backbone.encode_text(list(batch["caption"])),
                         backbone.logit_scale).item()


def test_fine_tuning_on_a_caption_manifest_through_the_recipe(tmp_path, tiny_ckpt):
    # recipes/pretrain/manifest.yaml: the user's own image-caption pairs, three of them unreadable
    # (skipped with a warning); the exported weights load back through the ordinary backbone path
    from tests.conftest import REPO, write_caption_manifest
    from vlweak.cli import build_cli

    manifest = write_caption_manifest(tmp_path / "pairs", 48, bad=3)
    out = tmp_path / "tuned.safetensors"
    build_cli(["fit", "--config", str(REPO / "recipes/pretrain/manifest.yaml"),
               "--model.init_args.backbone.init_args.model_name=vlweak-tiny",
               f"--model.init_args.backbone.init_args.pretrained={tiny_ckpt}", "--trainer.precision=32",
               "--trainer.accelerator=cpu", "--trainer.max_epochs=null", "--trainer.max_steps=30",
               "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
               f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", f"--data.init_args.train={manifest}",
               "--data.init_args.val=null", "--data.init_args.batch_size=16", "--data.init_args.num_workers=0",
               "--model.init_args.lr=0.003", "--model.init_args.warmup_steps=5", f"--model.init_args.export_path={out}"])
    before = _pair_loss(OpenCLIPBackbone("vlweak-tiny", pretrained=tiny_ckpt), manifest)
    after = _pair_loss(OpenCLIPBackbone("vlweak-tiny", pretrained=str(out)), manifest)
    assert after < before - 0.5, (before, after)


def test_a_fit_whose_every_image_is_unreadable_stops_instead_of_exporting(tmp_path, tiny_ckpt):
    # skip_bad (the manifest recipe's setting) with every image broken: an error, not untrained weights
    from tests.conftest import REPO, write_caption_manifest
    from vlweak.cli import build_cli

    manifest = write_caption_manifest(tmp_path / "pairs", 8, bad=8)
    out = tmp_path / "tuned.safetensors"
    with pytest.raises(ValueError, match=r"epoch 0: every image of the train split was skipped as unreadable \(1 batches"):
        build_cli(["fit", "--config", str(REPO / "recipes/pretrain/manifest.yaml"),
                   "--model.init_args.backbone.init_args.model_name=vlweak-tiny",
                   f"--model.init_args.backbone.init_args.pretrained={tiny_ckpt}", "--trainer.precision=32",
                   "--trainer.accelerator=cpu", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
                   f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", f"--data.init_args.train={manifest}",
                   "--data.init_args.val=null", "--data.init_args.batch_size=8", "--data.init_args.num_workers=0",
                   f"--model.init_args.export_path={out}"])
    assert not out.exists()
