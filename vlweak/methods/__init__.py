"""vlweak's methods, one LightningModule each."""

from vlweak.methods.base import VLMethod
from vlweak.methods.cdul import CDUL
from vlweak.methods.chils import CHiLS
from vlweak.methods.coop import CoOp
from vlweak.methods.dualcoop import DualCoOp
from vlweak.methods.pretrain import CLIPPretrain
from vlweak.methods.prompt_tuning import PromptTuning
from vlweak.methods.zeroshot import ZeroShot
from vlweak.methods.zlap import ZLaP

__all__ = ["CDUL", "CHiLS", "CLIPPretrain", "CoOp", "DualCoOp", "PromptTuning", "VLMethod", "ZLaP", "ZeroShot"]
