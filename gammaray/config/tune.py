"""tune.*: Ray Tune over the config tree (tuning/)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .base import Section


# --------------------------------------------------------------------------------------------
# tuning (Ray Tune over the config tree; tuning/)


class SearchDim(Section):
    """One dimension of the search space, keyed in `tune.space` by the dotted path it sets."""

    kind: Literal["loguniform", "uniform", "randint", "choice"] = Field(
        ..., description="loguniform/uniform floats in [low, high], randint integers in [low, high), choice of values."
    )
    low: float | None = Field(None, description="Lower bound (loguniform: > 0).")
    high: float | None = Field(None, description="Upper bound.")
    values: list[Any] | None = Field(None, description="choice: the candidate values (non-empty).")
    zero: bool = Field(
        False, description="loguniform: also try exactly 0 (a regularizer switched off), through a boolean "
                           "search variable '<path>#zero'."
    )

    @model_validator(mode="after")
    def _well_formed(self) -> "SearchDim":
        if self.kind == "choice":
            if not self.values:
                raise ValueError("choice needs a non-empty 'values' list")
            if self.low is not None or self.high is not None or self.zero:
                raise ValueError("choice takes 'values' only (no low/high/zero)")
            return self
        if self.values is not None:
            raise ValueError(f"{self.kind} takes low/high, not 'values'")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.kind} needs both 'low' and 'high'")
        if not self.low < self.high:
            raise ValueError(f"{self.kind} needs low < high (got low={self.low}, high={self.high})")
        if self.kind == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs 0 < low (got low={self.low}); use zero: true to also try 0")
        if self.zero and self.kind != "loguniform":
            raise ValueError("zero: true is for loguniform dimensions")
        if self.kind == "randint" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("randint needs integer low and high")
        return self


def _default_space() -> dict[str, "SearchDim"]:
    weight = dict(kind="loguniform", low=1e-3, high=1.0, zero=True)
    return {
        # lambda_sep pays from about 0.1 (docs/benchmarks.md, the latent-structure forms); below, it is noise
        "loss.structure.lambda_sep": SearchDim(kind="loguniform", low=0.1, high=1.0, zero=True),
        "loss.structure.lambda_br": SearchDim(**weight),
        "loss.structure.lambda_gc": SearchDim(**weight),
        "loss.structure.bridge_t": SearchDim(kind="uniform", low=0.1, high=0.9),
        "model.temperature": SearchDim(kind="loguniform", low=0.02, high=0.2),
        "loss.gamma.alpha": SearchDim(kind="uniform", low=0.5, high=2.0),
        "loss.gamma.gamma": SearchDim(kind="loguniform", low=0.02, high=1.0),
    }


class AshaConfig(Section):
    grace_period: int | None = Field(
        None, ge=1, description="Steps every trial runs before it can be stopped (None = from grace_fraction)."
    )
    grace_fraction: float | None = Field(
        None, gt=0.0, le=1.0,
        description="Grace period as a fraction of a trial's budget, rounded up to a multiple of train.eval_every "
                    "(the steps that report a metric). None = 0.5 when tune.space holds a loss.structure weight "
                    "(regularizers act slowly: at a quarter of the run they are not yet told from noise), else "
                    "train.eval_every. tune.asha.grace_period, when set, wins.",
    )
    keep_front: bool = Field(
        True, description="Multi-objective searches (tune.objectives): a trial that ASHA would stop at a rung on "
                          "tune.metric continues when its (metric, second objective) pair is on the Pareto front of "
                          "the pairs recorded at that rung (a regularizer that buys the second objective with a "
                          "little R@1 is not cut for the trade it makes)."
    )
    reduction_factor: float = Field(2.0, gt=1.0, description="Keep the top 1/reduction_factor at each rung.")
    max_steps: int | None = Field(
        None, ge=1, description="Budget of a trial in optimizer steps (None = the trial's planned steps)."
    )


class PickConfig(Section):
    """How one configuration is picked from a multi-objective search's Pareto front (tuning/objectives.py)."""

    margin: float = Field(
        0.005, ge=0.0, description="The smallest drop of the first objective (R@1) that matters. With confirm_seeds=0 "
                                   "the rule on single runs: the picked trial's first objective may be at most this "
                                   "much below the baseline trial's (tune.points_to_evaluate[0]). With confirmation, "
                                   "the resolution the validation split is checked against (a warning when the "
                                   "binomial standard error of R@1 there is larger)."
    )
    confirm_seeds: int = Field(
        3, ge=0, description="Before the pick, the Pareto front's trials (at most confirm_candidates) and the baseline "
                             "train again with this many fresh seeds (run.seed+1 ...) and are compared on the means "
                             "and standard errors of their validation objectives: single runs differ by noise. "
                             "0 = pick on the search's single runs with the fixed margin. 1 is refused (no spread)."
    )
    confirm_candidates: int = Field(
        4, ge=1, description="At most this many front trials are confirmed: those with the highest second objective."
    )
    margin_se: float = Field(
        1.0, ge=0.0, description="With confirmation: a trial qualifies when its mean first objective is at least the "
                                 "baseline's minus margin_se standard errors of the difference."
    )
    gain_se: float = Field(
        1.0, ge=0.0, description="With confirmation: a qualifying trial is picked over the baseline only when its mean "
                                 "second objective beats the baseline's by more than gain_se standard errors of the "
                                 "difference (the highest such mean wins); otherwise the baseline."
    )

    @field_validator("confirm_seeds")
    @classmethod
    def _seeds_give_a_spread(cls, v: int) -> int:
        if v == 1:
            raise ValueError("confirm_seeds=1 measures no spread: use 0 (no confirmation) or at least 2")
        return v


