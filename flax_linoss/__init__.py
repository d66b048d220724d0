"""flax-linoss: oscillatory state-space models (LinOSS, D-LinOSS) for Flax linen and nnx.

The public surface, by what you do with it:

* the functional core: :mod:`flax_linoss.ops` (``linoss_apply``, ``linoss_step``,
  ``LinOSSState``, the parameterisations), the first three re-exported here;
* layers, block and the papers' model: :mod:`flax_linoss.nnx` (the one source) and
  :mod:`flax_linoss.linen` (derived, same parameters); :mod:`flax_linoss.convert` moves
  weights between them;
* sequence mixers (drop-ins for Flax attention): :mod:`flax_linoss.mixers`, and here
  ``get_mixer``, ``register_mixer``, ``available_mixers``;
* the transformer language model built on them: :mod:`flax_linoss.models`;
* model zoos (codebases with their own attention): :mod:`flax_linoss.zoo`, and here
  ``swap_attention``, ``register_adapter``, ``NnxAdapter``, ``LinenAdapter``;
* the three models of the papers and their names: ``VARIANTS``
  (:mod:`flax_linoss.variants`);
* data and training: :mod:`flax_linoss.data` and :mod:`flax_linoss.train` (imported on
  use; they need the ``data`` / ``train`` extras).

Importing this package imports JAX but not Flax; ``flax_linoss.linen``, ``.nnx`` and the
mixer classes import Flax when first used.
"""

from flax_linoss import ops
from flax_linoss.mixers.registry import available_mixers, get_mixer, register_mixer
from flax_linoss.ops import LinOSSState, linoss_apply, linoss_step
from flax_linoss.variants import VARIANTS, Variant
from flax_linoss.zoo import swap_attention

__version__ = "0.2.0"

_ZOO = ("LinenAdapter", "NnxAdapter", "register_adapter")

__all__ = [
    "VARIANTS",
    "LinOSSState",
    "LinenAdapter",
    "NnxAdapter",
    "Variant",
    "__version__",
    "available_mixers",
    "get_mixer",
    "linoss_apply",
    "linoss_step",
    "ops",
    "register_adapter",
    "register_mixer",
    "swap_attention",
]


def __getattr__(name: str):
    if name in _ZOO:  # imports Flax: only when used
        from flax_linoss import zoo

        return getattr(zoo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
