"""Ray Tune's experiment state is pickles: nothing in it runs unchecked when `gammaray tune` resumes.

Ray Tune 2.60 restores an experiment by unpickling what it stored in the run storage: `tuner.pkl`
(the Tuner's configs, the searcher, the scheduler), the experiment state (JSON that holds
cloudpickled trial fields as hex), the searcher's and search generator's states and gammaray's ASHA
rungs (`asha_rungs.state`). Anyone who can write to the run storage could put a pickle there whose
loading runs a command on the machine that resumes. So before Tune sees an experiment folder (and
before the results are read back at the end), `check_experiment` reads every such file without
loading it (workers/safe_load.py `pickle_references`: the globals a pickle names and the ones it
calls, from its opcodes) and refuses the experiment, naming the file, when one calls anything
outside TUNE_CALLS or names anything outside TUNE_CALLS | TUNE_VALUES: the classes and
constructors Ray Tune, Optuna and gammaray write into these files (functions that are stored by
reference but must never be called, like Ray's upload helper, are values only). Code stored by
value (cloudpickled functions and classes) is refused outright.

Two more doors are closed where they open: the session's own Tune callbacks are set after the
Tuner is pickled (a callback defined in a notebook or a test would be stored as code), and a
trial's pickled error (`trial_*/error.pkl`, a cloudpickled exception class: code by design) is
never read back; Tune falls back to the text copy beside it (`error.txt`).

A Ray or Optuna upgrade that stores another class is refused the same way, naming the class: add it
to the allowlist after checking that constructing it with arbitrary arguments runs nothing.
"""

from __future__ import annotations

import copy
import json

from ray.tune.experiment.config_parser import _make_parser
from ray.tune.search.basic_variant import BasicVariantGenerator

from pipelines.storage import Store
from workers.safe_load import UnsafeCheckpoint, check_pickle, pickle_references

ADVICE = ("Ray Tune's experiment state holds only configs, searcher and trial records; this file was not "
          "written by Ray Tune or gammaray (or was altered). Restore the experiment folder from a trusted copy, or "
          "start a new experiment (another tune.name).")

