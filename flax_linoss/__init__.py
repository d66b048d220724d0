"""flax-linoss: oscillatory state-space models (LinOSS, D-LinOSS) for Flax linen and nnx."""

from flax_linoss import ops
from flax_linoss.ops import LinOSSState, linoss_apply, linoss_step

__version__ = "0.1.0"

__all__ = ["LinOSSState", "__version__", "linoss_apply", "linoss_step", "ops"]
