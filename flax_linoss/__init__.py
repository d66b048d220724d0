"""flax-linoss: oscillatory state-space models (LinOSS, D-LinOSS) for Flax linen and nnx."""

from flax_linoss import ops
from flax_linoss.ops import LinOSSState, linoss_apply, linoss_step

__version__ = "0.1.0"

__all__ = ["LinOSSState", "__version__", "linoss_apply", "linoss_step", "ops"]

# Sequence mixers (issue 4): a config string picks the mixer; the classes live in
# flax_linoss.mixers.linen / flax_linoss.mixers.nnx (imported on first use).
from flax_linoss import mixers
from flax_linoss.registry import (
    available_mixers,
    get_mixer,
    register_mixer,
    swap_attention,
)

__all__ += ["available_mixers", "get_mixer", "mixers", "register_mixer", "swap_attention"]