# called at load time: constructors of plain data (seen in tuner.pkl, experiment_state-*.json,
# search_gen_state-*.json, basic-variant-state-*.json, searcher-state-*.pkl, asha_rungs.state of
# experiments with every searcher, scheduler and trial kind gammaray runs, on local and S3 storage)
TUNE_CALLS = frozenset({
    # Python, numpy (Optuna's random state)
    "builtins.set", "builtins.frozenset", "builtins.slice", "builtins.complex", "collections.deque",
    "collections.OrderedDict", "collections.defaultdict", "copyreg._reconstructor", "datetime.datetime",
    "datetime.timedelta", "datetime.timezone", "numpy._core.multiarray._reconstruct", "numpy._core.multiarray.scalar",
    "numpy.dtype", "numpy.ndarray", "numpy.random._pickle.__bit_generator_ctor",
    "numpy.random._pickle.__randomstate_ctor", "numpy.random._pickle.__generator_ctor",
    "numpy._core.numeric._frombuffer", "numpy.random.bit_generator.__pyx_unpickle_SeedSequence",
    "ray.tune.search.sample._BackwardsCompatibleNumpyRng",
    # storage handed to Tune: a filesystem from its URI, gammaray's retrying S3 handler
    "pyarrow._fs.FileSystem._from_uri", "pyarrow._fs.PyFileSystem", "pyarrow._fs.LocalFileSystem",
    "pyarrow._s3fs.S3FileSystem._reconstruct", "pipelines.storage.RetryingS3", "pipelines.storage.S3Settings",
    "pipelines.storage.Store",  # the experiment's storage a scheduler holds (built from its settings, nothing opened)
    # Ray Tune / Train configs and records
    "ray.air._internal.usage.AirEntrypoint", "ray.train.SyncConfig", "ray.tune.CheckpointConfig",
    "ray.tune.FailureConfig", "ray.tune.RunConfig", "ray.tune.tune_config.TuneConfig",
    "ray.train._internal.checkpoint_manager._CheckpointManager", "ray.train._internal.storage.StorageContext",
    "ray.train._internal.storage._FilesystemSyncer", "ray.tune.execution.placement_groups.PlacementGroupFactory",
    "ray.tune.stopper.noop.NoopStopper", "ray.tune.experiment.experiment.Experiment",
    "ray.tune.search.sample.Categorical", "ray.tune.search.sample.Categorical._Uniform",
    "ray.tune.search.sample.Float", "ray.tune.search.sample.Float._LogUniform", "ray.tune.search.sample.Float._Uniform",
    "ray.tune.search.sample.Integer", "ray.tune.search.sample.Integer._Uniform",
    "ray.tune.search.sample.Integer._LogUniform", "ray.tune.search.sample.Function",
    "ray.tune.search.sample.Function._CallSampler",
    "ray.tune.schedulers.async_hyperband._Bracket", "ray.tune.schedulers.fifo.FIFOScheduler",
    "ray.tune.schedulers.trial_scheduler.FIFOScheduler",
    "ray.tune.search.optuna.optuna_search.OptunaSearch", "ray.tune.search.basic_variant.BasicVariantGenerator", "tuning.state_check.CheckableVariantGenerator",
    "ray.tune.search.basic_variant._VariantIterator", "ray.tune.search.basic_variant._TrialIterator",
    "ray.tune.search.concurrency_limiter.ConcurrencyLimiter", "ray.tune.search.search_generator.SearchGenerator",
    # Optuna's study (the searcher state)
    "optuna.distributions.CategoricalDistribution", "optuna.distributions.FloatDistribution",
    "optuna.distributions.IntDistribution", "optuna.pruners._nop.NopPruner",
    "optuna.samplers._lazy_random_state.LazyRandomState", "optuna.samplers._random.RandomSampler",
    "optuna.samplers._tpe.parzen_estimator._ParzenEstimatorParameters", "optuna.samplers._tpe.sampler.TPESampler",
    "optuna.search_space.intersection.IntersectionSearchSpace", "optuna.storages._in_memory.InMemoryStorage",
    "optuna.storages._in_memory._StudyInfo", "optuna.study._study_direction.StudyDirection", "optuna.study.study.Study",
    "optuna.trial._frozen.FrozenTrial", "optuna.trial._state.TrialState", "optuna.trial._trial.Trial",
    # gammaray's own
    "gammaray.config.run.StorageConfig", "tuning.asha.RungMemoryASHA", "tuning.objectives.ParetoOptunaSearch",
    "gammaray.config.StorageConfig",  # its name in experiments written before the config package split
})
# stored by reference, never called at load time
TUNE_VALUES = frozenset({
    "numpy.random._mt19937.MT19937", "numpy.random._pcg64.PCG64", "numpy.random.bit_generator.SeedSequence",
    "optuna.samplers._tpe.parzen_estimator._ParzenEstimator", "optuna.samplers._tpe.sampler.default_weights",
    "optuna.samplers._tpe.sampler.default_gamma", "optuna.samplers._tpe.sampler.hyperopt_default_gamma",
    # set by TPE on its first multi-objective sample, after its random start-up trials (10)
    "optuna.samplers._tpe.sampler.default_gamma_multiobjective",
    "ray.train._internal.storage._upload_to_fs_path", "tuning.search.trial_dirname",
})
# what Ray Tune and gammaray read back from an experiment folder (the root) and a trial folder
_ROOT_SUFFIXES = (".pkl", ".json", ".state")
_TRIAL_SKIPPED = {"error.pkl"}  # never read back (no_pickled_trial_errors); text copy: error.txt


