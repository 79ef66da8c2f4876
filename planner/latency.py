"""Per-layer-type linear latency models (Edgent Table I), stored as plain JSON coefficients.

A model maps a layer type ("conv", "relu", ...) to a linear function of that layer's variables;
types it does not know fall back to its "other" entry. Predictions are clamped at zero: the
published Raspberry Pi convolution model has a negative intercept.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from planner.errors import LatencyModelError, reject_unknown

FORMAT = "coinfer.latency/1"
FALLBACK = "other"
UNIT_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
# Edgent Table I: the independent variables per layer type.
TABLE_I_VARIABLES: dict[str, tuple[str, ...]] = {
    "conv": ("input_bytes", "filter_term"),
    "relu": ("input_bytes",),
    "pool": ("input_bytes", "output_bytes"),
    "lrn": ("input_bytes",),
    "dropout": ("input_bytes",),
    "fc": ("input_bytes", "output_bytes"),
    "load": ("model_bytes",),
    FALLBACK: ("flops", "input_bytes", "output_bytes"),
}
# What ``fit`` uses by default: Table I plus FLOPs for conv and fc, whose cost is a product of sizes
# that Table I's additive variables cannot express.
FIT_VARIABLES: dict[str, tuple[str, ...]] = {
    **TABLE_I_VARIABLES,
    "conv": ("input_bytes", "filter_term", "flops"),
    "fc": ("input_bytes", "output_bytes", "flops", "param_bytes"),  # one row: reading the weights is the cost
    # what real ImageNet models add (``models.graph.KIND_OF_OP``): a depthwise or grouped conv and a MatMul are
    # priced by their FLOPs and bytes; the rest move or touch every element once
    "dwconv": ("input_bytes", "output_bytes", "flops", "strided_flops", "kernel_groups"),
    "matmul": ("input_bytes", "output_bytes", "flops"),
    "add": ("input_bytes", "output_bytes"),
    "concat": ("input_bytes", "output_bytes"),
    "softmax": ("input_bytes",),
    "norm": ("input_bytes",),
    "act": ("input_bytes",),  # a clip or a piecewise-linear function per element
    "act_exp": ("input_bytes",),  # an exponential or error function per element (sigmoid, GELU's erf, tanh)
    "reshape": ("input_bytes",),
}
MIN_HOLDOUT_SAMPLES = 8
PHASES = 64  # points at which ``CpuQuota.wall_s`` averages over where in a period an idle host starts
QUOTA_STARTS = ("refill", "idle")


@dataclass(frozen=True, slots=True, kw_only=True)
class CpuQuota:
    """A CFS bandwidth limit: ``quota_s`` of CPU per ``period_s`` (cgroup ``cpu.cfs_quota_us`` / ``cpu.max``).

    Such a host is not uniformly slower: a burst that fits in the quota left in the current period runs
    at full speed; a longer one is throttled until each refill. ``wall_s`` is the expected wall time of a
    burst that starts with a full quota, either at a refill (``start="refill"``: a busy host, whose previous
    work ran the quota out, resumes there) or at a uniformly random point of a period (``start="idle"``).
    """

    quota_s: float
    period_s: float
    start: str = "refill"

    def __post_init__(self) -> None:
        if not 0 < self.quota_s <= self.period_s:
            raise LatencyModelError(f"bad CPU quota {self.quota_s} s per {self.period_s} s")
        if self.start not in QUOTA_STARTS:
            raise LatencyModelError(f"CPU quota start {self.start!r} is not one of {', '.join(QUOTA_STARTS)}")

    def wall_s(self, cpu_s: npt.ArrayLike) -> npt.NDArray[np.float64]:
        c = np.asarray(cpu_s, dtype=np.float64)[..., None]
        if self.start == "refill":
            left = np.full(1, self.period_s)  # time to the next refill
        else:
            left = (np.arange(PHASES) + 0.5) / PHASES * self.period_s
        first = np.minimum(self.quota_s, left)  # CPU it gets before that refill
        rest = np.maximum(c - first, 0.0)
        periods = np.maximum(np.ceil(rest / self.quota_s) - 1, 0)  # whole periods after the refill
        throttled = left + periods * self.period_s + (rest - periods * self.quota_s)
        return np.asarray(np.where(c <= first, c, throttled).mean(axis=-1))

    def to_json(self) -> dict[str, float | str]:
        return {"quota_s": self.quota_s, "period_s": self.period_s, "start": self.start}


@dataclass(frozen=True, slots=True, kw_only=True)
class TypeModel:
    """latency = intercept + sum(coef[i] * variables[i]), in the owning model's unit."""

    variables: tuple[str, ...]
    coef: tuple[float, ...]
    intercept: float
    fit: Mapping[str, float | int | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.variables) != len(self.coef):
            raise LatencyModelError(f"{len(self.variables)} variables but {len(self.coef)} coefficients")

    def raw(self, features: Mapping[str, float]) -> float:
        try:
            return self.intercept + sum(c * features[v] for c, v in zip(self.coef, self.variables, strict=True))
        except KeyError as exc:
            raise LatencyModelError(f"layer lacks variable {exc.args[0]!r}") from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class LatencyModel:
    """Latency models of one host, one ``TypeModel`` per layer type."""

    name: str
    types: Mapping[str, TypeModel]
    unit: str = "ms"
    stage_overhead: float = 0.0  # per executed stage (one runtime call), in ``unit``
    cpu_quota: CpuQuota | None = None  # the host runs under a CFS quota: see ``stage_s``
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.unit not in UNIT_SECONDS:
            raise LatencyModelError(f"unknown latency unit {self.unit!r}; expected one of {list(UNIT_SECONDS)}")

    def predict(self, kind: str, features: Mapping[str, float]) -> float:
        """Predicted latency in seconds of one layer, never negative."""
        model = self.types.get(kind) or self.types.get(FALLBACK)
        if model is None:
            raise LatencyModelError(f"latency model {self.name!r} has no {kind!r} entry and no {FALLBACK!r} fallback")
        return max(0.0, model.raw(features)) * UNIT_SECONDS[self.unit]

    def predict_many(self, layers: Iterable[tuple[str, Mapping[str, float]]]) -> np.ndarray:
        """Predicted latency in seconds of each (type, features) layer."""
        return np.array([self.predict(kind, feats) for kind, feats in layers], dtype=np.float64)

    @property
    def stage_overhead_s(self) -> float:
        return self.stage_overhead * UNIT_SECONDS[self.unit]

    def stage_s(self, compute_s: npt.ArrayLike, *, overhead: bool = True) -> npt.NDArray[np.float64]:
        """Wall seconds of whole stages whose layers' predictions sum to ``compute_s`` (plus the per-stage overhead;
        ``overhead=False``: work outside a stage, such as encoding the input of an edge-only plan)."""
        busy = np.asarray(compute_s, dtype=np.float64) + (self.stage_overhead_s if overhead else 0.0)
        return self.cpu_quota.wall_s(busy) if self.cpu_quota else busy

    def scaled(self, factor: float, stage_overhead_s: float, *, name: str, meta: Mapping[str, Any],
               cpu_quota: CpuQuota | None = None) -> LatencyModel:
        """This model slowed down ``factor`` times, with a new per-stage overhead (see ``calibrate_stages``)."""
        if not factor > 0 or stage_overhead_s < 0:
            raise LatencyModelError(f"bad scaling {factor} / overhead {stage_overhead_s}")
        types = {k: TypeModel(variables=m.variables, coef=tuple(c * factor for c in m.coef),
                              intercept=m.intercept * factor, fit=m.fit) for k, m in self.types.items()}
        return LatencyModel(name=name, types=types, unit=self.unit, cpu_quota=cpu_quota,
                            stage_overhead=stage_overhead_s / UNIT_SECONDS[self.unit], meta=meta)

    def to_json(self) -> dict[str, Any]:
        """The plain-JSON document ``from_json`` reads back."""
        return {
            "format": FORMAT, "name": self.name, "latency_unit": self.unit,
            "stage_overhead": self.stage_overhead, **({"meta": dict(self.meta)} if self.meta else {}),
            **({"cpu_quota": self.cpu_quota.to_json()} if self.cpu_quota else {}),
            "types": {k: {"variables": list(m.variables), "coef": list(m.coef), "intercept": m.intercept,
                          **({"fit": dict(m.fit)} if m.fit else {})} for k, m in self.types.items()},
        }

    @classmethod
    def from_json(cls, doc: Any) -> LatencyModel:
        """Validate and build from a parsed JSON document; unknown keys are rejected."""
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise LatencyModelError(f"not a {FORMAT} document")
        reject_unknown(doc, {"format", "name", "latency_unit", "stage_overhead", "cpu_quota", "meta", "types"},
                        "model", LatencyModelError)
        types_doc = doc.get("types")
        if not isinstance(types_doc, dict) or not types_doc:
            raise LatencyModelError("'types' must be a non-empty object")
        types = {}
        for kind, entry in types_doc.items():
            if not isinstance(entry, dict):
                raise LatencyModelError(f"types.{kind} must be an object")
            reject_unknown(entry, {"variables", "coef", "intercept", "fit"}, f"types.{kind}", LatencyModelError)
            try:
                types[str(kind)] = TypeModel(variables=tuple(str(v) for v in entry["variables"]),
                                             coef=tuple(float(c) for c in entry["coef"]),
                                             intercept=float(entry["intercept"]), fit=dict(entry.get("fit", {})))
            except (KeyError, TypeError, ValueError) as exc:
                raise LatencyModelError(f"types.{kind}: {exc!r}") from exc
        try:
            quota = doc.get("cpu_quota")
            if quota is not None:
                reject_unknown(quota, {"quota_s", "period_s", "start"}, "cpu_quota", LatencyModelError)
                quota = CpuQuota(quota_s=float(quota["quota_s"]), period_s=float(quota["period_s"]),
                                 **({"start": str(quota["start"])} if "start" in quota else {}))
            return cls(name=str(doc.get("name", "unnamed")), types=types, unit=str(doc.get("latency_unit", "ms")),
                       stage_overhead=float(doc.get("stage_overhead", 0.0)), cpu_quota=quota,
                       meta=dict(doc.get("meta", {})))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise LatencyModelError(f"bad model fields: {exc!r}") from exc


