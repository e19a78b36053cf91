"""Lightning's FSDP strategy on CPU processes, for the FSDP tests.

Lightning refuses ``strategy=fsdp`` without a GPU, and FSDP needs its device named when the
processes have no accelerator; this subclass wraps the module itself, as Lightning would but with
``device_id=cpu`` (gloo collectives), and leaves the rest to
:class:`~lightning.pytorch.strategies.FSDPStrategy`, so the same hooks, state-dict gathering and
checkpointing run as on GPUs.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel


class CPUFSDPStrategy(FSDPStrategy):
    """:class:`FSDPStrategy` for CPU processes (tests only)."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            kwargs = {k: v for k, v in self.kwargs.items() if k != "device_mesh"}
            model = FullyShardedDataParallel(
                model, device_id=torch.device("cpu"), sharding_strategy=self.sharding_strategy,
                cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config, **kwargs
            )
        return super()._setup_model(model)
