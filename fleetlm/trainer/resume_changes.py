"""Warnings for a resume whose arguments change what the checkpoint's step and sample count mean.

A checkpoint records the samples consumed so far, and the training stream is a function of the data
arguments (fleetlm.data): with another seed, split, sequence length or input, sample i is a different
sample, so the resumed run repeats or skips data, and another split can put trained-on documents
into the evaluation set. The learning-rate schedule is recomputed from this run's arguments, so a
changed max_steps (when decay_steps follows it), rate or warmup moves the rate at once.
Both are sometimes intended (extending a run, fine-tuning on new data), so they are warnings.
"""

import math
import os
import types
from typing import Any, Dict, List

from fleetlm.data.builder import parse_split
from fleetlm.data.errors import DataError
from fleetlm.trainer.lr import learning_rate_at, schedule_settings

DATA_KEYS = ("input_dir", "split", "max_seq_length", "seed")
SCHEDULE_KEYS = ("learning_rate", "min_learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio",
                 "decay_steps", "max_steps")


def _normalized(key: str, value: Any) -> Any:
    """Return a form of a data argument in which two spellings of the same setting compare equal.

    input_dir: paths made absolute and blend weights as numbers. The saved run is assumed to have
    started in this working directory. split: the normalized fractions.
    """
    if key == "input_dir" and isinstance(value, str):
        fields = value.split()
        if len(fields) == 1:
            return os.path.abspath(fields[0])
        try:
            return tuple((float(w), os.path.abspath(p)) for w, p in zip(fields[0::2], fields[1::2]))
        except ValueError:
            return value
    if key == "split":
        try:
            return tuple(parse_split(value))
        except DataError:
            return value
    return value


def _changes(saved: Dict[str, Any], current: Dict[str, Any], keys) -> List[str]:
    return [f"{key}: saved {saved[key]!r}, now {current[key]!r}" for key in keys
            if key in saved and key in current and _normalized(key, saved[key]) != _normalized(key, current[key])]


def _first_difference(step: int, before, after, end: int) -> int:
    """Return the first 0-based step from ``step`` on whose rate differs between the two schedules, ``end`` if none before it."""
    t = step
    while t < end and math.isclose(learning_rate_at(t, *before), learning_rate_at(t, *after), rel_tol=1e-9):
        t += 1
    return t


def resume_change_warnings(checkpoint: str, saved: Dict[str, Any], current: Dict[str, Any], step: int,
                           consumed_samples: int) -> List[str]:
    """Return a warning for changed data arguments and one for a changed schedule, each only when it applies.

    ``saved`` and ``current`` are flat argument dicts (``Arguments.to_dict``; a checkpoint's
    config.json keeps the saved one under "arguments"). Keys missing from either are not compared.
    """
    warnings = []
    data_changes = _changes(saved, current, DATA_KEYS)
    if data_changes:
        warnings.append(
            f"resuming {checkpoint} with other data arguments than it was saved with ({'; '.join(data_changes)}). "
            f"The checkpoint consumed {consumed_samples} samples of the saved sample order; this run goes on from "
            f"sample {consumed_samples} of another order, so samples may repeat or be skipped, and with another "
            "split or input_dir, documents trained on may be in the evaluation set. Resume with the saved values "
            "to continue the same data stream."
        )
    if all(key in saved for key in SCHEDULE_KEYS):
        before = schedule_settings(types.SimpleNamespace(**{key: saved[key] for key in SCHEDULE_KEYS}))
        after = schedule_settings(types.SimpleNamespace(**{key: current[key] for key in SCHEDULE_KEYS}))
        end = int(current["max_steps"])
        t = _first_difference(step, before, after, end)
        if before != after and t < end:
            schedule_changes = _changes(saved, current, SCHEDULE_KEYS)
            when = "" if t == step else " (the rates agree until then)"
            warnings.append(
                f"resuming {checkpoint} with another learning-rate schedule ({'; '.join(schedule_changes)}): step "
                f"{t + 1} runs at {learning_rate_at(t, *after):.3e}, where the saved schedule has "
                f"{learning_rate_at(t, *before):.3e}{when}. Resume with the saved values to keep the schedule."
            )
    return warnings
