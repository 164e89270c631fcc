"""Latency budgets: a configuration, a cost model, the profile's Pareto frontier and ladder, and the controller.

A **configuration** fixes every knob of one rerank: width, depth, max length, how many first-stage candidates
to rerank, the exit risk (None: no early exit), and how many of them to keep after a first, cheap pass (None:
all). With ``keep``, the model's smallest sub-network (``Reranker.pruner``) scores every candidate at
``PRUNE_MAX_LENGTH`` tokens and only its best ``keep`` go on to the configuration's network, a cascade inside
one model (``prune_depth`` makes the first pass deeper). ``rankshrink profile`` (``profiling.py``) measures
on this machine what each configuration costs and its nDCG@10 on dev data, and keeps the **frontier**: the
configurations no other beats on both, and the **ladder**: configurations each doing at least as much of
every knob as the one below it, so that a bigger budget only adds work (``nested_ladder``). The
**controller** picks, for a budget, the rung with the best dev nDCG whose predicted 95th-percentile latency
fits ``(1 - headroom)`` of the budget; the engine's deadline, at the whole budget, covers the queries where
the prediction is wrong. The headroom is what keeps the deadline from cutting: a cut rerank ranks its
remaining documents by stale exit scores, which can rank worse than a smaller configuration run to the end.

The **cost model** is linear in the work a rerank does, which the engine counts (``QueryStats.work``):
``ms = c_calls + c_pairs·pairs + c_tokens·tokens + c_steps·steps + c_heads·heads + c_w·GFLOPs``, with one
``c_w`` (ms per GFLOP) per width because narrow matmuls run less efficiently (a cascade's first pass counts
its GFLOPs at its own width: ``prune_gflops``, ``prune_width``). It is fitted to measured
reranks by non-negative least squares on relative error.

>>> controller = Controller.from_profile(model.metadata["profile"])      # doctest: +SKIP
>>> controller.choose(budget_ms=100, candidates=100).config              # doctest: +SKIP
RerankConfig(width=0.5, depth=0.5, max_length=128, candidates=30, exit_risk=0.1)
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import InputError, check_integer, check_number

WORK_FEATURES = ("calls", "pairs", "tokens", "steps", "heads")
# Share of a budget the chosen configuration's predicted p95 leaves free. At 0 the bench's 400 ms budget ranked
# worse than its 200 ms one (36 deadline cuts, eval/README.md). On the 53 judged dl21 queries (the dev set),
# budgets 50-400 ms x 2 passes (eval/headroom.py): at 0.4 p95 stayed under 63% of every budget; at 0.2 under 81%
# in one run and 92% in another (100 ms: 91.5 ms, 5 cuts of 106), and on dl19 100 ms went from 91.5% to 95.5%.
# 4 threads sharing a Pipeline at 400 ms: 0 or 1 cuts of 172 searches (eval/bench_pipeline.md).
DEFAULT_HEADROOM = 0.2
# A cascade's first pass reads this many tokens of each pair (or the configuration's max length, if shorter).
PRUNE_MAX_LENGTH = 64
# A profiled configuration's timing corrects the cost model's prediction of it by at most this factor.
MAX_CORRECTION = 2.0


def check_headroom(headroom: Any) -> float:
    return check_number("headroom", headroom, lambda value: 0 <= value < 1, "in [0, 1)", optional=False)


def check_milliseconds(name: str, value: Any, *, optional: bool) -> float | None:
    return check_number(name, value, lambda ms: 0 <= ms < math.inf,
                        "a number of milliseconds >= 0" + (" (or None)" if optional else ""), optional=optional)


def check_budget_ms(budget_ms: Any) -> float | None:
    return check_milliseconds("budget_ms", budget_ms, optional=True)


def check_exit_risk(exit_risk: Any, optional: bool = False) -> float | None:
    return check_number("exit_risk", exit_risk, lambda value: 0 < value < 1,
                        "a probability in (0, 1)" + (" or None" if optional else ""), optional=optional)


@dataclass(frozen=True)
class RerankConfig:
    """Every knob of one rerank. ``exit_risk``: the calibrated probability that a document the full depth
    would put in the top k leaves early (None: no early exit). ``keep``: rerank only the best ``keep``
    candidates of a first pass by the model's smallest sub-network (None: every candidate); ``prune_depth``:
    that first pass's depth (None: the model's shallowest), still at the model's smallest width."""

    width: float = 1.0
    depth: float = 1.0
    max_length: int = 256
    candidates: int = 100
    exit_risk: float | None = None
    keep: int | None = None
    prune_depth: float | None = None

    def __post_init__(self):
        for name in ("width", "depth", "prune_depth"):
            value = getattr(self, name)
            if name == "prune_depth" and value is None:
                continue
            object.__setattr__(self, name, check_number(name, value, lambda fraction: 0 < fraction <= 1, "in (0, 1]"))
        for name in ("max_length", "candidates", "keep"):
            value = check_integer(name, getattr(self, name), optional=name == "keep")
            if value is not None:
                object.__setattr__(self, name, int(value))   # a numpy integer, too, saves as JSON
        if self.prune_depth is not None and self.keep is None:
            raise InputError(f"prune_depth {self.prune_depth:g} is the depth of a cascade's first pass: give keep too")
        if self.max_length < 8:
            raise InputError(f"max_length must be at least 8 tokens, got {self.max_length}")
        object.__setattr__(self, "exit_risk", check_exit_risk(self.exit_risk, optional=True))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RerankConfig":
        return cls(**{key: values[key] for key in ("width", "depth", "max_length", "candidates", "exit_risk", "keep",
                                                   "prune_depth") if key in values})

    @property
    def reranked(self) -> int:
        """How many candidates this configuration's network reranks (of ``candidates``)."""
        return self.candidates if self.keep is None else min(self.keep, self.candidates)

    def cascades(self, count: int) -> bool:
        """Whether reranking ``count`` first-stage candidates at this configuration is a cascade: its network
        sees fewer of them than it reranks."""
        return self.keep is not None and self.keep < min(count, self.candidates)

    def label(self) -> str:
        exits = "off" if self.exit_risk is None else f"{self.exit_risk:g}"
        keep = f" keep {self.keep}" if self.cascades(self.candidates) else ""
        if keep and self.prune_depth is not None:
            keep += f" of d{self.prune_depth:g}"
        return f"w{self.width:g} d{self.depth:g} L{self.max_length} K{self.candidates}{keep} exits {exits}"


