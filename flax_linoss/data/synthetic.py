"""Built-in synthetic tasks (no download): oscillator forecasting, long-range classification and
an irregularly sampled oscillator.

The token tasks for comparing sequence mixers (MQAR, selective copying, induction heads) are
in :mod:`flax_linoss.data.lm_tasks`.

Both are deterministic by seed, example by example: example ``i`` of a generator called with
``seed`` is drawn from ``numpy.random.default_rng([*seed, i])`` (``seed`` an int or a tuple of
ints), so it does not depend on how many examples are asked for. Arrays are float32 series
``[N, L, C]`` and int32 labels ``[N]`` or float32 targets ``[N, L_out, C_out]``; the
``*Source`` classes give the same examples through the random-access interface of
:mod:`flax_linoss.data.loader`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "OSCILLATOR_KINDS",
    "IrregularOscillatorSource",
    "LongRangeSource",
    "example_rng",
    "irregular_oscillator_example",
    "long_range_classification",
    "long_range_example",
    "oscillator_forecasting",
    "simulate_pendulums",
]

Seed = int | Sequence[int]

#: Oscillator families of :func:`oscillator_forecasting`.
OSCILLATOR_KINDS = ("damped", "driven", "windy", "coupled")


def example_rng(seed: Seed, i: int) -> np.random.Generator:
    """The generator of example ``i``: ``numpy.random.default_rng([*seed, i])``."""
    seed = [int(seed)] if np.isscalar(seed) else [int(s) for s in seed]
    return np.random.default_rng([*seed, int(i)])


# ----------------------------------------------------------------------------- oscillators


def _accel(state: np.ndarray, t: float, p: dict[str, np.ndarray]) -> np.ndarray:
    """d/dt of ``[theta1, omega1, theta2, omega2]`` for two pendulums ([N, 4])."""
    th1, w1, th2, w2 = state.T
    wind = p["wind0"] + p["gust_amp"] * (
        np.sin(p["gust_freq1"] * t + p["gust_phase1"])
        + 0.5 * np.sin(p["gust_freq2"] * t + p["gust_phase2"])
    )
    drive = p["drive_amp"] * np.cos(p["drive_freq"] * t)
    a1 = (
        -p["w0sq1"] * np.sin(th1)
        - p["gamma"] * w1
        - p["k"] * (th1 - th2)
        + drive
        + wind * np.cos(th1)
    )
    a2 = -p["w0sq2"] * np.sin(th2) - p["gamma"] * w2 - p["k"] * (th2 - th1) + wind * np.cos(th2)
    return np.stack([w1, a1, w2, a2], axis=1)


def simulate_pendulums(
    params: dict[str, np.ndarray], state0: np.ndarray, num_steps: int, dt: float, substeps: int
) -> np.ndarray:
    """Integrates two (possibly coupled, damped, driven, wind-forced) pendulums with RK4.

    ``theta_i'' = -w0sq_i sin(theta_i) - gamma theta_i' - k (theta_i - theta_j) + F_i(t)``,
    with drive ``drive_amp cos(drive_freq t)`` on pendulum 1 and a horizontal wind torque
    ``wind(t) cos(theta_i)`` on both.

    Args:
        params: Per-example parameters, each ``[N]``.
        state0: ``[N, 4]`` initial ``(theta1, omega1, theta2, omega2)``.
        num_steps: Number of output samples ``T``.
        dt: Time between output samples.
        substeps: RK4 steps per output sample (step ``dt / substeps``).

    Returns:
        ``[N, T, 4]`` states at times ``0, dt, ..., (T - 1) dt``.
    """
    h = dt / substeps
    s = state0.astype(np.float64)
    out = np.empty((s.shape[0], num_steps, 4))
    t = 0.0
    for n in range(num_steps):
        out[:, n] = s
        for _ in range(substeps):
            k1 = _accel(s, t, params)
            k2 = _accel(s + 0.5 * h * k1, t + 0.5 * h, params)
            k3 = _accel(s + 0.5 * h * k2, t + 0.5 * h, params)
            k4 = _accel(s + h * k3, t + h, params)
            s = s + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
            t += h
    return out


def _oscillator_params(rng: np.random.Generator, kind: str) -> tuple[dict[str, float], list]:
    p = dict.fromkeys(
        (
            "k",
            "drive_amp",
            "drive_freq",
            "wind0",
            "gust_amp",
            "gust_freq1",
            "gust_freq2",
            "gust_phase1",
            "gust_phase2",
        ),
        0.0,
    )
    p["w0sq1"] = rng.uniform(2.0, 12.0)  # g / l
    p["w0sq2"] = rng.uniform(2.0, 12.0)
    p["gamma"] = rng.uniform(0.05, 0.5)
    if kind == "driven":
        p["drive_amp"] = rng.uniform(0.5, 2.0)
        p["drive_freq"] = rng.uniform(0.5, 1.5) * np.sqrt(p["w0sq1"])
    elif kind == "windy":
        p["wind0"] = rng.uniform(-1.0, 1.0)
        p["gust_amp"] = rng.uniform(0.5, 2.0)
        p["gust_freq1"], p["gust_freq2"] = rng.uniform(0.2, 2.0, size=2)
        p["gust_phase1"], p["gust_phase2"] = rng.uniform(0, 2 * np.pi, size=2)
    elif kind == "coupled":
        p["k"] = rng.uniform(0.5, 4.0)
    state = [rng.uniform(-1.2, 1.2), rng.uniform(-1.0, 1.0), 0.0, 0.0]
    if kind == "coupled":
        state[2], state[3] = rng.uniform(-1.2, 1.2), rng.uniform(-1.0, 1.0)
    return p, state


def oscillator_forecasting(
    num_examples: int,
    *,
    seed: Seed = 0,
    kind: str = "mixed",
    input_length: int = 256,
    output_length: int = 64,
    dt: float = 0.05,
    substeps: int = 4,
    noise_std: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Forecast pendulum positions: given ``input_length`` past samples, predict the next ones.

    Each example is a pendulum system with random parameters and initial state, integrated
    with RK4 (``substeps`` steps per sample of spacing ``dt``):

    * ``damped``: ``theta'' = -(g/l) sin(theta) - gamma theta'``;
    * ``driven``: plus a periodic drive ``F cos(Omega t)``;
    * ``windy``: plus a gusty horizontal wind torque ``w(t) cos(theta)``;
    * ``coupled``: two damped pendulums joined by a spring ``k (theta_1 - theta_2)``.

    Channels (positions, 2 for every kind): the bob's Cartesian ``(sin theta, -cos theta)``
    (unit length) for one pendulum, ``(sin theta_1, sin theta_2)`` for the coupled pair.

    Args:
        num_examples: ``N``.
        seed: Int or tuple of ints; example ``i`` uses ``default_rng([*seed, i])``.
        kind: One of :data:`OSCILLATOR_KINDS`, or ``"mixed"`` (kind drawn per example).
        input_length: ``L_in`` observed samples.
        output_length: ``L_out`` samples to predict.
        dt: Time between samples.
        substeps: RK4 steps per sample.
        noise_std: Gaussian observation noise added to the inputs only.

    Returns:
        ``(x float32 [N, L_in, 2], y float32 [N, L_out, 2])``, ``y`` the noise-free positions
        right after ``x``.
    """
    if kind != "mixed" and kind not in OSCILLATOR_KINDS:
        raise ValueError(f"kind must be 'mixed' or one of {OSCILLATOR_KINDS}, got {kind!r}")
    if num_examples < 1 or input_length < 1 or output_length < 1:
        raise ValueError("num_examples, input_length and output_length must be >= 1")
    kinds, plist, states, noise = [], [], [], []
    for i in range(num_examples):
        rng = example_rng(seed, i)
        k = OSCILLATOR_KINDS[rng.integers(len(OSCILLATOR_KINDS))] if kind == "mixed" else kind
        p, s = _oscillator_params(rng, k)
        kinds.append(k)
        plist.append(p)
        states.append(s)
        noise.append(rng.standard_normal((input_length, 2)) if noise_std > 0 else None)
    params = {key: np.array([p[key] for p in plist]) for key in plist[0]}
    traj = simulate_pendulums(params, np.array(states), input_length + output_length, dt, substeps)
    th1, th2 = traj[..., 0], traj[..., 2]
    coupled = np.array([k == "coupled" for k in kinds])[:, None]
    pos = np.stack(
        [np.sin(th1), np.where(coupled, np.sin(th2), -np.cos(th1))], axis=-1
    )  # [N, T, 2]
    x = pos[:, :input_length].copy()
    if noise_std > 0:
        x += noise_std * np.stack(noise)
    y = pos[:, input_length:]
    return x.astype(np.float32), y.astype(np.float32)


