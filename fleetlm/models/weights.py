"""Read released weights into a fleetlm model, and write a fleetlm state in Hugging Face's layout.

A weights directory contains config.json and one of:

* ``model.safetensors``, or shards listed by ``model.safetensors.index.json``;
* ``pytorch_model.bin``, or shards listed by ``pytorch_model.bin.index.json`` (needs torch);
* ``model_state.pdparams``, or shards listed by ``model_state.pdparams.index.json``;
* a fleetlm checkpoint's per-rank model files (``model_state.tp*_pp*.pdparams``, and
  ``model_state.tp*_pp*_sd*.pdparams`` under sharding stage 3), which
  ``fleetlm.trainer.sharded_checkpoint.read_full_model`` joins into whole tensors.

Tensors already named as the fleetlm model names them (a fleetlm checkpoint, PaddleNLP's LLaMA) are
loaded as they are; .pdparams files must be named so. Otherwise the names follow the Hugging Face layout of the config.json's
model_type, and the rules below translate them. PyTorch Linear weights are [out, in] and Paddle's
are [in, out], so they are transposed. GPT-2's Conv1D weights are [in, out] already. Fused q/k/v
projections (Baichuan's W_pack, Qwen's and GPT-2's c_attn, BLOOM's and ChatGLM's query_key_value)
and fused gate/up projections (ChatGLM2's dense_h_to_4h) are split into fleetlm's separate ones.
"""

import json
import os
import pickle
import re
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from fleetlm.arguments import ConfigError
from fleetlm.models.config import ModelConfig
from fleetlm.utils.log import get_logger

logger = get_logger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model_state.pdparams")