def capped(config: RerankConfig, max_candidates: int | None, max_length: int | None) -> RerankConfig:
    """``config`` with at most ``max_candidates`` candidates and ``max_length`` tokens (None: no cap)."""
    if max_candidates is not None and config.candidates > max_candidates:
        config = replace(config, candidates=max_candidates)
    if max_length is not None and config.max_length > max_length:
        config = replace(config, max_length=max_length)
    return config


# ---------------------------------------------------------------------------------------------
# Cost model


@dataclass
class CostModel:
    """Milliseconds of one rerank from the work it does. ``ms_per_gflop``: width → ms per GFLOP of layer
    arithmetic (a width not measured uses the nearest measured one)."""

    coefficients: dict[str, float]
    ms_per_gflop: dict[float, float]

    def predict(self, work: Mapping[str, float], width: float) -> float:
        ms = sum(self.coefficients.get(name, 0.0) * float(work.get(name, 0.0)) for name in WORK_FEATURES)
        ms += self.gflop_cost(width) * float(work.get("gflops", 0.0))
        if work.get("prune_gflops"):
            ms += self.gflop_cost(float(work["prune_width"])) * float(work["prune_gflops"])
        return ms

    def gflop_cost(self, width: float) -> float:
        if not self.ms_per_gflop:
            return 0.0
        nearest = min(self.ms_per_gflop, key=lambda w: (abs(w - width), -w))
        return self.ms_per_gflop[nearest]

    @classmethod
    def fit(cls, samples: Sequence[tuple[Mapping[str, float], float, float]]) -> "CostModel":
        """Fit to ``(work, width, measured ms)`` samples: non-negative coefficients minimising the squared
        *relative* error, so cheap configurations are predicted as well as dear ones."""
        import numpy as np
        from scipy.optimize import nnls

        if len(samples) < 2:
            raise ValueError(f"a cost model needs at least 2 timed reranks, got {len(samples)}")
        widths = sorted({float(width) for _, width, _ in samples} |
                        {float(work["prune_width"]) for work, _, _ in samples if work.get("prune_gflops")})
        rows, targets = [], []
        for work, width, ms in samples:
            if ms <= 0:
                continue
            row = [float(work.get(name, 0.0)) for name in WORK_FEATURES]
            row += [(float(work.get("gflops", 0.0)) if math.isclose(width, w) else 0.0)
                    + (float(work.get("prune_gflops", 0.0)) if math.isclose(work.get("prune_width", -1.0), w) else 0.0)
                    for w in widths]
            rows.append([value / ms for value in row])
            targets.append(1.0)
        coefficients, _ = nnls(np.asarray(rows), np.asarray(targets), maxiter=5000)
        named = {name: float(value) for name, value in zip(WORK_FEATURES, coefficients)}
        per_width = {w: float(value) for w, value in zip(widths, coefficients[len(WORK_FEATURES):])}
        return cls(named, per_width)

    def to_dict(self) -> dict[str, Any]:
        return {"coefficients": dict(self.coefficients),
                "ms_per_gflop": {f"{w:g}": value for w, value in sorted(self.ms_per_gflop.items())}}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "CostModel":
        return cls({name: float(v) for name, v in values["coefficients"].items()},
                   {float(w): float(v) for w, v in values["ms_per_gflop"].items()})


