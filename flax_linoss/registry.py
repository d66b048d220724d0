"""Older home of the mixer registry; it lives in :mod:`flax_linoss.mixers.registry` (and its
functions are exported from :mod:`flax_linoss`). Kept so existing imports keep working."""

from flax_linoss.mixers.registry import (  # noqa: F401
    APIS,
    LINEN,
    NNX,
    available_mixers,
    get_mixer,
    register_mixer,
    swap_attention,
)
