"""Model zoos: put LinOSS mixers into codebases that define their own attention.

* :func:`swap_attention` (:mod:`flax_linoss.zoo.swap`): build a mixer, or a pattern of
  mixers and attention (a hybrid), wherever a codebase builds its attention class.
* adapters (:mod:`flax_linoss.zoo.adapters`): how a codebase's attention constructor and
  call map onto a mixer; :class:`NnxAdapter`, :class:`LinenAdapter`, a registry
  (:func:`register_adapter`), and ``"gemma"`` (:mod:`flax_linoss.zoo.gemma`: flax's
  ``examples/gemma`` in nnx, Google DeepMind's ``gemma`` in linen).

Importing this package imports Flax only when an adapter is first used.
"""

from flax_linoss.zoo.swap import ATTENTION, Swap, swap_attention

_ADAPTER_NAMES = (
    "LinenAdapter",
    "NnxAdapter",
    "available_adapters",
    "get_adapter",
    "register_adapter",
)

__all__ = ["ATTENTION", "Swap", "swap_attention", *_ADAPTER_NAMES]


def __getattr__(name: str):
    if name in _ADAPTER_NAMES:
        from flax_linoss.zoo import adapters

        return getattr(adapters, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