# ---------------------------------------------------------------------------------------------
# The frontier and the controller


@dataclass(frozen=True)
class FrontierPoint:
    """One configuration on the profile's frontier: dev nDCG@10 and predicted latency (ms per query of
    ``config.candidates`` candidates: median, 95th percentile, and the part that does not grow with the
    number of candidates). ``measured_*``: what timing it for real during the profile gave."""

    config: RerankConfig
    ndcg: float
    ms_p50: float
    ms_p95: float
    ms_fixed: float = 0.0
    measured_ms_p50: float | None = None
    measured_ms_p95: float | None = None

    @property
    def correction(self) -> float:
        """How much slower than the cost model predicted this configuration ran when the profile timed it
        (measured median over predicted median, within [0.5, 2]; 1 when untimed). The cost model is one
        linear fit over every configuration and misses single ones by 1.2-1.4x; uncorrected, the engine would
        read that miss as machine load and move every budget down."""
        if self.measured_ms_p50 is None or self.ms_p50 <= 0:
            return 1.0
        return min(MAX_CORRECTION, max(1 / MAX_CORRECTION, self.measured_ms_p50 / self.ms_p50))

    def predicted_p95(self, candidates: int) -> float:
        """The 95th-percentile prediction for a query with ``candidates`` candidates (fewer is cheaper, except
        in a cascade, whose second pass may cost as much on fewer), corrected by the profile's timing of this
        configuration."""
        if self.config.cascades(self.config.candidates):
            return self.ms_p95 * self.correction
        reranked = min(candidates, self.config.candidates)
        uncorrected = self.ms_fixed + (self.ms_p95 - self.ms_fixed) * reranked / self.config.candidates
        return uncorrected * self.correction

    def capped_to(self, max_candidates: int | None, max_length: int | None) -> "FrontierPoint":
        """This point with its configuration ``capped`` and its times for the fewer candidates (the part that
        grows with them, scaled; a cascade's kept: its second pass may cost as much on fewer; a shorter max
        length is not credited)."""
        config = capped(self.config, max_candidates, max_length)
        if config.candidates == self.config.candidates or self.config.cascades(self.config.candidates):
            return self if config == self.config else replace(self, config=config)
        share = config.candidates / self.config.candidates

        def scaled(ms: float) -> float:
            return self.ms_fixed + (ms - self.ms_fixed) * share

        # The measured times scale as the predicted ones, so that the profile's correction stays what it was.
        ratio = scaled(self.ms_p50) / self.ms_p50 if self.ms_p50 > 0 else 1.0
        return replace(self, config=config, ms_p50=scaled(self.ms_p50), ms_p95=scaled(self.ms_p95),
                       measured_ms_p50=None if self.measured_ms_p50 is None else self.measured_ms_p50 * ratio,
                       measured_ms_p95=None if self.measured_ms_p95 is None else self.measured_ms_p95 * ratio)

    def to_dict(self) -> dict[str, Any]:
        values = {**self.config.as_dict(), "ndcg@10": self.ndcg, "ms_p50": self.ms_p50, "ms_p95": self.ms_p95,
                  "ms_fixed": self.ms_fixed}
        if self.measured_ms_p50 is not None:
            values.update(measured_ms_p50=self.measured_ms_p50, measured_ms_p95=self.measured_ms_p95)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "FrontierPoint":
        return cls(RerankConfig.from_dict(values), float(values["ndcg@10"]), float(values["ms_p50"]),
                   float(values["ms_p95"]), float(values.get("ms_fixed", 0.0)), values.get("measured_ms_p50"),
                   values.get("measured_ms_p95"))