# ---- reading tensor files ----

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _bf16_to_fp32(bits: np.ndarray) -> np.ndarray:
    # bfloat16 is the upper half of a float32: shift the 16 bits into place.
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """Read a .safetensors file with NumPy (bfloat16 becomes float32).

    Layout: an 8-byte little-endian header length N, N bytes of JSON mapping each name to its
    dtype, shape and [begin, end) byte offsets, then the raw little-endian data.
    """
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ConfigError(f"{path}: tensor '{name}' has dtype {info['dtype']}, which fleetlm cannot read.")
        begin, end = info["data_offsets"]
        array = np.frombuffer(data[begin:end], dtype=_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
        tensors[name] = _bf16_to_fp32(array) if info["dtype"] == "BF16" else array
    return tensors


def _read_torch_bin(path: str) -> Dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ConfigError(f"{path} is a PyTorch file and reading it needs torch; install torch (CPU) or convert "
                          "the weights to safetensors.") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    out = {}
    for name, tensor in state.items():
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        out[name] = tensor.numpy()
    return out


def _read_pdparams(path: str) -> Dict[str, np.ndarray]:
    import paddle

    state = paddle.load(path)
    if not isinstance(state, dict):
        raise ValueError(f"paddle.load returned a {type(state).__name__}, not a dict of tensors")
    out = {}
    for name, tensor in state.items():
        if isinstance(tensor, paddle.Tensor):
            if tensor.dtype == paddle.bfloat16:
                tensor = tensor.astype("float32")
            out[name] = tensor.numpy()
        else:
            out[name] = np.asarray(tensor)
    return out


_READERS = {"model.safetensors": read_safetensors, "pytorch_model.bin": _read_torch_bin,
            "model_state.pdparams": _read_pdparams}


# Errors the file readers raise for a truncated, zeroed or otherwise unparsable file. paddle.load
# raises ValueError or EOFError, a short safetensors header raises struct.error, and torch.load
# raises RuntimeError or UnpicklingError.
_UNREADABLE_FILE_ERRORS = (ValueError, EOFError, pickle.UnpicklingError, struct.error, RuntimeError, OSError)

# The files of a fleetlm checkpoint that reading its weights needs: config.json and the model files.
_CHECKPOINT_WEIGHT_FILE = re.compile(r"^(config\.json|model_state(\.tp\d+_pp\d+(_sd\d+)?)?\.pdparams)$")


class _DamagedWeights(Exception):
    """A weight file that cannot be read; read_weights turns it into a ConfigError naming the directory."""

    def __init__(self, file_name: str, reason: str):
        super().__init__(f"{file_name}: {reason}")
        self.file_name = file_name
        self.reason = reason


def _verify_weight_file_sizes(directory: str) -> None:
    """Compare the sizes of a fleetlm checkpoint's config.json and model files with trainer_state.json.

    A truncated model file would otherwise fail inside paddle.load, and a missing tensor-parallel
    shard would join into a tensor of the wrong shape. Optimizer and RNG files are not checked, so
    a checkpoint stripped of them to save disk still exports. Raises _DamagedWeights.
    """
    from fleetlm.trainer.checkpoint import DamagedCheckpointError, verify_file_sizes

    # A version 1 checkpoint may have no size list; a missing model file then fails in the reader.
    try:
        verify_file_sizes(directory, only=_CHECKPOINT_WEIGHT_FILE.match)
    except DamagedCheckpointError as e:
        raise _DamagedWeights(e.file_name, e.reason) from None


def _read_file(reader, path: str) -> Dict[str, np.ndarray]:
    """Run ``reader`` on ``path``, raising _DamagedWeights when the file cannot be parsed."""
    try:
        return reader(path)
    except ConfigError:
        raise
    except _UNREADABLE_FILE_ERRORS as e:
        raise _DamagedWeights(os.path.basename(path), f"{type(e).__name__}: {e}") from None


def _read_checkpoint_shards(directory: str, files: List[str]) -> Tuple[Dict[str, np.ndarray], str]:
    """Join the per-rank model files of a fleetlm checkpoint into whole tensors in Paddle layout."""
    from fleetlm.trainer.checkpoint import CheckpointError
    from fleetlm.trainer.sharded_checkpoint import read_full_model

    source = os.path.join(directory, "model_state.tp*_pp*.pdparams")
    # NOTE: without trainer_state.json (model files copied on their own) nothing checks that
    # every tensor-parallel rank and pipeline stage is present. load_pretrained still compares
    # each tensor's shape with the model's, but the export does not.
    try:
        tensors = read_full_model(directory)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    except (KeyError, *_UNREADABLE_FILE_ERRORS) as e:
        # read_full_model does not say which file failed, but paddle.load's message names it.
        raise _DamagedWeights("a model_state.tp*_pp*.pdparams file", f"{type(e).__name__}: {e}") from None
    # Tensor.numpy() returns bfloat16 as its uint16 bits, and model parameters are never integers.
    tensors = {name: _bf16_to_fp32(array) if array.dtype == np.uint16 else array for name, array in tensors.items()}
    logger.info("joined %d tensors from %d model files in %s", len(tensors), len(files), directory)
    return tensors, source


def _read_index(index: str, directory: str, reader) -> Dict[str, np.ndarray]:
    """Read every shard listed in the weight_map of the ``*.index.json`` file ``index``."""
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ConfigError(f"{index} is not a JSON object of a weight index ({type(e).__name__}: {e}).") from None
    if not isinstance(weight_map, dict):
        raise ConfigError(f"{index} has no 'weight_map' object of tensor name -> shard file.")
    tensors: Dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        path = os.path.join(directory, shard)
        if not os.path.isfile(path):
            raise ConfigError(f"{index} lists shard {shard}, which is not in {directory}.")
        tensors.update(_read_file(reader, path))
    return tensors


def _read_first_weights(directory: str) -> Tuple[Dict[str, np.ndarray], str]:
    """Read the first weights found in the order of WEIGHT_FILES, then a fleetlm checkpoint's per-rank files."""
    from fleetlm.trainer.sharded_checkpoint import model_shard_files

    for base in WEIGHT_FILES:
        reader = _READERS[base]
        index = os.path.join(directory, base + ".index.json")
        single = os.path.join(directory, base)
        # transformers 5.25 (modeling_utils) loads model.safetensors before model.safetensors.index.json,
        # and pytorch_model.bin before its index. Reading in the same order gives the same weights.
        if os.path.isfile(single):
            if os.path.isfile(index):
                logger.warning(
                    "%s contains both %s and %s, which may hold different weights; reading %s, as transformers "
                    "does. Delete the stale one.", directory, base, base + ".index.json", base,
                )
            return _read_file(reader, single), single
        if os.path.isfile(index):
            return _read_index(index, directory, reader), index
    shard_files = model_shard_files(directory)
    if shard_files:
        return _read_checkpoint_shards(directory, shard_files)
    raise ConfigError(
        f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILES)} (or its .index.json with shards), "
        "or the model_state.tp*_pp*.pdparams files of a fleetlm checkpoint."
    )


