"""Per-rank model and optimizer shards in a checkpoint, and resharding them for another layout.

Files of one checkpoint directory (written inside the atomic ``checkpoint-STEP.tmp`` scheme):
    model_state.pdparams                  whole parameters by structured name, when tp = pp = 1
    model_state.tp{T}_pp{P}.pdparams      otherwise, one per tensor-parallel rank T and stage P:
                                          {"tensors": {name: shard}, "split_axis": {name: axis or None},
                                           "tp_rank": T, "tp_degree": tp}
    model_state.tp{T}_pp{P}_sd{S}.pdparams  sharding stage 3, one per sharding rank S as well; a sliced
                                          parameter's tensor is S's piece of the flattened, padded
                                          tensor, placed by "slices": {name: {"start": offset, "shape": ...}}
    optimizer.tp{T}_pp{P}_sd{S}.pdopt     AdamW state of the parameters sharding rank S updates:
                                          {"state": {name: {"moment1": ..., "moment2": ...,
                                           "beta1_pow_acc": ..., "beta2_pow_acc": ..., "master_weight": ...}},
                                           "split_axis", "tp_rank", "tp_degree", "LR_Scheduler"}
Only data-parallel rank 0 writes (replicas are equal); under sharding stages 1 and 2 only sharding
rank 0 writes the model, every sharding rank its optimizer file; under stage 3 every sharding rank
writes both. A stage-3 optimizer entry carries the same "start" and "shape" for its moments. Names are the parameters'
structured names in the single-process model, so a shard file is independent of the layout.

Resume in any layout: every rank reads all shard files, concatenates split tensors along their
split axis in tensor-parallel rank order to whole tensors, and slices out its own part (under
stage 3 also its piece of the flattened tensor, for the weights and the moments).
NOTE: this keeps a whole copy of the weights and of the AdamW moments (about 3x the fp32 model
size) in every process while it runs; at the sizes trained on CPU that is a few MB. A
multi-billion-parameter resume would need a per-tensor streaming version of it.
"""

import os
import re
from typing import Any, Dict, List, Optional

import numpy as np
import paddle

from fleetlm.trainer.checkpoint import CheckpointError

MODEL_STATE = "model_state.pdparams"
_MODEL_SHARD = re.compile(r"^model_state\.tp(\d+)_pp(\d+)(_sd\d+)?\.pdparams$")
_OPTIMIZER_SHARD = re.compile(r"^optimizer\.tp(\d+)_pp(\d+)_sd(\d+)\.pdopt$")
ACCUMULATORS = ("moment1", "moment2", "beta1_pow_acc", "beta2_pow_acc")


def model_file_name(layout, tp_rank: int, pp_rank: int, stage3_rank: Optional[int] = None) -> str:
    if stage3_rank is not None:
        return f"model_state.tp{tp_rank:02d}_pp{pp_rank:02d}_sd{stage3_rank:02d}.pdparams"
    if layout.tp_degree == 1 and layout.pp_degree == 1:
        return MODEL_STATE
    return f"model_state.tp{tp_rank:02d}_pp{pp_rank:02d}.pdparams"


def stage3_spans(parameters: Dict[str, Any], engine, sharding_rank: int) -> Dict[str, tuple]:
    """This rank's [start, end) of the flattened, padded tensor of each parameter that stage 3 has sliced."""
    return {
        name: tuple(engine._param2buffer[entry.parameter.name][sharding_rank])
        for name, entry in parameters.items()
        if hasattr(entry.parameter, "fw_storage")
    }


def stage3_slices(parameters: Dict[str, Any], engine, sharding_rank: int) -> Dict[str, Dict[str, Any]]:
    """Offset and tensor-parallel shape of each parameter that sharding stage 3 has sliced."""
    slices = {}
    for name, entry in parameters.items():
        if hasattr(entry.parameter, "fw_storage"):
            start, _ = engine._param2buffer[entry.parameter.name][sharding_rank]
            slices[name] = {"start": start, "shape": list(entry.parameter.shape)}
    return slices


def _stored_tensor(parameter):
    """Return the tensor with ``parameter``'s values on this rank: its stage-3 slice when sliced."""
    return getattr(parameter, "fw_storage", parameter)


def optimizer_file_name(tp_rank: int, pp_rank: int, sharding_rank: int) -> str:
    return f"optimizer.tp{tp_rank:02d}_pp{pp_rank:02d}_sd{sharding_rank:02d}.pdopt"


def _accumulator_key(optimizer, parameter) -> str:
    """Return the name that AdamW keys ``parameter``'s moments by.

    Stage 3: "slice@<name>", the name its slice had when the moments were created (Paddle 3.3.1
    later replaces ``fw_storage`` by tensors named eager_tmp_N). O2: the fp32 master weight's name.
    """
    if hasattr(parameter, "fw_storage"):
        return "slice@" + parameter.name
    master = getattr(optimizer, "_master_weights", {}).get(parameter.name)
    return master.name if master is not None else parameter.name