class TuneSection(Section):
    name: str | None = Field(
        None, description="Experiment name under run.storage (None = '<run.name>-tune'); re-running it resumes."
    )
    space: dict[str, SearchDim] = Field(
        default_factory=_default_space,
        description="Search space: dotted config path -> {kind, low, high | values, zero}. Any path of the tree.",
    )
    samples: int = Field(8, ge=1, description="Number of trials.")
    metric: str = Field(
        "val_r_at_1", description="Metric the scheduler compares at its rungs and a single-objective searcher maximises "
                                  "(mode max)."
    )
    objectives: list[str] = Field(
        default_factory=list,
        description="Two validation metrics for a multi-objective search, both maximised, e.g. [val_r_at_1, "
                    "val_probe_specific] (Optuna's multi-objective TPE; ASHA still uses tune.metric). Writes the "
                    "Pareto front and the config tune.pick picks. Empty = single objective tune.metric."
    )
    pick: PickConfig = PickConfig()
    trial_kind: Literal["train_loop", "in_process"] = Field(
        "train_loop", description="train_loop: each trial is a TorchTrainer run of the training loop (gammaray pretrain's "
                                  "code, DeepSpeed, Ray Data). in_process: the trial trains in its own process "
                                  "(workers/training/inprocess.py: same model, objective, optimizer and schedule, "
                                  "data in memory, no checkpoints) on tune.trial_cpus CPUs: for small models, far "
                                  "cheaper per trial."
    )
    searcher: Literal["optuna", "random"] = Field(
        "optuna", description="optuna: Optuna's TPE sampler through ray.tune.search.optuna; random: plain sampling."
    )
    scheduler: Literal["asha", "fifo"] = Field("asha", description="asha: stop weak trials early; fifo: run all fully.")
    asha: AshaConfig = AshaConfig()
    seed: int | None = Field(None, description="Searcher seed (None = run.seed).")
    trial_cpus: float = Field(
        0.25, gt=0.0, description="Logical CPUs of each trial's own process (it drives the TorchTrainer; 0 is refused)."
    )
    max_concurrent: int | None = Field(
        None, ge=1, description="Trials at once (None = as many as the cluster fits, leaving CPUs for Ray Data)."
    )
    trial_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted overrides for the trials only (e.g. a shorter train.max_steps); not in the best config.",
    )
    points_to_evaluate: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Trials to run first, before the searcher proposes its own: {searched path: value}; a searched "
                    "key left out takes the base config's value ([{}] = the base config as a baseline).",
    )

    @field_validator("name")
    @classmethod
    def _name_is_path_safe(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or v.startswith(".")):
            raise ValueError("tune.name must be a non-empty path-safe string without '/'")
        return v
