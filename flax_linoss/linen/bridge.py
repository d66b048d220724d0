"""linen modules derived from the library's nnx modules (the one source of each layer).

:class:`NnxSkin` is a linen module that runs an nnx module. At ``init`` it builds the nnx
module with keys from linen's ``"params"`` stream and stores its variables in linen
collections; at ``apply`` it builds the module abstractly (``nnx.eval_shape``, no
initialiser runs), loads this scope's variables into it, runs it, and writes back the
collections that are mutable. Sizes that nnx takes up front (``in_features``) come from the
input, as linen users expect.

Variables map one to one, by the names of :func:`flax.nnx.variablelib.variable_name_from_type`:
``nnx.Param`` -> ``"params"``, ``nnx.BatchStat`` -> ``"batch_stats"``, ``nnx.Cache`` ->
``"cache"``. Paths follow linen's naming of submodules: an nnx list item ``blocks[3]`` is the
linen submodule ``blocks_3`` (:func:`linen_path`), so the trees are those of hand-written
linen modules, and :mod:`flax_linoss.convert` maps one API's variables onto the other's.

:func:`derive` makes the linen class of an nnx class: its dataclass fields are the nnx
constructor's arguments (same names, order and defaults), less ``rngs`` and the sizes that
are read off the input. Why not :class:`flax.nnx.bridge.ToLinen`: it needs every size at
construction, rebuilds (and re-initialises) the module on every call, and names list items
``blocks/0`` (integer keys) instead of linen's ``blocks_0``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.errors
import flax.linen as nn
import jax
from flax import nnx
from flax.core import meta
from flax.nnx import variablelib

__all__ = ["NnxSkin", "Size", "derive", "linen_path", "nnx_fields"]


def linen_path(path: tuple) -> tuple[str, ...]:
    """An nnx variable path as a linen one: a name followed by a list index becomes
    ``name_index`` (``("blocks", 3, "ssm", "b") -> ("blocks_3", "ssm", "b")``)."""
    out: list[str] = []
    for part in path:
        if isinstance(part, int):
            if not out:
                raise ValueError(f"Cannot map nnx path {path} to linen: it starts with an index.")
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(str(part))
    return tuple(out)


def collection_of(variable: nnx.Variable) -> str:
    """The linen collection of an nnx variable (``params``, ``batch_stats``, ``cache``)."""
    return variablelib.variable_name_from_type(type(variable), allow_register=True)


def _lookup(tree: Mapping, path: tuple[str, ...]):
    for part in path:
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _nest(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _variables(module: nnx.Module) -> list[tuple[tuple[str, ...], nnx.Variable]]:
    """``(linen path, variable)`` for every variable of ``module`` except RNG state."""
    state = nnx.state(module, nnx.Not(nnx.RngState))
    return [(linen_path(p), v) for p, v in nnx.to_flat_state(state)]


class NnxSkin(nn.Module):
    """A linen module whose computation is an nnx module's (see the module docstring).

    Subclasses implement :meth:`build` and call :meth:`run` from their ``__call__``.
    """

    def build(self, inputs: Any, rngs: nnx.Rngs, scratch: dict[str, Any]) -> nnx.Module:
        """The nnx module for ``inputs`` (the call's first argument). ``scratch`` is a dict
        for this call, shared with :meth:`box`."""
        raise NotImplementedError

    def box(
        self, path: tuple[str, ...], variable: nnx.Variable, value: Any, scratch: dict[str, Any]
    ) -> Any:
        """How a variable's value is stored in linen (override to add axis metadata)."""
        del path, variable, scratch
        return value

    def run(
        self,
        inputs: Any,
        call: Callable[[nnx.Module], Any],
        *,
        dropout: bool = False,
        dropout_rng: jax.Array | None = None,
        prepare: Callable[[nnx.Module, bool], None] | None = None,
    ) -> Any:
        """Builds or restores the nnx module, returns ``call(module)``, stores its variables.

        Args:
          inputs: the call's first argument (read by :meth:`build` for sizes).
          call: runs the module.
          dropout: whether the call draws dropout masks (needs the ``"dropout"`` stream, or
            ``dropout_rng``).
          dropout_rng: an explicit dropout key (else ``self.make_rng("dropout")``).
          prepare: ``(module, fresh)`` hook run before the variables are loaded (e.g. to
            create decoding caches that exist in the linen collections).
        """
        fresh = self.is_initializing() and not self.variables
        key = dropout_rng
        if dropout and key is None:
            key = self.make_rng("dropout")  # raises linen's error when there is none
        scratch: dict[str, Any] = {}
        if fresh:
            rngs = nnx.Rngs(params=self.make_rng("params"), dropout=0 if key is None else key)
            module = self.build(inputs, rngs, scratch)
            if prepare is not None:
                prepare(module, True)
            loaded: dict[int, Any] = {}
        else:
            # Built abstractly to receive the stored variables: no sharding at construction
            # (logical axis rules in effect for the call are for the computation).
            with nn.logical_axis_rules(()):
                module = nnx.eval_shape(
                    lambda: self.build(inputs, nnx.Rngs(params=0, dropout=0), scratch)
                )
            if prepare is not None:
                prepare(module, False)
            loaded = self._load(module)
            if key is not None:
                nnx.reseed(module, dropout=key)
        out = call(module)
        self._store(module, fresh, loaded, scratch)
        return out

    def _load(self, module: nnx.Module) -> dict[int, Any]:
        values = {}
        for path, var in _variables(module):
            collection = collection_of(var)
            value = _lookup(self.variables.get(collection, {}), path)
            if value is None:
                raise ValueError(
                    f"{type(self).__name__} ({'/'.join(self.scope.path) or 'top'}): the "
                    f"variables lack {collection}/{'/'.join(path)}; they were made for "
                    "another configuration of this module."
                )
            value = meta.unbox(value)
            if tuple(value.shape) != tuple(var.shape):
                raise ValueError(
                    f"{type(self).__name__}: {collection}/{'/'.join(path)} has shape "
                    f"{tuple(value.shape)} but this configuration needs {tuple(var.shape)}."
                )
            var.set_value(value)
            values[id(var)] = value
        return values

    def _store(
        self, module: nnx.Module, fresh: bool, loaded: dict[int, Any], scratch: dict[str, Any]
    ) -> None:
        by_collection: dict[str, dict[tuple[str, ...], Any]] = {}
        for path, var in _variables(module):
            collection = collection_of(var)
            value = var.get_value()
            if fresh or self.is_mutable_collection(collection):
                by_collection.setdefault(collection, {})[path] = self.box(path, var, value, scratch)
            elif loaded.get(id(var)) is not value:
                # As linen modules do: updating an immutable collection is an error.
                raise flax.errors.ModifyScopeVariableError(
                    collection, "/".join(path), "/".join(self.scope.path)
                )
        for collection, flat in by_collection.items():
            for name, value in _nest(flat).items():
                self.put_variable(collection, name, value)


class Size(NamedTuple):
    """A constructor size that linen reads off the input at ``init`` and off the variables
    at ``apply`` (so a wrong input meets the nnx module's own check, as in nnx)."""

    from_input: Callable[[Any], int]
    from_variables: Callable[[Mapping[str, Any]], int]


def _deterministic(skin: nn.Module, kwargs: dict[str, Any]) -> bool | None:
    """linen's rule for ``deterministic``: the call argument, else the attribute."""
    return nn.merge_param("deterministic", skin.deterministic, kwargs.pop("deterministic", None))


def nnx_fields(
    nnx_class: type[nnx.Module],
    names: list[str] | None = None,
    *,
    exclude: tuple[str, ...] = (),
    linen_defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Linen dataclass fields (a class namespace: ``__annotations__`` and defaults) taken
    from ``nnx_class``'s constructor: the arguments ``names`` (default: all of them, less
    ``self``, ``rngs`` and ``exclude``), in that order, with the nnx annotations and
    defaults (``linen_defaults`` override a default)."""
    params = inspect.signature(nnx_class.__init__).parameters
    if names is None:
        names = [n for n in params if n not in ("self", "rngs", *exclude)]
    linen_defaults = dict(linen_defaults or {})
    namespace: dict[str, Any] = {"__annotations__": {n: params[n].annotation for n in names}}
    for name in names:
        if name in linen_defaults:
            namespace[name] = linen_defaults[name]
        elif params[name].default is not inspect.Parameter.empty:
            namespace[name] = params[name].default
    return namespace


def derive(
    nnx_class: type[nnx.Module],
    *,
    inferred: Mapping[str, Size],
    module: str,
    linen_defaults: Mapping[str, Any] | None = None,
) -> type[NnxSkin]:
    """The linen class of ``nnx_class``.

    Args:
      nnx_class: an nnx module class whose constructor takes ``rngs``.
      inferred: constructor sizes read off the call's first argument at ``init`` and off the
        variables at ``apply`` (:class:`Size`); they are not fields of the linen class.
      module: the ``__module__`` of the new class (where users import it from).
      linen_defaults: fields whose linen default differs (``deterministic=None``: linen's
        ``merge_param`` convention).

    Returns:
      A linen module class with the nnx constructor's arguments as fields and the nnx
      ``__call__``'s arguments. A ``deterministic`` field follows linen's ``merge_param``
      rule, and dropout keys come from the ``"dropout"`` stream.
    """
    namespace = nnx_fields(nnx_class, exclude=tuple(inferred), linen_defaults=linen_defaults)
    namespace["__module__"] = module
    names = list(namespace["__annotations__"])
    has_deterministic = "deterministic" in names

    def build(self, inputs, rngs, scratch):
        del scratch
        fresh = self.is_initializing() and not self.variables
        variables = meta.unbox(self.variables)
        sizes = {
            name: size.from_input(inputs) if fresh else size.from_variables(variables)
            for name, size in inferred.items()
        }
        kwargs = {name: getattr(self, name) for name in names}
        if has_deterministic and kwargs["deterministic"] is None:
            kwargs["deterministic"] = False
        return nnx_class(**sizes, **kwargs, rngs=rngs)

    @nn.compact
    def __call__(self, inputs, *args, **kwargs):
        dropout = False
        if has_deterministic:
            deterministic = _deterministic(self, kwargs)
            kwargs["deterministic"] = deterministic
            dropout = not deterministic and getattr(self, "dropout_rate", 0.0) > 0.0
        return self.run(inputs, lambda m: m(inputs, *args, **kwargs), dropout=dropout)

    namespace["build"] = build
    namespace["__call__"] = __call__
    namespace["__doc__"] = (
        f"linen form of :class:`{nnx_class.__module__}.{nnx_class.__name__}`: the same "
        f"arguments less ``rngs`` and {', '.join(f'``{n}``' for n in inferred)} (read off "
        "the input), the same call, parameters and results; batch statistics live in the "
        f'``"batch_stats"`` collection.\n\n{inspect.getdoc(nnx_class) or ""}'
    )
    cls = type(nnx_class.__name__, (NnxSkin,), namespace)
    cls.__qualname__ = nnx_class.__name__
    cls.__call__.__doc__ = inspect.getdoc(nnx_class.__call__)
    return cls