def check_state_file(data: bytes, shown: str) -> None:
    """One file Tune or gammaray unpickles: a pickle (whatever its name), or JSON whose hex
    strings Tune decodes as cloudpickles."""
    if data[:1] in (b"{", b"["):
        try:
            doc = json.loads(data)
        except ValueError:
            doc = None  # not JSON after all: a pickle may start with "(" or "[" only at protocol 0-1
        if doc is not None:
            _check_json(doc, shown)
            return
    check_pickle(data, shown, TUNE_CALLS, TUNE_VALUES, hex_strings=True, advice=ADVICE)


def _check_json(value, shown: str) -> None:
    if isinstance(value, dict):
        for v in value.values():
            _check_json(v, shown)
    elif isinstance(value, list):
        for v in value:
            _check_json(v, shown)
    elif isinstance(value, str):
        if value[:1] in ("{", "["):  # Tune nests JSON documents as strings (trial states)
            try:
                _check_json(json.loads(value), shown)
                return
            except ValueError:
                pass
        if len(value) >= 2 and len(value) % 2 == 0:
            try:
                raw = bytes.fromhex(value)
            except ValueError:
                return
            # any hex text may be a cloudpickle Tune decodes; text that is not a pickle stops at once
            try:
                called, named = pickle_references(raw, hex_strings=True, lenient=True)
            except ValueError as err:
                raise UnsafeCheckpoint(f"{shown}: refused to load: a stored pickle cannot be checked ({err}). "
                                       f"{ADVICE}") from None
            bad = sorted((called - TUNE_CALLS) | (named - TUNE_CALLS - TUNE_VALUES))
            if bad:
                raise UnsafeCheckpoint(f"{shown}: refused to load: it references code, not only data "
                                       f"({', '.join(bad[:5])}). {ADVICE}")


def state_files(exp_uri: str, store: Store) -> list[str]:
    """The files of an experiment folder that Ray Tune or gammaray unpickle."""
    out = []
    for f in store.list_files(exp_uri):
        rel = f[len(exp_uri.rstrip("/")) + 1:]
        parts = rel.split("/")
        if len(parts) == 1 and rel.endswith(_ROOT_SUFFIXES):
            out.append(f)
        elif len(parts) == 2 and parts[0].startswith("trial_") and rel.endswith(".pkl") \
                and parts[1] not in _TRIAL_SKIPPED:
            out.append(f)
    return sorted(out)


def check_experiment(exp_uri: str, store: Store) -> int:
    """Refuse (UnsafeCheckpoint, naming the file) an experiment folder holding a file that would run
    code when Ray Tune or gammaray loads it; returns the number of files checked."""
    files = state_files(exp_uri, store)
    for f in files:
        check_state_file(store.read_bytes(f), f)
    return len(files)


def no_pickled_trial_errors() -> None:
    """Ray Tune reads a failed trial's exception back from `trial_*/error.pkl` (a cloudpickled,
    dynamically made exception class: code by design, so it cannot be checked); read the text copy
    (`error.txt`) instead, as Tune does when the pickle is missing."""
    from ray.tune.experiment.trial import Trial

    Trial.get_pickled_error = _no_pickled_error


def _no_pickled_error(self) -> None:
    return None



class CheckableVariantGenerator(BasicVariantGenerator):
    """Ray Tune's random/grid searcher, with a state that can be checked: Tune stores each of its
    trial iterators with an argparse parser, whose registry holds a function defined inside
    ArgumentParser.__init__ (stored as code). The parser is left out and rebuilt on restore."""

    def get_state(self):
        state = super().get_state()
        if state is False:
            return state
        iterators = []
        for it in state["_iterators"]:
            it = copy.copy(it)
            it.parser = None
            iterators.append(it)
        return {**state, "_iterators": iterators}

    def set_state(self, state):
        super().set_state(state)
        for it in self._iterators:
            if getattr(it, "parser", None) is None:
                it.parser = _make_parser()