@dataclass(frozen=True, slots=True)
class Sample:
    """One measured layer: its type, its variables and its latency in seconds."""

    kind: str
    features: Mapping[str, float]
    latency_s: float


def fit(samples: Sequence[Sample], *, name: str, variables: Mapping[str, tuple[str, ...]] = FIT_VARIABLES,
        holdout: float = 0.25, seed: int = 0, stage_overhead_s: float = 0.0,
        meta: Mapping[str, Any] | None = None) -> LatencyModel:
    """Fit one least-squares regression per layer type; types without variables pool into "other" (when there are
    none, "other" is fitted on every layer, so that a layer of any type can be costed).

    Least squares weighted by 1/latency, so that small layers are fitted in relative rather than only
    absolute terms. Fit quality is measured on a random held-out share of each type's samples (R²,
    median absolute percentage error); the stored coefficients are then refitted on all samples.
    """
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score

    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.kind if s.kind in variables else FALLBACK, []).append(s)
    if FALLBACK not in groups and FALLBACK in variables:  # every layer a known type: the fallback pools them all,
        groups[FALLBACK] = [s for s in samples if s.kind != "load"]  # so that a model of other types still plans
        if not groups[FALLBACK]:
            del groups[FALLBACK]
    rng = np.random.default_rng(seed)
    types = {}
    for kind, group in sorted(groups.items()):
        names = variables[kind]
        x = np.array([[s.features.get(v, 0.0) for v in names] for s in group], dtype=np.float64)
        y = np.array([s.latency_s * 1e3 for s in group])  # fit in milliseconds
        weight = 1.0 / np.maximum(y, 1e-6)
        stats: dict[str, float | int | None] = {"n": len(group), "r2": None, "mdape": None, "n_test": 0}
        if len(group) < len(names) + 1:  # too few samples for every variable: the ones that explain most
            kept = _fewer_variables(x, y, len(group) - 1)
            stats["reduced_from"] = len(names)
            names, x = tuple(names[i] for i in kept), x[:, kept]
        if len(group) >= MIN_HOLDOUT_SAMPLES:
            order = rng.permutation(len(group))
            n_test = max(2, round(holdout * len(group)))
            test, train = order[:n_test], order[n_test:]
            reg = LinearRegression().fit(x[train], y[train], sample_weight=weight[train])
            pred = np.maximum(reg.predict(x[test]), 0.0)
            stats.update(r2=round(float(r2_score(y[test], pred)), 4), n_test=int(n_test),
                         mdape=round(float(np.median(np.abs(pred - y[test]) / np.maximum(y[test], 1e-9))), 4))
        if not names:  # one sample: its time, whatever the layer
            types[kind] = TypeModel(variables=(), coef=(), intercept=float(y.mean()), fit=stats)
            continue
        reg = LinearRegression().fit(x, y, sample_weight=weight)
        types[kind] = TypeModel(variables=names, coef=tuple(float(c) for c in reg.coef_),
                                intercept=float(reg.intercept_), fit=stats)
    return LatencyModel(name=name, types=types, unit="ms", stage_overhead=stage_overhead_s * 1e3,
                        meta=dict(meta or {}))



