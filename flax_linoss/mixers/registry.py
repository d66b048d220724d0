"""Mixer registry: a config string picks the sequence mixer.

Pre-registered, for ``api="linen"`` and ``api="nnx"``:

=================  =========================================  ==============================
name               linen                                      nnx
=================  =========================================  ==============================
``attention``      ``flax.linen.MultiHeadDotProductAttention``  ``flax.nnx.MultiHeadAttention``
``linoss-im``      :class:`~flax_linoss.mixers.linen.LinOSSMixer`       ``...nnx.LinOSSMixer``
``linoss-imex``    :class:`~flax_linoss.mixers.linen.LinOSSIMEXMixer`   ``...nnx.LinOSSIMEXMixer``
``d-linoss``       :class:`~flax_linoss.mixers.linen.DLinOSSMixer`      ``...nnx.DLinOSSMixer``
=================  =========================================  ==============================

A registered factory is called exactly like the attention class it stands in for (linen:
``nn.MultiHeadDotProductAttention``'s keyword arguments, then its call; nnx:
``nnx.MultiHeadAttention(num_heads, in_features, ..., rngs=...)``). Built-ins are imported
lazily, so importing this module does not import Flax. To put a mixer where existing code
builds its attention, see :func:`flax_linoss.swap_attention` (:mod:`flax_linoss.zoo`).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import Any

from flax_linoss.variants import VARIANTS

LINEN = "linen"
NNX = "nnx"
APIS = (LINEN, NNX)

# (api, name) -> factory, or "module:attribute" for a lazy import. The LinOSS entries come
# from the one definition of the three models (flax_linoss.variants).
_REGISTRY: dict[tuple[str, str], Any] = {
    (LINEN, "attention"): "flax.linen:MultiHeadDotProductAttention",
    (NNX, "attention"): "flax.nnx:MultiHeadAttention",
    **{
        (api, v.mixer): f"flax_linoss.mixers.{api}:{v.mixer_class}"
        for api in (LINEN, NNX)
        for v in VARIANTS
    },
}
_LOCK = threading.Lock()


def _check_api(api: str) -> str:
    if api not in APIS:
        raise ValueError(f"Unknown api {api!r}; expected one of {list(APIS)}.")
    return api


def _resolve(entry: Any) -> Any:
    if isinstance(entry, str):
        module, attr = entry.split(":")
        return getattr(importlib.import_module(module), attr)
    return entry


def register_mixer(
    name: str, factory: Callable | None = None, *, api: str = LINEN, overwrite: bool = False
):
    """Registers ``factory`` as mixer ``name`` for ``api`` (``"linen"`` or ``"nnx"``).

    Usable as a decorator: ``@register_mixer("mine", api="nnx")``.

    Args:
      name: the config string.
      factory: a class or callable with the constructor signature of the attention it
        replaces (see the module doc); a class is needed to swap it into ``SelfAttention``.
      api: which Flax API the factory is for.
      overwrite: replace an existing entry instead of raising.

    Returns:
      ``factory`` (or a decorator when ``factory`` is omitted).
    """
    _check_api(api)
    if not isinstance(name, str) or not name:
        raise ValueError(f"A mixer name must be a non-empty string, got {name!r}.")

    def register(fn):
        if not callable(fn):
            raise TypeError(f"Mixer factory for {name!r} must be callable, got {fn!r}.")
        with _LOCK:
            if (api, name) in _REGISTRY and not overwrite:
                raise ValueError(
                    f"Mixer {name!r} is already registered for api={api!r}; pass "
                    "overwrite=True to replace it."
                )
            _REGISTRY[(api, name)] = fn
        return fn

    return register if factory is None else register(factory)


def get_mixer(name: str, api: str = LINEN) -> Any:
    """The factory registered as ``name`` for ``api``.

    Raises:
      KeyError: naming the available mixers.
    """
    _check_api(api)
    try:
        entry = _REGISTRY[(api, name)]
    except KeyError:
        raise KeyError(
            f"No mixer {name!r} for api={api!r}; available: {available_mixers(api)}."
        ) from None
    return _resolve(entry)


def available_mixers(api: str = LINEN) -> list[str]:
    """Sorted names of the mixers registered for ``api``."""
    _check_api(api)
    return sorted(name for (a, name) in _REGISTRY if a == api)