def read_weights(directory: str) -> Tuple[Dict[str, np.ndarray], str]:
    """Return (every tensor of the directory's weights by name, the file or index that listed them).

    Raises ConfigError naming the file when a weight file is missing, truncated or cannot be parsed.
    """
    from fleetlm.trainer.checkpoint import TRAINER_STATE, CheckpointError

    checkpoint = os.path.isfile(os.path.join(directory, TRAINER_STATE))
    try:
        if checkpoint:
            _verify_weight_file_sizes(directory)
        return _read_first_weights(directory)
    except CheckpointError as e:
        # trainer_state.json has a format version this fleetlm cannot read.
        raise ConfigError(str(e)) from None
    except _DamagedWeights as e:
        fix = "Use another checkpoint-STEP directory of the run." if checkpoint else "Replace it with an intact copy."
        raise ConfigError(
            f"cannot read the weights of {directory}: {e.file_name} is damaged ({e.reason}). {fix}"
        ) from None


# ---- name and layout rules per Hugging Face layout ----


@dataclass(frozen=True)
class Rule:
    """One checkpoint tensor and the fleetlm tensor(s) it becomes; ``{i}`` stands for the layer index.

    kind: "linear" (PyTorch [out, in], transposed), "conv1d" (GPT-2's [in, out], kept) or "copy".
    split: None, "qkv" (q | k | v along the output), "qkv_heads" (per head [q_h | k_h | v_h]),
    or "halves" (two equal parts along the output, in the order of ``fleet``).
    """

    hf: str
    fleet: Tuple[str, ...]
    kind: str = "copy"
    split: Optional[str] = None


def _r(hf: str, fleet, kind: str = "copy", split: Optional[str] = None) -> Rule:
    return Rule(hf, (fleet,) if isinstance(fleet, str) else tuple(fleet), kind, split)


def _weight_and_bias(hf: str, fleet, kind: str, bias: bool, split: Optional[str] = None) -> List[Rule]:
    """Rules for ``hf.weight`` and, with ``bias``, ``hf.bias`` (the same split, no transpose)."""
    fleet = (fleet,) if isinstance(fleet, str) else tuple(fleet)
    rules = [_r(hf + ".weight", [f + ".weight" for f in fleet], kind, split)]
    if bias:
        rules.append(_r(hf + ".bias", [f + ".bias" for f in fleet], "copy", split))
    return rules


