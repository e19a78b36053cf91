"""One 2-process CPU DDP fit of ``test_order``'s recorder, for the DDP resume test.

``python -m tests.data.ddp_order OUT [CKPT]``: trains all epochs, from ``CKPT`` if given, writing a
checkpoint after every step into ``OUT`` (``step=<global step>.ckpt``: what a crash after that step
leaves); each rank writes the samples of every batch it trained on to ``OUT/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.data.test_order import EPOCHS, _Data, _Recorder

if __name__ == "__main__":
    out = Path(sys.argv[1])
    ckpt = sys.argv[2] if len(sys.argv) > 2 else None
    model = _Recorder()
    trainer = L.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=2, strategy="ddp",
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ModelCheckpoint(dirpath=out, filename="{step}", every_n_train_steps=1, save_top_k=-1)])
    trainer.fit(model, _Data(workers=1), ckpt_path=ckpt)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(model.seen))
