"""``swap_attention``: put a mixer (or a pattern of mixers) where a codebase builds attention.

Importing this module does not import Flax (Flax is imported when a swap starts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from types import ModuleType
from typing import Any

from flax_linoss.mixers.registry import APIS, LINEN, NNX, get_mixer

__all__ = ["ATTENTION", "Swap", "swap_attention"]

#: The pattern entry that keeps the target class (``"linoss-im,attention"``: a hybrid).
ATTENTION = "attention"

# The attributes through which Flax code reaches its stock attention classes.
_LINEN_TARGETS = ("MultiHeadDotProductAttention", "MultiHeadAttention", "SelfAttention")
_NNX_TARGETS = ("MultiHeadAttention",)
_LOCK = threading.RLock()


@dataclasses.dataclass
class Swap:
    """What a :func:`swap_attention` block did (yielded by it).

    Attributes:
      pattern: the entries, in order (names, or classes given directly).
      classes: per entry, the class it builds (``None`` for :data:`ATTENTION`: the target).
      built: the class of every instance built inside the block, in construction order.
    """

    pattern: tuple[Any, ...]
    classes: tuple[type | None, ...]
    built: list[type] = dataclasses.field(default_factory=list)


def _import_target(target: str) -> type:
    module, _, attr = target.rpartition(".")
    if not module:
        raise ValueError(
            f"swap_attention: target {target!r} must be a class or 'package.module.Class'."
        )
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"swap_attention: cannot import target {target!r}: {e}") from None


def _api_of(target: type | None, adapter: Any, api: str | None) -> str:
    if api is not None:
        if api not in APIS:
            raise ValueError(f"Unknown api {api!r}; expected one of {list(APIS)}.")
        return api
    import flax.linen as nn
    from flax import nnx

    from flax_linoss.zoo.adapters import NnxAdapter

    if isinstance(target, type) and issubclass(target, nnx.Module):
        return NNX
    if isinstance(target, type) and issubclass(target, nn.Module):
        return LINEN
    if isinstance(adapter, type):
        return NNX if issubclass(adapter, NnxAdapter) else LINEN
    return LINEN


def _entries(mixer: Any) -> tuple[Any, ...]:
    if isinstance(mixer, str):
        names = tuple(m.strip() for m in mixer.split(","))
        if not all(names):
            raise ValueError(f"swap_attention: empty entry in the pattern {mixer!r}.")
        return names
    return (mixer,)


class _Order:
    """Which pattern entry the next instance gets: construction order (nnx), or for linen,
    the order in which module paths are first seen (linen rebuilds its submodules at every
    ``init``/``apply``; a path keeps its entry)."""

    def __init__(self, api: str, size: int):
        self.api, self.size = api, size
        self.keys: dict[Any, int] = {}
        self.per_parent: dict[int, int] = {}
        self.parents: list[Any] = []  # kept alive, so their ids stay unique in the block
        self.count = 0
        self.class_calls = 0

    def next(self) -> int:
        key = self._key()
        if key not in self.keys:
            self.keys[key] = len(self.keys)
        return self.keys[key] % self.size

    def _key(self):
        if self.api == LINEN:
            try:
                from flax.linen import module as linen_module

                stack = linen_module._context.module_stack
                parent = stack[-1] if stack else None
            except AttributeError:  # pragma: no cover - a flax without the module stack
                parent = None
            if parent is not None and getattr(parent, "scope", None) is not None:
                n = self.per_parent.get(id(parent), 0)
                if not n:
                    self.parents.append(parent)
                self.per_parent[id(parent)] = n + 1
                return (tuple(parent.scope.path), n)
        self.count += 1
        return ("#", self.count)


class _Dispatcher:
    """What the codebase finds under the target's name during the block: called like the
    target, it builds the next entry's class; ``isinstance`` checks against it accept
    every entry's instances; other attributes are the target's, and class-level calls
    (a ``classmethod`` ``init_cache``, as Gemma's linen attention has) go to the class of
    the layer whose turn it is (layers in construction order)."""

    def __init__(self, target: type, classes, order: _Order, swap: Swap, name: str):
        self._target, self._classes, self._order, self._swap = target, classes, order, swap
        self.__name__ = self.__qualname__ = name
        self.__doc__ = getattr(target, "__doc__", None)

    def _class(self, i: int) -> type:
        cls = self._classes[i]
        return self._target if cls is None else cls

    def __call__(self, *args, **kwargs):
        cls = self._class(self._order.next())
        module = cls(*args, **kwargs)
        self._swap.built.append(cls)
        return module

    def __instancecheck__(self, obj) -> bool:
        return isinstance(obj, tuple({self._class(i) for i in range(len(self._classes))}))

    def __getattr__(self, name: str):
        value = getattr(self._target, name)
        if not callable(value) or isinstance(value, type):
            return value
        classes = {self._class(i) for i in range(len(self._classes))}
        if len(classes) == 1:
            return getattr(next(iter(classes)), name)

        def by_layer(*args, **kwargs):
            layers = len(self._order.keys)
            if not layers:
                raise ValueError(
                    f"swap_attention: {self.__name__}.{name}(...) was called before any layer "
                    "was built inside the block, so which entry of the pattern it is for is "
                    "unknown; build (linen: init) the model inside the block first."
                )
            i = self._order.class_calls % layers
            self._order.class_calls += 1
            return getattr(self._class(i % len(self._classes)), name)(*args, **kwargs)

        return by_layer


def _stock_homes(api: str):
    """``(home modules, {attribute: original})`` of Flax's stock attention classes."""
    if api == LINEN:
        import flax.linen
        import flax.linen.attention

        targets = _LINEN_TARGETS
        originals = {a: getattr(flax.linen.attention, a) for a in targets}
        return [flax.linen, flax.linen.attention], originals
    import flax.nnx
    import flax.nnx.nn.attention

    originals = {a: getattr(flax.nnx.nn.attention, a) for a in _NNX_TARGETS}
    return [flax.nnx, flax.nnx.nn.attention], originals


def _entry_class(entry, api, adapter, target, attr, options):
    """The class a pattern entry builds in place of ``target`` (``None``: the target)."""
    if isinstance(entry, str) and entry == ATTENTION:
        return None
    mixer = get_mixer(entry, api) if isinstance(entry, str) else entry
    if not isinstance(mixer, type):
        raise TypeError(f"swap_attention needs a mixer class, got {mixer!r}.")
    if adapter is not None:
        from flax_linoss.zoo.adapters import adapted_class

        return adapted_class(adapter, mixer, target=target, options=options)
    if options:
        mixer = type(mixer.__name__, (mixer,), {"__module__": mixer.__module__})
        _bind_options(mixer, options, api)
    if api == LINEN and attr == "SelfAttention":
        from flax_linoss.mixers.linen import as_self_attention

        return as_self_attention(mixer)
    return mixer


def _bind_options(cls: type, options: Mapping[str, Any], api: str) -> None:
    """Makes ``options`` the constructor defaults of ``cls`` (a fresh subclass)."""
    if api == LINEN:
        for name in options:
            if name not in cls.__dataclass_fields__:
                raise TypeError(f"{cls.__name__} has no field {name!r} (swap option).")
        original_post_init = cls.__post_init__

        def __post_init__(self):
            for name, value in options.items():
                object.__setattr__(self, name, value)
            original_post_init(self)

        cls.__post_init__ = __post_init__
        return
    original_init = cls.__init__

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **{**kwargs, **options})

    cls.__init__ = __init__


