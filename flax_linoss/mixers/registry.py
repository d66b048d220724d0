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

``linoss-im-selective``: LinOSS-IM with input-dependent step sizes (``selective=True``),
:class:`~flax_linoss.mixers.linen.SelectiveLinOSSMixer` and its nnx namesake.

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


class ApiRegistry:
    """Named entries per Flax API: ``(api, name) -> entry``, where an entry given as
    ``"module:attribute"`` is imported when first asked for. Serves the mixer registry and
    the zoo's adapter registry.

    Args:
      kind: what is registered (``"mixer"``), for messages.
      entries: the built-in entries.
      hint: a sentence on how to register one, appended to "not found" errors.
    """

    def __init__(self, kind: str, entries: dict[tuple[str, str], Any], hint: str = ""):
        self.kind, self.hint = kind, hint
        self._entries = dict(entries)
        self._lock = threading.Lock()

    def register(self, name: str, entry: Any, api: str, overwrite: bool, check) -> None:
        """Adds ``entry`` (after ``check(entry)``, which raises on a wrong one)."""
        _check_api(api)
        if not isinstance(name, str) or not name:
            raise ValueError(f"A {self.kind} name must be a non-empty string, got {name!r}.")
        check(entry)
        with self._lock:
            if (api, name) in self._entries and not overwrite:
                raise ValueError(
                    f"{self.kind.capitalize()} {name!r} is already registered for "
                    f"api={api!r}; pass overwrite=True to replace it."
                )
            self._entries[(api, name)] = entry

    def get(self, name: str, api: str) -> Any:
        _check_api(api)
        try:
            entry = self._entries[(api, name)]
        except KeyError:
            raise KeyError(
                f"No {self.kind} {name!r} for api={api!r}; available: {self.names(api)}"
                f"{f' ({self.hint})' if self.hint else ''}."
            ) from None
        if isinstance(entry, str):
            module, attr = entry.split(":")
            return getattr(importlib.import_module(module), attr)
        return entry

    def pop(self, key: tuple[str, str], *default: Any) -> Any:
        """Removes ``(api, name)`` (as ``dict.pop``), e.g. a test's registration."""
        with self._lock:
            return self._entries.pop(key, *default)

    def names(self, api: str) -> list[str]:
        _check_api(api)
        return sorted(name for (a, name) in self._entries if a == api)


def _check_api(api: str) -> str:
    if api not in APIS:
        raise ValueError(f"Unknown api {api!r}; expected one of {list(APIS)}.")
    return api


# (api, name) -> factory, or "module:attribute" for a lazy import. The LinOSS entries come
# from the one definition of the three models (flax_linoss.variants).
_REGISTRY = ApiRegistry(
    "mixer",
    {
        (LINEN, "attention"): "flax.linen:MultiHeadDotProductAttention",
        (NNX, "attention"): "flax.nnx:MultiHeadAttention",
        **{
            (api, v.mixer): f"flax_linoss.mixers.{api}:{v.mixer_class}"
            for api in (LINEN, NNX)
            for v in VARIANTS
        },
        **{
            (api, "linoss-im-selective"): f"flax_linoss.mixers.{api}:SelectiveLinOSSMixer"
            for api in (LINEN, NNX)
        },
    },
)


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

    def check(fn):
        if not callable(fn):
            raise TypeError(f"Mixer factory for {name!r} must be callable, got {fn!r}.")

    def register(fn):
        _REGISTRY.register(name, fn, api, overwrite, check)
        return fn

    _check_api(api)
    return register if factory is None else register(factory)


def get_mixer(name: str, api: str = LINEN) -> Any:
    """The factory registered as ``name`` for ``api``.

    Raises:
      KeyError: naming the available mixers.
    """
    return _REGISTRY.get(name, api)


def available_mixers(api: str = LINEN) -> list[str]:
    """Sorted names of the mixers registered for ``api``."""
    return _REGISTRY.names(api)
