"""One 2-process CPU DDP fit of ``test_order``'s recorder, for the DDP resume test.

``python -m tests.data.ddp_order OUT [MAX_STEPS] [CKPT]``: trains up to ``MAX_STEPS`` steps (a clean
stop mid-epoch; default: all epochs), writing ``last.ckpt`` after every step into ``OUT``, from
``CKPT`` if given; each rank writes the samples of every batch it trained on to ``OUT/rank<r>.json``.
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
    max_steps = int(sys.argv[2]) if len(sys.argv) > 2 else -1
    ckpt = sys.argv[3] if len(sys.argv) > 3 else None
    model = _Recorder()
    trainer = L.Trainer(max_epochs=EPOCHS, max_steps=max_steps, accelerator="cpu", devices=2, strategy="ddp",
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ModelCheckpoint(dirpath=out, every_n_train_steps=1, save_last=True, save_top_k=0)])
    trainer.fit(model, _Data(workers=1), ckpt_path=ckpt)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(model.seen))