def _resolve_adapter(adapter, api):
    if adapter is None:
        return None
    from flax_linoss.zoo.adapters import LinenAdapter, NnxAdapter, get_adapter

    cls = get_adapter(adapter, api) if isinstance(adapter, str) else adapter
    base = NnxAdapter if api == NNX else LinenAdapter
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(
            f"swap_attention(api={api!r}): adapter must be a registered name or a subclass of "
            f"flax_linoss.{base.__name__}, got {adapter!r}."
        )
    return cls


@contextlib.contextmanager
def swap_attention(
    mixer: str | type,
    *,
    target: type | str | None = None,
    adapter: str | type | None = None,
    api: str | None = None,
    namespaces: Iterable[ModuleType | Any] = (),
    options: Mapping[str, Any] | None = None,
) -> Iterator[Swap]:
    """Builds ``mixer`` wherever a codebase builds its attention, inside the ``with`` block.

    Example, flax's Gemma example (nnx), two LinOSS layers then one attention layer,
    repeated::

        with flax_linoss.swap_attention(
            "linoss-im,linoss-im,attention", target=modules.Attention, adapter="gemma"
        ):
            model = transformer.Transformer(config, rngs=nnx.Rngs(0))

    and Flax's stock attention (``flax.linen.MultiHeadDotProductAttention``,
    ``MultiHeadAttention``, ``SelfAttention``; or ``flax.nnx.MultiHeadAttention``)::

        with swap_attention("linoss-im"):
            variables = model.init(key, tokens)          # linen: init AND apply inside
            logits = model.apply(variables, tokens)

    What it patches: the name of ``target`` in its defining module (every attribute there
    that is the target) and in each of ``namespaces`` (modules or objects that bound it
    earlier, e.g. ``from modules import Attention``); for the stock Flax classes, their
    names in ``flax.linen`` / ``flax.nnx`` and the modules that define them. Leaving the
    block restores every attribute, also on error; nesting works (the inner block wins).

    Limits (read these):
      * It reaches code that looks the class up *when it builds the layer*. Names bound
        before the block are missed unless listed in ``namespaces``: a default argument
        (``attn_cls=Attention``), a dataclass field default, a subclass defined earlier.
      * nnx modules keep what they were built with, so only construction needs the block.
        linen rebuilds submodules at every ``init``/``apply``: run ``init``, ``apply`` and
        the first call (trace) of every ``jax.jit``-ed function inside the block.
      * It is process-global and not thread-safe against other threads building the same
        classes at the same time.
      * Parameter trees differ from attention's, so attention checkpoints do not load.

    Args:
      mixer: a registered mixer name, a mixer class, or a comma-separated pattern
        (``"linoss-im,linoss-im,attention"``) assigned layer by layer in construction order
        and repeated; :data:`ATTENTION` keeps the target class for that layer. (linen: in
        the order module paths are first built, so ``init`` and ``apply`` agree.)
      target: the attention class to replace (the class, or ``"package.module.Class"``);
        default: Flax's stock attention classes.
      adapter: how the target's constructor and call map onto the mixer: a name registered
        with :func:`flax_linoss.register_adapter` (``"gemma"`` ships) or an adapter class
        (:class:`flax_linoss.NnxAdapter` / :class:`flax_linoss.LinenAdapter`). ``None``: the
        mixer is called like the target (Flax's attention signature).
      api: ``"linen"`` or ``"nnx"``; default: the target's (else ``"linen"``).
      namespaces: more modules/objects to patch (only attributes that hold the target).
      options: keyword arguments for every mixer built (e.g. ``{"state_size": 64}``).

    Yields:
      A :class:`Swap`: the pattern, the class of each entry and the classes built.

    Raises:
      ValueError: on leaving the block, when no instance of the target was built inside it
        (the codebase looked the class up elsewhere: list that module in ``namespaces``).
    """
    if target is None:
        target_cls = None
    elif isinstance(target, str):
        target_cls = _import_target(target)
    else:
        target_cls = target
    if target_cls is not None and not isinstance(target_cls, type):
        raise TypeError(f"swap_attention: target must be a class, got {target_cls!r}.")
    api = _api_of(target_cls, adapter, api)
    adapter_cls = _resolve_adapter(adapter, api)
    options = dict(options or {})
    entries = _entries(mixer)
    if all(isinstance(e, str) and e == ATTENTION for e in entries):
        raise ValueError(f"swap_attention: the pattern {mixer!r} names no mixer.")

    if target_cls is None:
        homes, originals = _stock_homes(api)
    else:
        homes = [_home(target_cls)]
        originals = {target_cls.__name__: target_cls}
    order = _Order(api, len(entries))
    classes_by_attr = {
        attr: tuple(_entry_class(e, api, adapter_cls, orig, attr, options) for e in entries)
        for attr, orig in originals.items()
    }
    first = next(iter(classes_by_attr.values()))
    swap = Swap(pattern=entries, classes=first)
    dispatchers = {
        attr: _Dispatcher(orig, classes_by_attr[attr], order, swap, attr)
        for attr, orig in originals.items()
    }
    by_original = {id(orig): dispatchers[attr] for attr, orig in originals.items()}
    patched: list[tuple[Any, str, Any]] = []
    with _LOCK:
        try:
            for space in [*homes, *namespaces]:
                for attr, value in list(_items(space)):
                    if id(value) in by_original:
                        patched.append((space, attr, value))
                        _set(space, attr, by_original[id(value)])
        except BaseException:
            _undo(patched)
            raise
    failed = False
    try:
        yield swap
    except BaseException:
        failed = True
        raise
    finally:
        with _LOCK:
            _undo(patched)
        if not failed and not swap.built:
            names = ", ".join(f"{o.__module__}.{o.__qualname__}" for o in originals.values())
            raise ValueError(
                f"swap_attention: no {names} was built inside the block, so nothing was "
                "swapped. The code must build the layer inside the block (linen: run init "
                "and apply inside it) and look the class up where it was patched; if it "
                "bound the class earlier (`from module import Attention`), list that "
                "module in namespaces=[...]."
            )


def _home(target: type) -> Any:
    """Where ``target`` is looked up by the code beside it: its module, or (a class defined
    in code run with ``exec``, which has no module) its methods' global namespace."""
    module = sys.modules.get(target.__module__)
    if module is not None:
        return module
    for value in vars(target).values():
        if hasattr(value, "__globals__"):
            return value.__globals__
    raise ValueError(
        f"swap_attention: cannot find where {target.__qualname__} is looked up (module "
        f"{target.__module__!r} is not imported); pass namespaces=[...]."
    )


def _items(space: Any):
    if isinstance(space, dict):
        return space.items()
    if hasattr(space, "__dict__"):
        return vars(space).items()
    return ((a, getattr(space, a, None)) for a in dir(space))


def _set(space: Any, attr: str, value: Any) -> None:
    if isinstance(space, dict):
        space[attr] = value
    else:
        setattr(space, attr, value)


def _undo(patched: list[tuple[Any, str, Any]]) -> None:
    for obj, attr, value in reversed(patched):
        _set(obj, attr, value)