def pareto_frontier(points: Iterable[FrontierPoint], min_gain: float = 0.0) -> list[FrontierPoint]:
    """The points no other point beats on both cost (predicted p95) and nDCG, cheapest first. With
    ``min_gain``, a dearer point must beat the last one kept by more than that: a gain smaller than the dev
    set's noise is not worth its cost, and would make quality on other queries go down as budgets go up."""
    frontier: list[FrontierPoint] = []
    for point in sorted(points, key=lambda p: (p.ms_p95, -p.ndcg)):
        if not frontier or point.ndcg > frontier[-1].ndcg + min_gain:
            frontier.append(point)
    return frontier


def does_at_least(upper: RerankConfig, lower: RerankConfig) -> bool:
    """Whether ``upper`` does at least as much of every knob as ``lower``: width, depth, max length,
    candidates and candidates kept after a cascade's first pass no smaller, exit risk no larger (exits off is a
    risk of 0); of two cascades, the upper's first pass no shallower."""
    def risk(config: RerankConfig) -> float:
        return 0.0 if config.exit_risk is None else config.exit_risk

    def first_pass_depth(config: RerankConfig) -> float:
        return 0.0 if config.prune_depth is None else config.prune_depth   # None: the shallowest

    both_cascade = upper.cascades(upper.candidates) and lower.cascades(lower.candidates)
    return (upper.width >= lower.width and upper.depth >= lower.depth and upper.max_length >= lower.max_length
            and upper.candidates >= lower.candidates and upper.reranked >= lower.reranked
            and risk(upper) <= risk(lower)
            and (not both_cascade or first_pass_depth(upper) >= first_pass_depth(lower)))


def nested_ladder(points: Iterable[FrontierPoint], min_gain: float = 0.0) -> list[FrontierPoint]:
    """The configurations a growing budget climbs, cheapest first: each does at least as much of every knob as
    the one below it (``does_at_least``) and beats it on dev nDCG@10 by more than ``min_gain``. Of all such
    ladders, the one whose dev nDCG@10, as a step function of the log of the budget from the cheapest point's
    cost to twice the dearest's, covers the most area (budgets below its first rung count as 0).

    Why not the Pareto frontier: its neighbours can differ in every knob (K20 at width 1, then K50 at width
    0.75 and 128 tokens), and on a few dev queries their order is noise, so on other queries a bigger budget
    can rank worse. A rung that only adds work keeps what the rung below it found."""
    ordered = sorted(points, key=lambda p: (p.ms_p95, -p.ndcg))
    if not ordered:
        return []
    log_cost = [math.log(max(point.ms_p95, 1e-3)) for point in ordered]
    log_top = log_cost[-1] + math.log(2)     # so that the dearest rung, too, buys budgets of its own
    area: list[float] = []                 # best area up to each point's cost, for ladders ending there
    below: list[int | None] = []
    for i, point in enumerate(ordered):
        best, link = 0.0, None
        for j in range(i):
            lower = ordered[j]
            if log_cost[j] < log_cost[i] and point.ndcg > lower.ndcg + min_gain \
                    and does_at_least(point.config, lower.config):
                value = area[j] + lower.ndcg * (log_cost[i] - log_cost[j])
                if value > best:
                    best, link = value, j
        area.append(best)
        below.append(link)
    top = max(range(len(ordered)), key=lambda i: area[i] + ordered[i].ndcg * (log_top - log_cost[i]))
    ladder: list[FrontierPoint] = []
    rung: int | None = top
    while rung is not None:
        ladder.append(ordered[rung])
        rung = below[rung]
    return ladder[::-1]