# ----------------------------------------------------------------------------- long range


def _codebook(num_classes: int, cue_length: int) -> np.ndarray:
    """Fixed, zero-mean +-1 codes ``[num_classes, cue_length]`` (same for every seed)."""
    rng = np.random.default_rng([20250, num_classes, cue_length])
    half = np.array([1.0] * (cue_length // 2) + [-1.0] * (cue_length - cue_length // 2))
    codes = []
    while len(codes) < num_classes:
        c = rng.permutation(half)
        if not any(np.array_equal(c, d) for d in codes):
            codes.append(c)
    return np.stack(codes)


def long_range_example(
    index: int,
    *,
    seed: Seed = 0,
    length: int = 4096,
    num_classes: int = 4,
    cue_length: int = 16,
    cue_region: float = 0.1,
    noise_std: float = 0.5,
) -> tuple[np.ndarray, int]:
    """Example ``index`` of :func:`long_range_classification`: ``(x float32 [L, 1], label)``."""
    if length < 1 or cue_length < 2 or num_classes < 2:
        raise ValueError("need length >= 1, cue_length >= 2 and num_classes >= 2")
    region = int(cue_region * length)
    if region < cue_length:
        raise ValueError(
            f"cue_region * length = {region} steps cannot hold a cue of {cue_length} steps; "
            "use a longer sequence, a larger cue_region or a shorter cue"
        )
    if num_classes > 2 ** (cue_length - 1):
        raise ValueError(f"cue_length {cue_length} is too short for {num_classes} classes")
    rng = example_rng(seed, index)
    label = int(rng.integers(num_classes))
    start = int(rng.integers(region - cue_length + 1))
    x = (noise_std * rng.standard_normal(length)).astype(np.float32)
    x[start : start + cue_length] += _codebook(num_classes, cue_length)[label].astype(np.float32)
    return x[:, None], label


def long_range_classification(
    num_examples: int,
    *,
    seed: Seed = 0,
    length: int = 4096,
    num_classes: int = 4,
    cue_length: int = 16,
    cue_region: float = 0.1,
    noise_std: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Classify a long noisy sequence by a short cue hidden near its start.

    Each sequence is Gaussian noise (std ``noise_std``) plus, at a random position inside the
    first ``cue_region`` of the sequence, a ``cue_length``-step +-1 code of its class (a
    fixed, zero-mean codebook). The label is recoverable only from that cue, which lies at
    least ``(1 - cue_region) L`` steps before the end: a model reading left to right must
    carry it across nearly the whole sequence. ``length`` may be 10^5 or more; see
    :class:`LongRangeSource` to generate examples lazily.

    Args:
        num_examples: ``N``.
        seed: Int or tuple of ints; example ``i`` uses ``default_rng([*seed, i])``.
        length: ``L``.
        num_classes: Number of classes.
        cue_length: Steps of the class code.
        cue_region: Fraction of the sequence (from the start) where the cue may be.
        noise_std: Background noise level.

    Returns:
        ``(x float32 [N, L, 1], y int32 [N])``.
    """
    kw = dict(
        seed=seed,
        length=length,
        num_classes=num_classes,
        cue_length=cue_length,
        cue_region=cue_region,
        noise_std=noise_std,
    )
    x = np.empty((num_examples, length, 1), np.float32)
    y = np.empty((num_examples,), np.int32)
    for i in range(num_examples):
        x[i], y[i] = long_range_example(i, **kw)
    return x, y


class IndexedSource:
    """Base of the lazily generated sources: ``len`` and a checked index; subclasses set
    ``num_examples`` and implement ``example(i)``."""

    num_examples: int

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = int(i)
        if not 0 <= i < self.num_examples:
            raise IndexError(f"index {i} out of range for {self.num_examples} examples")
        return self.example(i)

    def example(self, i: int) -> dict[str, np.ndarray]:
        raise NotImplementedError


class GeneratedSource(IndexedSource):
    """Examples of a per-index generator, made on demand: ``generate(i, **kwargs)`` returns
    ``(series, label, *more)``, named ``("series", "label", *extra_fields)``."""

    extra_fields: tuple[str, ...] = ()

    def __init__(self, num_examples: int, **kwargs):
        self.num_examples = int(num_examples)
        self.kwargs = kwargs
        self.generate(0, **kwargs)  # validate arguments early

    @staticmethod
    def generate(index: int, **kwargs) -> tuple:
        raise NotImplementedError

    def example(self, i: int) -> dict[str, np.ndarray]:
        x, label, *more = self.generate(i, **self.kwargs)
        return {"series": x, "label": np.int32(label), **dict(zip(self.extra_fields, more))}


class LongRangeSource(GeneratedSource):
    """Random-access source of :func:`long_range_classification` examples, made on demand.

    ``source[i] == {"series": x[i] (float32 [L, 1]), "label": y[i] (int32)}`` for
    ``x, y = long_range_classification(num_examples, **kwargs)``, without holding ``[N, L]``
    in memory.
    """

    generate = staticmethod(long_range_example)


# ----------------------------------------------------------------------- irregular sampling


def irregular_oscillator_example(
    index: int,
    *,
    seed: Seed = 0,
    length: int = 64,
    num_classes: int = 4,
    min_duration: float = 8.0,
    max_duration: float = 32.0,
    min_frequency: float = 0.2,
    max_frequency: float = 0.8,
    damping: float = 0.02,
    noise_std: float = 0.05,
) -> tuple[np.ndarray, int, np.ndarray]:
    """Example ``index`` of the irregularly sampled oscillator task.

    A damped oscillation ``A exp(-damping t) cos(2 pi f t + phi) + noise`` observed at
    ``length`` random times (sorted, uniform over a window of ``T`` time units); the class is
    the frequency band of ``f`` (``num_classes`` equal bands, on a log scale, between
    ``min_frequency`` and ``max_frequency`` cycles per time unit). The window ``T`` is drawn
    per example from ``[min_duration, max_duration]``, so the number of cycles per
    observation says nothing about ``f`` without the times: a model that ignores the
    timestamps sees the bands overlap (by the default factor 4 of ``T`` against a factor 4
    of ``f``), one that uses them can tell them apart.

    Returns:
        ``(x float32 [L, 1], label, timestamps float32 [L])``, the times in time units from
        the window's start (increasing).
    """
    if length < 2 or num_classes < 2:
        raise ValueError("need length >= 2 and num_classes >= 2")
    if not 0 < min_duration <= max_duration or not 0 < min_frequency < max_frequency:
        raise ValueError(
            "need 0 < min_duration <= max_duration and 0 < min_frequency < max_frequency"
        )
    rng = example_rng(seed, index)
    label = int(rng.integers(num_classes))
    edges = np.geomspace(min_frequency, max_frequency, num_classes + 1)
    freq = np.exp(rng.uniform(np.log(edges[label]), np.log(edges[label + 1])))
    duration = rng.uniform(min_duration, max_duration)
    t = np.sort(rng.uniform(0.0, duration, length))
    amp, phase = rng.uniform(0.5, 1.5), rng.uniform(0.0, 2 * np.pi)
    x = amp * np.exp(-damping * t) * np.cos(2 * np.pi * freq * t + phase)
    x = x + noise_std * rng.standard_normal(length)
    return x.astype(np.float32)[:, None], label, t.astype(np.float32)


class IrregularOscillatorSource(GeneratedSource):
    """Random-access source of :func:`irregular_oscillator_example` examples, made on demand.

    ``source[i] == {"series": float32 [L, 1], "label": int32, "timestamps": float32 [L]}``.
    """

    generate = staticmethod(irregular_oscillator_example)
    extra_fields = ("timestamps",)