def _llama_like_rules(c: ModelConfig, layout: str) -> Tuple[List[Rule], List[Rule]]:
    """(model-level rules, per-layer rules) of LLaMA, Qwen2, Baichuan, Qwen v1 and ChatGLM2 checkpoints."""
    f = "llama.layers.{i}."
    qkv = [f + "self_attn.q_proj", f + "self_attn.k_proj", f + "self_attn.v_proj"]
    if layout in ("llama", "qwen2", "baichuan"):
        h = "model.layers.{i}."
        top = [_r("model.embed_tokens.weight", "llama.embed_tokens.weight"), _r("model.norm.weight", "llama.norm.weight")]
        if layout == "baichuan":
            layer = [_r(h + "self_attn.W_pack.weight", [q + ".weight" for q in qkv], "linear", "qkv")]
        else:
            layer = []
            for name in ("q_proj", "k_proj", "v_proj"):
                layer += _weight_and_bias(h + "self_attn." + name, f + "self_attn." + name, "linear", c.attention_bias)
        layer += _weight_and_bias(h + "self_attn.o_proj", f + "self_attn.o_proj", "linear", c.attention_out_bias)
        for name in ("gate_proj", "up_proj", "down_proj"):
            layer += _weight_and_bias(h + "mlp." + name, f + "mlp." + name, "linear", c.mlp_bias)
        layer += [_r(h + "input_layernorm.weight", f + "input_layernorm.weight"),
                  _r(h + "post_attention_layernorm.weight", f + "post_attention_layernorm.weight")]
        head = "lm_head.weight"
    elif layout == "qwen":
        h = "transformer.h.{i}."
        top = [_r("transformer.wte.weight", "llama.embed_tokens.weight"), _r("transformer.ln_f.weight", "llama.norm.weight")]
        layer = _weight_and_bias(h + "attn.c_attn", qkv, "linear", True, "qkv")
        layer += _weight_and_bias(h + "attn.c_proj", f + "self_attn.o_proj", "linear", c.attention_out_bias)
        # Qwen's MLP is c_proj(w1(x) * silu(w2(x))): w2 is the gate, w1 the up projection.
        layer += [_r(h + "mlp.w1.weight", f + "mlp.up_proj.weight", "linear"),
                  _r(h + "mlp.w2.weight", f + "mlp.gate_proj.weight", "linear"),
                  _r(h + "mlp.c_proj.weight", f + "mlp.down_proj.weight", "linear"),
                  _r(h + "ln_1.weight", f + "input_layernorm.weight"),
                  _r(h + "ln_2.weight", f + "post_attention_layernorm.weight")]
        head = "lm_head.weight"
    elif layout == "chatglm2":
        h = "transformer.encoder.layers.{i}."
        top = [_r("transformer.embedding.word_embeddings.weight", "llama.embed_tokens.weight"),
               _r("transformer.encoder.final_layernorm.weight", "llama.norm.weight")]
        layer = _weight_and_bias(h + "self_attention.query_key_value", qkv, "linear", c.attention_bias, "qkv")
        layer += [_r(h + "self_attention.dense.weight", f + "self_attn.o_proj.weight", "linear"),
                  # dense_h_to_4h is [gate | up]: ChatGLM2's swiglu is silu(first half) * second half.
                  _r(h + "mlp.dense_h_to_4h.weight", [f + "mlp.gate_proj.weight", f + "mlp.up_proj.weight"], "linear",
                     "halves"),
                  _r(h + "mlp.dense_4h_to_h.weight", f + "mlp.down_proj.weight", "linear"),
                  _r(h + "input_layernorm.weight", f + "input_layernorm.weight"),
                  _r(h + "post_attention_layernorm.weight", f + "post_attention_layernorm.weight")]
        head = "transformer.output_layer.weight"
    else:
        raise ConfigError(f"no weight layout '{layout}' for model_type '{c.model_type}'.")
    if not c.tie_word_embeddings:
        top.append(_r(head, "lm_head.weight", "linear"))
    return top, layer


