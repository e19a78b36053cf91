import lightning as L
import pytest
import torch

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


def test_short_pretraining_lowers_loss_and_exports(tmp_path):
    torch.manual_seed(0)
    backbone = OpenCLIPBackbone("vlweak-tiny", pretrained=None, freeze=False)
    out = tmp_path / "w.safetensors"
    model = CLIPPretrain(backbone, lr=3e-3, warmup_steps=5, export_path=str(out))
    dm = ShapesWorldDataModule(image_size=32, n_train=2048, n_val=64, n_test=0, batch_size=64, transform=backbone.transform)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    before = _eval_loss(model, batch)
    trainer = L.Trainer(max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(model, dm)
    after = _eval_loss(model, batch)
    assert after < before - 0.3, (before, after)
    # the exported weights load through the ordinary backbone path and give the same features
    loaded = OpenCLIPBackbone("vlweak-tiny", pretrained=str(out))
    model.backbone.eval()
    x = batch["image"][:4]
    assert torch.allclose(loaded.encode_image(x), model.backbone.encode_image(x), atol=1e-5)


def test_frozen_backbone_is_rejected():
    with pytest.raises(ValueError, match="freeze: false"):
        CLIPPretrain(OpenCLIPBackbone("vlweak-tiny", pretrained=None))
