"""The options of :func:`~tl_vlm.analyses.gates.find_gates`, checked in one place.

Example:
    >>> from tl_vlm.analyses.gates import GateSearchConfig
    >>> quick = GateSearchConfig(rows=False, overlap=False, check_random=0)
    >>> quick.check_top, quick.metric
    (5, GateMetric(kind='log_odds'))
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Literal, Optional, Union

from tl_vlm.analyses.gates.metric import GateMetric

Queries = Literal["all", "text"]


@dataclass(frozen=True)
class GateSearchConfig:
    """How :func:`~tl_vlm.analyses.gates.find_gates` searches: every keyword option it
    takes, with its default. Invalid values fail when the config is made.

    Attributes:
        batch_size, limit: examples per forward pass; only the first ``limit`` examples.
            The gradient pass keeps every layer's activations for its backward, as a
            training step does (but no weight gradients, no attention pattern): size
            ``batch_size`` for that, not for a plain forward, or set
            ``recompute_activations``.
        metric: ``"log_odds"`` (default), ``"logprob"`` or a :class:`GateMetric`; a name
            is made a :class:`GateMetric`.
        queries: whose attention is cut: ``"all"`` positions (the paper's EOI knockout;
            generated tokens too) or ``"text"`` (non-image-side) only.
        rows: also each image row as a class (one forward per row and batch).
        check_per_example: in each example, the positions with the largest estimates
            knocked out exactly (one forward per batch each: every example knocks out its
            own j-th best), which refines every position's value (``refined``); 0: none.
        check_top, check_random: single positions checked by exact knockout in every
            example: the best by refined value and a seeded (``seed``) random sample of
            the others; ``check_all`` checks every position (one forward each per batch).
            Positions that a class of one position per example stands for (BOI, EOI, the
            first and last image token, in every example that has them) are exact from
            the class pass, and checked at no cost.
        alpha: where on the path from the clean run (1) to the corrupted one (0) the
            gradient is taken (:mod:`tl_vlm.analyses.gates.search`).
        recompute_activations: the gradient pass keeps only each block's input and
            recomputes its activations in the backward (:mod:`tl_vlm.core.recompute`):
            memory for one residual per layer and one block's activations instead of
            every layer's, for one more forward per batch. For long inputs, big batches,
            deep models.
        layer_sweep: knock the gate out in the last w layers to find where it acts.
        contribution: accumulate the cross-modal contribution (read-only, in the clean pass).
        overlap: neighbourhood overlap of the classes with the examples' labels (DADApy;
            one more pass): True, False, or ``"auto"`` (when DADApy is installed and the
            task has more than 8 examples with at least two labels).
        narrow, distributed: the verdict's thresholds on the best two positions' share.
        min_effect: below this drop of the metric for the whole image side, the verdict is
            ``"no image effect"``.
        log: called with a line per phase (e.g. ``print``).

    Example:
        >>> config = GateSearchConfig(batch_size=12, check_top=3)
        >>> config.replace(check_top=1).check_top, config.check_top     # frozen: a new one
        (1, 3)
        >>> GateSearchConfig(alpha=0)
        Traceback (most recent call last):
        ...
        ValueError: alpha must be in (0, 1] (1: the gradient at the clean run), got 0
        >>> GateSearchConfig.from_options(check_tops=1)      # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: unknown find_gates option(s) ['check_tops']; the options are batch_size, ...
    """

    batch_size: int = 16
    limit: Optional[int] = None
    metric: Union[str, GateMetric] = field(default_factory=GateMetric, hash=False)
    queries: Queries = "all"
    rows: bool = True
    check_per_example: int = 5
    check_top: int = 5
    check_random: int = 5
    check_all: bool = False
    alpha: float = 1.0
    recompute_activations: bool = False
    layer_sweep: bool = True
    contribution: bool = True
    overlap: Union[bool, str] = "auto"
    narrow: float = 0.6
    distributed: float = 0.25
    min_effect: float = 0.1
    seed: int = 0
    log: Optional[Callable[[str], None]] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.queries not in ("all", "text"):
            raise ValueError(f"queries must be 'all' (every position, the paper's knockout) or "
                             f"'text', got {self.queries!r}")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1] (1: the gradient at the clean run), "
                             f"got {self.alpha}")
        if self.check_top < 1:
            raise ValueError(f"check_top must be at least 1 (the verdict rests on the exact "
                             f"knockout of the best positions), got {self.check_top}")
        if isinstance(self.check_per_example, bool) or not isinstance(self.check_per_example, int) \
                or self.check_per_example < 0:
            raise ValueError(f"check_per_example must be a whole number >= 0 (positions "
                             f"knocked out exactly in each example; 0: none), got "
                             f"{self.check_per_example!r}")
        if not isinstance(self.metric, GateMetric):
            object.__setattr__(self, "metric", GateMetric(self.metric))

    @classmethod
    def option_names(cls) -> list[str]:
        """Every option, in order.

        Example:
            >>> GateSearchConfig.option_names()[:3]
            ['batch_size', 'limit', 'metric']
        """
        return [f.name for f in fields(cls)]

    @classmethod
    def from_options(cls, base: Optional["GateSearchConfig"] = None,
                     **options: Any) -> "GateSearchConfig":
        """``base`` (or the defaults) with ``options`` changed; an unknown option is a
        TypeError that names the valid ones.

        Example:
            >>> GateSearchConfig.from_options(GateSearchConfig(rows=False), seed=3).rows
            False
        """
        if base is not None and not isinstance(base, GateSearchConfig):
            raise TypeError(f"the config must be a GateSearchConfig, got {type(base).__name__}; "
                            f"pass options by keyword (batch_size=...)")
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            raise TypeError(f"unknown find_gates option(s) {unknown}; the options are "
                            f"{', '.join(cls.option_names())}")
        return cls(**options) if base is None else replace(base, **options)

    def replace(self, **options: Any) -> "GateSearchConfig":
        """A copy with ``options`` changed (checked like the constructor's).

        Example:
            >>> GateSearchConfig().replace(queries="text").queries
            'text'
        """
        return self.from_options(self, **options)