def _gpt_like_rules(c: ModelConfig, layout: str) -> Tuple[List[Rule], List[Rule]]:
    """(model-level rules, per-layer rules) of GPT-2, OPT and BLOOM checkpoints."""
    f = "gpt.layers.{i}."
    qkv = [f + "self_attn.q_proj", f + "self_attn.k_proj", f + "self_attn.v_proj"]
    if layout == "gpt2":
        h = "transformer.h.{i}."
        top = [_r("transformer.wte.weight", "gpt.embed_tokens.weight"),
               _r("transformer.wpe.weight", "gpt.embed_positions.weight")]
        top += _weight_and_bias("transformer.ln_f", "gpt.norm", "copy", True)
        layer = _weight_and_bias(h + "attn.c_attn", qkv, "conv1d", True, "qkv")
        layer += _weight_and_bias(h + "attn.c_proj", f + "self_attn.o_proj", "conv1d", True)
        layer += _weight_and_bias(h + "mlp.c_fc", f + "mlp.up_proj", "conv1d", True)
        layer += _weight_and_bias(h + "mlp.c_proj", f + "mlp.down_proj", "conv1d", True)
        layer += _weight_and_bias(h + "ln_1", f + "input_layernorm", "copy", True)
        layer += _weight_and_bias(h + "ln_2", f + "post_attention_layernorm", "copy", True)
    elif layout == "opt":
        d = "model.decoder."
        h = d + "layers.{i}."
        top = [_r(d + "embed_tokens.weight", "gpt.embed_tokens.weight"),
               _r(d + "embed_positions.weight", "gpt.embed_positions.weight")]
        if c.pre_norm:
            top += _weight_and_bias(d + "final_layer_norm", "gpt.norm", "copy", True)
        if c.word_embed_proj_dim not in (None, c.hidden_size):
            top += [_r(d + "project_in.weight", "gpt.project_in.weight", "linear"),
                    _r(d + "project_out.weight", "gpt.project_out.weight", "linear")]
        layer = []
        for name in ("q_proj", "k_proj", "v_proj"):
            layer += _weight_and_bias(h + "self_attn." + name, f + "self_attn." + name, "linear", True)
        layer += _weight_and_bias(h + "self_attn.out_proj", f + "self_attn.o_proj", "linear", True)
        layer += _weight_and_bias(h + "fc1", f + "mlp.up_proj", "linear", True)
        layer += _weight_and_bias(h + "fc2", f + "mlp.down_proj", "linear", True)
        layer += _weight_and_bias(h + "self_attn_layer_norm", f + "input_layernorm", "copy", True)
        layer += _weight_and_bias(h + "final_layer_norm", f + "post_attention_layernorm", "copy", True)
    elif layout == "bloom":
        h = "transformer.h.{i}."
        top = [_r("transformer.word_embeddings.weight", "gpt.embed_tokens.weight")]
        top += _weight_and_bias("transformer.word_embeddings_layernorm", "gpt.embed_layernorm", "copy", True)
        top += _weight_and_bias("transformer.ln_f", "gpt.norm", "copy", True)
        layer = _weight_and_bias(h + "self_attention.query_key_value", qkv, "linear", True, "qkv_heads")
        layer += _weight_and_bias(h + "self_attention.dense", f + "self_attn.o_proj", "linear", True)
        layer += _weight_and_bias(h + "mlp.dense_h_to_4h", f + "mlp.up_proj", "linear", True)
        layer += _weight_and_bias(h + "mlp.dense_4h_to_h", f + "mlp.down_proj", "linear", True)
        layer += _weight_and_bias(h + "input_layernorm", f + "input_layernorm", "copy", True)
        layer += _weight_and_bias(h + "post_attention_layernorm", f + "post_attention_layernorm", "copy", True)
    else:
        raise ConfigError(f"no weight layout '{layout}' for model_type '{c.model_type}'.")
    if not c.tie_word_embeddings:
        top.append(_r("lm_head.weight", "lm_head.weight", "linear"))
    return top, layer


def _glm_rules(c: ModelConfig, layout: str) -> Tuple[List[Rule], List[Rule]]:
    """(model-level rules, per-layer rules) of ChatGLM-6B checkpoints."""
    if layout != "chatglm":
        raise ConfigError(f"no weight layout '{layout}' for model_type '{c.model_type}'.")
    f = "glm.layers.{i}."
    h = "transformer.layers.{i}."
    qkv = [f + "self_attn.q_proj", f + "self_attn.k_proj", f + "self_attn.v_proj"]
    top = [_r("transformer.word_embeddings.weight", "glm.embed_tokens.weight")]
    top += _weight_and_bias("transformer.final_layernorm", "glm.norm", "copy", True)
    layer = _weight_and_bias(h + "attention.query_key_value", qkv, "linear", True, "qkv_heads")
    layer += _weight_and_bias(h + "attention.dense", f + "self_attn.o_proj", "linear", True)
    layer += _weight_and_bias(h + "mlp.dense_h_to_4h", f + "mlp.up_proj", "linear", True)
    layer += _weight_and_bias(h + "mlp.dense_4h_to_h", f + "mlp.down_proj", "linear", True)
    layer += _weight_and_bias(h + "input_layernorm", f + "input_layernorm", "copy", True)
    layer += _weight_and_bias(h + "post_attention_layernorm", f + "post_attention_layernorm", "copy", True)
    if not c.tie_word_embeddings:
        top.append(_r("lm_head.weight", "lm_head.weight", "linear"))
    return top, layer