@dataclass
class Controller:
    """Given a budget, the rung of the profile's ladder with the best dev nDCG predicted to fit (profiles
    older than the ladder: the frontier point).

    ``load``: how much slower than at profile time the machine runs now (the engine measures it); the
    predictions are multiplied by it."""

    frontier: list[FrontierPoint]
    cost_model: CostModel | None = None
    info: dict[str, Any] = field(default_factory=dict)
    ladder: list[FrontierPoint] | None = None

    @property
    def rungs(self) -> list[FrontierPoint]:
        """What ``choose`` climbs: the ladder, or the frontier when the profile has none."""
        return self.ladder or self.frontier

    @classmethod
    def from_profile(cls, profile: Mapping[str, Any]) -> "Controller":
        try:
            frontier = [FrontierPoint.from_dict(point) for point in profile["frontier"]]
            ladder = [FrontierPoint.from_dict(point) for point in profile.get("ladder") or []]
            cost_model = CostModel.from_dict(profile["cost_model"]) if profile.get("cost_model") else None
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(f"the model's profile is malformed ({type(error).__name__}: {error}); "
                             f"run rankshrink profile again") from None
        if not frontier:
            raise InputError("the model's profile has an empty frontier; run rankshrink profile again")
        info = {key: value for key, value in profile.items() if key not in ("frontier", "ladder", "cost_model")}
        return cls(pareto_frontier(frontier), cost_model, info, pareto_frontier(ladder) or None)

    def choose(self, budget_ms: float, candidates: int, load: float = 1.0,
               max_candidates: int | None = None, max_length: int | None = None) -> FrontierPoint:
        """The best rung whose predicted p95 (``FrontierPoint.predicted_p95``) × ``load`` fits ``budget_ms``
        for a query of ``candidates`` candidates; the rung predicted cheapest when none fits (the profile's
        corrections can make it another than the first). ``max_candidates`` / ``max_length`` cap every rung's
        configuration, and its prediction with it (the caller's limits)."""
        rungs = [point.capped_to(max_candidates, max_length) for point in self.rungs]
        fitting = [point for point in rungs if point.predicted_p95(candidates) * load <= budget_ms]
        if fitting:
            return fitting[-1]
        return min(rungs, key=lambda point: point.predicted_p95(candidates))

    def correction(self, config: RerankConfig) -> float:
        """``FrontierPoint.correction`` of the timed rung or frontier point that runs ``config``; for a
        configuration capped to fewer candidates, of the timed point with the fewest candidates above it; 1 for
        a configuration the profile did not time."""
        def knobs(c: RerankConfig) -> tuple:
            return c.width, c.depth, c.max_length, c.exit_risk, c.keep, c.prune_depth

        timed = [p for p in self.rungs + self.frontier if p.measured_ms_p50 is not None
                 and knobs(p.config) == knobs(config) and p.config.candidates >= config.candidates]
        closest = min(timed, key=lambda p: p.config.candidates, default=None)
        return 1.0 if closest is None else closest.correction

    def cheapest_within(self, ndcg: float, drop: float) -> FrontierPoint | None:
        """Of the frontier's and the ladder's points whose dev nDCG@10 is at least ``ndcg - drop``, the one
        predicted cheapest after the profile's correction (``predicted_p95``; None if none is)."""
        within = [point for point in self.frontier + (self.ladder or []) if point.ndcg >= ndcg - drop]
        return min(within, key=lambda point: (point.predicted_p95(point.config.candidates), -point.ndcg),
                   default=None)