def model_shard(parameters: Dict[str, Any], layout, tp_rank: int, slices: Optional[Dict] = None) -> Dict[str, Any]:
    """This rank's model file content; ``parameters`` maps names to ``ShardedParameter``."""
    tensors = {name: _stored_tensor(entry.parameter) for name, entry in parameters.items()}
    if layout.tp_degree == 1 and layout.pp_degree == 1 and slices is None:
        return tensors
    return {
        "tensors": tensors,
        "split_axis": {name: entry.split_axis for name, entry in parameters.items()},
        "tp_rank": tp_rank,
        "tp_degree": layout.tp_degree,
        "slices": slices or {},
    }


def optimizer_shard(
    parameters: Dict[str, Any], optimizer, scheduler, layout, tp_rank: int, slices: Optional[Dict] = None
) -> Dict[str, Any]:
    """This rank's optimizer file content: AdamW state of the parameters this rank updates."""
    # A rank owns the parameters it has moments for. (Stage 3 swaps the optimizer's parameter list
    # between slices and whole parameters, so the list itself is no guide.)
    owned = set(optimizer._accumulators.get("moment1", {}))
    state = {}
    for name, entry in parameters.items():
        parameter = entry.parameter
        key = _accumulator_key(optimizer, parameter)
        if key not in owned:
            continue
        values = {}
        for accumulator in ACCUMULATORS:
            tensor = optimizer._accumulators.get(accumulator, {}).get(key)
            if tensor is not None:
                values[accumulator] = tensor
        master = getattr(optimizer, "_master_weights", {}).get(parameter.name)
        if master is not None:
            values["master_weight"] = master
        if values:
            state[name] = values
    return {
        "state": state,
        "split_axis": {name: entry.split_axis for name, entry in parameters.items()},
        "tp_rank": tp_rank,
        "tp_degree": layout.tp_degree,
        "LR_Scheduler": scheduler.state_dict(),
        "slices": slices or {},
    }


def _merge(parts: Dict[int, Any], axis: Optional[int]) -> np.ndarray:
    """Join tensor-parallel pieces {tp_rank: array or stage-3 pieces} into the whole tensor."""
    arrays = {rank: _join_slices(piece) if isinstance(piece, list) else piece for rank, piece in parts.items()}
    if axis is None:
        return next(iter(arrays.values()))
    return np.concatenate([arrays[r] for r in sorted(arrays)], axis=axis)


def _join_slices(pieces: List) -> np.ndarray:
    """Rebuild a tensor from its stage-3 pieces [(start, flat array, shape)]: concatenate, drop padding."""
    shape = pieces[0][2]
    flat = np.concatenate([array.reshape([-1]) for _, array, _ in sorted(pieces, key=lambda p: p[0])])
    return flat[: int(np.prod(shape))].reshape(shape)


def _add_piece(parts: Dict[int, Any], tp_rank: int, array: np.ndarray, slice_info: Optional[Dict]) -> None:
    if slice_info is None:
        parts[tp_rank] = array
    else:
        parts.setdefault(tp_rank, []).append((slice_info["start"], array, slice_info["shape"]))


def model_shard_files(path: str) -> List[str]:
    """Return the names of the per-rank model files (model_state.tp*_pp*[_sd*].pdparams) in ``path``, sorted."""
    if not os.path.isdir(path):
        return []
    return sorted(f for f in os.listdir(path) if _MODEL_SHARD.match(f))


def read_full_model(path: str) -> Dict[str, np.ndarray]:
    """Whole parameters by name, assembled from the model file(s) of checkpoint ``path``."""
    single = os.path.join(path, MODEL_STATE)
    if os.path.isfile(single):
        return {name: tensor.numpy() for name, tensor in paddle.load(single).items()}
    files = sorted(f for f in os.listdir(path) if _MODEL_SHARD.match(f))
    if not files:
        raise CheckpointError(f"{path} has neither {MODEL_STATE} nor model_state.tp*_pp*.pdparams files.")
    parts: Dict[str, Dict[int, np.ndarray]] = {}
    axes: Dict[str, Optional[int]] = {}
    for file_name in files:
        shard = paddle.load(os.path.join(path, file_name))
        slices = shard.get("slices", {})
        for name, tensor in shard["tensors"].items():
            _add_piece(parts.setdefault(name, {}), shard["tp_rank"], tensor.numpy(), slices.get(name))
            axes[name] = shard["split_axis"][name]
    return {name: _merge(pieces, axes[name]) for name, pieces in parts.items()}