# fleetlm model_type -> the Hugging Face layout its export writes (and that a load expects by default).
EXPORT_LAYOUTS = {"llama": "llama", "qwen": "qwen2", "baichuan": "baichuan", "chatglm2": "chatglm2",
                  "gpt": "gpt2", "opt": "opt", "bloom": "bloom", "chatglm": "chatglm"}

# Checkpoint tensors that are derived buffers, not parameters (rotary tables, causal masks).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq", "attn.bias", "attn.masked_bias")


def expand_rules(config: ModelConfig, layout: str) -> List[Rule]:
    """Return every rule of ``layout`` for ``config``, with ``{i}`` replaced by each layer index."""
    if config.model_type in ("llama", "qwen", "baichuan", "chatglm2"):
        top, layer = _llama_like_rules(config, layout)
    elif config.model_type in ("gpt", "opt", "bloom"):
        top, layer = _gpt_like_rules(config, layout)
    else:
        top, layer = _glm_rules(config, layout)
    rules = list(top)
    for i in range(config.num_hidden_layers):
        for rule in layer:
            rules.append(Rule(rule.hf.format(i=i), tuple(n.format(i=i) for n in rule.fleet), rule.kind, rule.split))
    return rules


def _split_sizes(rule: Rule, config: ModelConfig, rows: int) -> List[int]:
    if rule.split == "qkv":
        q = config.num_attention_heads * config.head_dim
        kv = config.num_key_value_heads * config.head_dim
        return [q, kv, kv]
    return [rows // 2, rows // 2]


def _hf_to_fleet(array: np.ndarray, rule: Rule, config: ModelConfig) -> List[np.ndarray]:
    """Split and transpose one checkpoint tensor into the fleetlm tensors of ``rule.fleet``."""
    if rule.kind == "conv1d" and array.ndim == 2:
        array = array.T  # -> [out, in]
    if rule.split is None:
        parts = [array]
    elif rule.split == "qkv_heads":
        # [heads * 3 * d, ...] laid out per head as [q_h; k_h; v_h].
        heads = config.num_attention_heads
        grouped = array.reshape(heads, 3, config.head_dim, *array.shape[1:])
        parts = [grouped[:, j].reshape(heads * config.head_dim, *array.shape[1:]) for j in range(3)]
    else:
        bounds = np.cumsum(_split_sizes(rule, config, array.shape[0]))[:-1]
        parts = np.split(array, bounds, axis=0)
    if rule.kind in ("linear", "conv1d"):
        parts = [p.T if p.ndim == 2 else p for p in parts]  # -> Paddle's [in, out]
    return [np.ascontiguousarray(p) for p in parts]


def _fleet_to_hf(parts: Sequence[np.ndarray], rule: Rule, config: ModelConfig) -> np.ndarray:
    """Inverse of _hf_to_fleet: merge fleetlm tensors into one checkpoint tensor."""
    if rule.kind in ("linear", "conv1d"):
        parts = [p.T if p.ndim == 2 else p for p in parts]  # -> [out, in]
    if rule.split == "qkv_heads":
        heads = config.num_attention_heads
        grouped = [p.reshape(heads, config.head_dim, *p.shape[1:]) for p in parts]
        merged = np.stack(grouped, axis=1).reshape(-1, *parts[0].shape[1:])
    else:
        merged = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    if rule.kind == "conv1d" and merged.ndim == 2:
        merged = merged.T
    return np.ascontiguousarray(merged)


# ---- loading into a model, and conversion for export ----


def _checkpoint_layout(directory: str, config: ModelConfig) -> str:
    from fleetlm.models.hf_configs import hf_model_type

    path = os.path.join(directory, "config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
        layout = hf_model_type(values)
        if layout in ("llama", "qwen2", "baichuan", "qwen", "chatglm2", "gpt2", "opt", "bloom", "chatglm"):
            return layout
    if config.model_type not in EXPORT_LAYOUTS:
        raise ConfigError(f"model_type '{config.model_type}' has no Hugging Face weight layout to import from.")
    return EXPORT_LAYOUTS[config.model_type]


def convert_to_fleet(tensors: Dict[str, np.ndarray], config: ModelConfig, layout: str, source: str) -> Dict[str, np.ndarray]:
    """Map checkpoint tensors in Hugging Face ``layout`` to fleetlm names and Paddle layout."""
    out: Dict[str, np.ndarray] = {}
    used = set()
    for rule in expand_rules(config, layout):
        name = rule.hf
        if name not in tensors and name.startswith("transformer."):
            # bigscience's BLOOM files name tensors without the "transformer." prefix.
            name = name[len("transformer."):]
        if name not in tensors:
            raise ConfigError(f"{source}: tensor '{rule.hf}' (for {', '.join(rule.fleet)}) not found.")
        used.add(name)
        for fleet_name, array in zip(rule.fleet, _hf_to_fleet(tensors[name], rule, config)):
            out[fleet_name] = array
    unused = [n for n in tensors if n not in used and not n.endswith(_IGNORED_SUFFIXES) and n != "lm_head.weight"]
    if unused:
        logger.warning("%s: %d tensors not used by the %s model, e.g. %s", source, len(unused), config.model_type,
                       ", ".join(sorted(unused)[:5]))
    return out


def convert_to_hf(state: Dict[str, np.ndarray], config: ModelConfig) -> Dict[str, np.ndarray]:
    """Map a fleetlm state (names -> arrays in Paddle layout) to the family's Hugging Face layout."""
    if config.model_type not in EXPORT_LAYOUTS:
        raise ConfigError(f"model_type '{config.model_type}' has no Hugging Face layout to export to.")
    out = {}
    for rule in expand_rules(config, EXPORT_LAYOUTS[config.model_type]):
        missing = [n for n in rule.fleet if n not in state]
        if missing:
            raise ConfigError(f"the checkpoint has no tensor '{missing[0]}' (needed for '{rule.hf}').")
        out[rule.hf] = _fleet_to_hf([state[n] for n in rule.fleet], rule, config)
    return out


def load_pretrained(model, config: ModelConfig, directory: str) -> None:
    """Load the weights in ``directory`` into ``model``, or raise ConfigError naming the tensor and both shapes."""
    import paddle

    tensors, source = read_weights(directory)
    expected = model.state_dict()
    if set(expected) <= set(tensors):
        state, naming = {name: tensors[name] for name in expected}, "fleetlm names"
    elif ".pdparams" in os.path.basename(source):
        # Paddle files keep Linear weights as [in, out], so the Hugging Face rules would transpose them wrongly.
        missing = sorted(set(expected) - set(tensors))
        raise ConfigError(
            f"{source}: a .pdparams file must use fleetlm's tensor names (a fleetlm checkpoint or PaddleNLP's "
            f"LLaMA), but it has no '{missing[0]}'. Convert other checkpoints to safetensors in Hugging Face layout."
        )
    else:
        layout = _checkpoint_layout(directory, config)
        state, naming = convert_to_fleet(tensors, config, layout, source), f"the Hugging Face {layout} layout"
    for name, param in expected.items():
        if name not in state:
            raise ConfigError(f"{source}: no tensor for the model's '{name}'.")
        if list(state[name].shape) != list(param.shape):
            raise ConfigError(
                f"{source}: tensor '{name}' has shape {list(state[name].shape)}, the model expects {list(param.shape)}."
            )
    model.set_state_dict({name: paddle.to_tensor(state[name]).astype(expected[name].dtype) for name in expected})
    logger.info("loaded %d tensors from %s (%s)", len(expected), source, naming)
