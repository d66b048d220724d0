"""One module per scan path (see :mod:`flax_linoss.ops.table` for the table of them).

Each module has ``run(tr, v, z0, y0, flags) -> (ys, z_L, y_L)`` (the
:class:`~flax_linoss.ops.table.ScanRun` contract): ``tr`` the transition on ``Q`` real
channels (each field ``[Q]``, or per step in the path's layout), ``v`` the forcing in the
path's layout, ``z0, y0`` the ``[N, Q]`` initial state, ``flags`` a :class:`._common.Flags`
or ``None``. Private: use ``flax_linoss.ops.linoss_apply(..., scan=name)``.
"""