def read_full_optimizer(path: str):
    """Whole AdamW state by parameter name and accumulator, and the LR scheduler state."""
    files = sorted(f for f in os.listdir(path) if _OPTIMIZER_SHARD.match(f))
    if not files:
        raise CheckpointError(f"{path} has no optimizer.tp*_pp*_sd*.pdopt files.")
    parts: Dict[str, Dict[str, Dict[int, np.ndarray]]] = {}
    axes: Dict[str, Optional[int]] = {}
    scheduler = None
    for file_name in files:
        shard = paddle.load(os.path.join(path, file_name))
        scheduler = shard["LR_Scheduler"]
        slices = shard.get("slices", {})
        for name, values in shard["state"].items():
            axes[name] = shard["split_axis"][name]
            for accumulator, tensor in values.items():
                target = parts.setdefault(name, {}).setdefault(accumulator, {})
                sliced = accumulator in ("moment1", "moment2", "master_weight") and name in slices
                _add_piece(target, shard["tp_rank"], tensor.numpy(), slices[name] if sliced else None)
    state = {}
    for name, accumulators in parts.items():
        state[name] = {}
        for accumulator, pieces in accumulators.items():
            # Beta powers are [1] per parameter and equal on every tensor-parallel rank.
            axis = axes[name] if accumulator in ("moment1", "moment2", "master_weight") else None
            state[name][accumulator] = _merge(pieces, axis)
    return state, scheduler


def _local_slice(full: np.ndarray, local_shape: List[int], axis: Optional[int], tp_rank: int) -> np.ndarray:
    if axis is None:
        return full
    size = local_shape[axis]
    index = [slice(None)] * full.ndim
    index[axis] = slice(tp_rank * size, (tp_rank + 1) * size)
    return full[tuple(index)]


def _expected_full_shape(local_shape: List[int], axis: Optional[int], tp_degree: int) -> List[int]:
    shape = list(local_shape)
    if axis is not None:
        shape[axis] *= tp_degree
    return shape


def _set(target: paddle.Tensor, value: np.ndarray) -> None:
    with paddle.no_grad():
        target.set_value(paddle.to_tensor(np.ascontiguousarray(value)).astype(target.dtype))


def _stage3_piece(value: np.ndarray, span: Optional[tuple]) -> np.ndarray:
    """Cut a stage-3 rank's piece [start, end) out of the flattened tensor, zero-padded as Paddle pads it."""
    if span is None:
        return value
    start, end = span
    flat = value.reshape([-1])
    if flat.size < end:
        flat = np.concatenate([flat, np.zeros(end - flat.size, dtype=flat.dtype)])
    return flat[start:end]


def load_resharded(
    path: str,
    parameters: Dict[str, Any],
    optimizer,
    scheduler,
    tp_rank: int,
    tp_degree: int,
    describe_layouts: str,
    stage3_spans: Optional[Dict[str, tuple]] = None,
) -> None:
    """Set this rank's parameters and AdamW state from checkpoint ``path``, whatever layout wrote it.

    ``stage3_spans`` maps the names of parameters that sharding stage 3 has sliced to this rank's
    [start, end) of the flattened, padded tensor; their values go into the slice and its moments.
    Raises CheckpointError naming both layouts when a parameter is missing or its whole shape differs.
    """
    spans = stage3_spans or {}
    full_model = read_full_model(path)
    for name, entry in parameters.items():
        local_shape = list(entry.parameter.shape)
        expected = _expected_full_shape(local_shape, entry.split_axis, tp_degree)
        if name not in full_model:
            raise CheckpointError(
                f"{path} cannot be resumed in this layout: it has no parameter '{name}' ({describe_layouts})."
            )
        if list(full_model[name].shape) != expected:
            raise CheckpointError(
                f"{path} cannot be resumed in this layout: parameter '{name}' has shape {list(full_model[name].shape)} "
                f"in the checkpoint, this run expects {expected} ({describe_layouts})."
            )
        value = _local_slice(full_model[name], local_shape, entry.split_axis, tp_rank)
        _set(_stored_tensor(entry.parameter), _stage3_piece(value, spans.get(name)))

    full_state, scheduler_state = read_full_optimizer(path)
    # Before its first step, stage 3's optimizer still lists the whole parameters; the moments belong
    # to the slices (named "slice@<name>"), so they are created for the slices here.
    listed = {p.name for p in optimizer._parameter_list}
    owned = {name: entry for name, entry in parameters.items()
             if entry.parameter.name in listed or _accumulator_key(optimizer, entry.parameter) in listed}
    block = paddle.static.default_main_program().global_block()
    optimizer._create_accumulators(block, [_stored_tensor(entry.parameter) for entry in owned.values()])
    for name, entry in owned.items():
        if name not in full_state:
            raise CheckpointError(f"{path} has no optimizer state for parameter '{name}' ({describe_layouts}).")
        local_shape = list(entry.parameter.shape)
        values = full_state[name]
        span = spans.get(name)
        master = getattr(optimizer, "_master_weights", {}).get(entry.parameter.name)
        if master is not None and "master_weight" in values:
            master_value = _local_slice(values["master_weight"], local_shape, entry.split_axis, tp_rank)
            _set(master, _stage3_piece(master_value, span))
        key = _accumulator_key(optimizer, entry.parameter)
        for accumulator in ACCUMULATORS:
            if accumulator not in values:
                continue
            target = optimizer._accumulators[accumulator][key]
            if accumulator in ("moment1", "moment2"):
                moment = _local_slice(values[accumulator], local_shape, entry.split_axis, tp_rank)
                _set(target, _stage3_piece(moment, span))
            else:
                _set(target, values[accumulator])
    if scheduler_state is not None:
        scheduler.set_state_dict(scheduler_state)
