"""vlweak's methods, one LightningModule each."""

from vlweak.methods.base import VLMethod
from vlweak.methods.cdul import CDUL  # noqa: F401
from vlweak.methods.pretrain import CLIPPretrain
from vlweak.methods.zeroshot import ZeroShot

__all__ = ["CLIPPretrain", "VLMethod", "ZeroShot"]
from vlweak.methods.chils import CHiLS  # noqa: E402,F401
from vlweak.methods.prompt_tuning import PromptTuning  # noqa: E402,F401
from vlweak.methods.dualcoop import DualCoOp  # noqa: E402,F401
from vlweak.methods.zlap import ZLaP  # noqa: E402,F401