def _fewer_variables(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], k: int) -> list[int]:
    """The (at most ``k``) columns of ``x`` most correlated with ``y`` in absolute value, constant ones left out
    (a regression with an intercept on ``k + 1`` samples fits ``k`` variables at most)."""
    scores = []
    for i in range(x.shape[1]):
        col = x[:, i]
        if np.ptp(col) > 0 and np.ptp(y) > 0:
            scores.append((abs(float(np.corrcoef(col, y)[0, 1])), i))
    return sorted(i for _, i in sorted(scores, reverse=True)[:max(k, 0)])


def calibrate_stages(predicted_s: Sequence[float], measured_s: Sequence[float],
                     cpu_quota: CpuQuota | None = None) -> tuple[float, float]:
    """(slowdown, per-stage overhead in s) with ``measured = slowdown * predicted + overhead``.

    For a host whose per-layer timings do not add up to what whole stages take, measured whole stages
    calibrate a model fitted elsewhere. Under ``cpu_quota`` the fit is ``measured = quota.wall_s(slowdown *
    predicted + overhead)``: the slowdown is then the CPU-speed ratio alone, the quota's throttling being
    modelled (``CpuQuota``). Least squares on relative errors, so small and large stages count alike.
    """
    x, y = np.asarray(predicted_s, dtype=np.float64), np.asarray(measured_s, dtype=np.float64)
    if x.size < 2 or x.size != y.size or np.ptp(x) <= 0 or (y <= 0).any():
        raise LatencyModelError("calibration needs stages of at least two different predicted sizes")
    if cpu_quota is None:
        w = 1.0 / y
        design = np.stack([x, np.ones_like(x)], axis=1) * w[:, None]
        (slope, overhead), *_ = np.linalg.lstsq(design, y * w, rcond=None)
    else:
        from scipy.optimize import least_squares

        def residuals(p: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
            return cpu_quota.wall_s(p[0] * x + p[1]) / y - 1.0

        fit = least_squares(residuals, x0=[1.0, 1e-3], bounds=([1e-3, 0.0], [1e3, max(float(y.max()), 1e-3)]),
                            x_scale=[1.0, 1e-3])
        slope, overhead = fit.x
    if slope <= 0:
        raise LatencyModelError(f"calibration found a non-positive slowdown {slope:.3g}")
    return float(slope), max(float(overhead), 0.0)


# The measured/predicted ratio a ``SpeedFactor`` will report at most (and 1 / it at least): a stage seen to
# take 10x its prediction is more likely a stall than the machine's speed.
SPEED_FACTOR_LIMIT = 10.0
SPEED_ALPHA = 0.1  # weight of a new stage timing (by its length) in the running sums
SPEED_PRIOR_S = 0.01  # predicted seconds of agreement the factor starts from: one short stage cannot swing it


@dataclass(frozen=True, slots=True)
class SpeedFactor:
    """How much slower (> 1) or faster a machine runs now than its latency model says, learned online.

    Every stage the machine runs gives (measured, predicted) seconds. The factor is the ratio of their
    exponentially weighted sums: long stages weigh by their length, so a 10 ms stage that met a 10 ms CPU
    throttle does not move the estimate of a 400 ms one. It follows what a fitted model cannot: thermal
    throttling, other load on the machine, or a calibration made in other conditions.
    """

    measured_s: float = SPEED_PRIOR_S
    predicted_s: float = SPEED_PRIOR_S
    samples: int = 0

    @property
    def value(self) -> float:
        return min(max(self.measured_s / self.predicted_s, 1 / SPEED_FACTOR_LIMIT), SPEED_FACTOR_LIMIT)

    def update(self, measured_s: float, predicted_s: float, *, alpha: float = SPEED_ALPHA) -> SpeedFactor:
        """Fold in one stage that took ``measured_s`` where the (unscaled) model said ``predicted_s``."""
        if not (0 < measured_s < math.inf and 0 < predicted_s < math.inf):  # NaN fails these too
            return self
        measured_s = min(max(measured_s, predicted_s / SPEED_FACTOR_LIMIT), predicted_s * SPEED_FACTOR_LIMIT)
        return SpeedFactor(measured_s=(1 - alpha) * self.measured_s + alpha * measured_s,
                           predicted_s=(1 - alpha) * self.predicted_s + alpha * predicted_s,
                           samples=self.samples + 1)


MARGIN_WINDOW = 64  # the recent requests whose prediction errors set a margin
MARGIN_MIN_SAMPLES = 8  # fewer than this: no margin yet (the point prediction)


@dataclass(frozen=True, slots=True)
class Margin:
    """How much longer than predicted one part of a plan may take, learned from recent requests.

    The ``quantile`` of the overruns of the last ``MARGIN_WINDOW`` requests, never below none: planned
    against, it lets that share of requests meet a deadline their point prediction only just meets. An
    overrun is ``measured / predicted`` when ``relative`` (a link: its errors grow with the bytes), else
    ``measured - predicted`` seconds (a CPU: a quota turns a 33 ms stage into 30, 40 or 50 ms and a 380 ms one
    into 370 or 420 ms, by whole periods whatever its length). ``quantile`` 0 turns the margin off.
    """

    quantile: float = 0.0
    relative: bool = True
    overruns: tuple[float, ...] = ()
    # a factor (``relative``, at least 1) or seconds to add (at least 0); set once here, read on every plan
    value: float = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.quantile <= 1.0:
            raise LatencyModelError(f"a margin quantile is within [0, 1], not {self.quantile}")
        value = none = 1.0 if self.relative else 0.0
        if self.quantile and len(self.overruns) >= MARGIN_MIN_SAMPLES:
            ordered = sorted(self.overruns)
            k = min(max(math.ceil(self.quantile * len(ordered)) - 1, 0), len(ordered) - 1)
            value = min(max(ordered[k], none), SPEED_FACTOR_LIMIT) if self.relative else max(ordered[k], none)
        object.__setattr__(self, "value", value)

    def update(self, measured_s: float, predicted_s: float) -> Margin:
        """Fold in one part that took ``measured_s`` where the plan predicted ``predicted_s``."""
        if not (0 <= measured_s < math.inf and 0 < predicted_s < math.inf) or not self.quantile:
            return self
        overrun = measured_s / predicted_s if self.relative else measured_s - predicted_s
        return replace(self, overruns=(*self.overruns[1 - MARGIN_WINDOW:], overrun))
