"""Adapter validation (DESIGN §4, reference/vllm.md §6). Pure: no torch, no database, no network.

What an adapter is, for Lorry: a directory holding exactly the two files Lorry keeps,
``adapter_config.json`` and ``adapter_model.safetensors``, in the PEFT LoRA format vLLM loads.
Every rejection raises :class:`AdapterRejected` (HTTP 400) with one of these codes:

==============================  ==========================================================  ======
code                            meaning                                                     source
==============================  ==========================================================  ======
``invalid_adapter``             a kept file is missing, or the config is malformed          FORMAT
``unsafe_weights``              only pickled weights (``*.bin``, ``*.pt``, ``*.pth``…)       POLICY
``unsupported_peft_type``       ``peft_type`` is not ``"LORA"``                              FORMAT
``rank_too_large``              ``max(r, *rank_pattern.values())`` > ``LORRY_MAX_LORA_RANK`` POLICY
``unsupported_adapter_feature`` DoRA, bias, ``lora_bias``, ``modules_to_save``, PiSSA-like  FORMAT
                                inits, aLoRA, ``layer_replication``, BD-LoRA, QALoRA
``unsupported_target_module``   a tensor that is not ``lora_A``/``lora_B`` of a supported   FORMAT
                                linear module (q/k/v/o/gate/up/down_proj)
``tensor_shape_mismatch``       a tensor shape inconsistent with the base model (FORMAT),   both
                                or lora_A/lora_B/``r`` ranks that disagree (POLICY)
``invalid_safetensors``         header malformed, or data truncated / not exactly covered   FORMAT
``adapter_too_large``           a kept file over its size cap                               POLICY
==============================  ==========================================================  ======

FORMAT rejections are what vLLM's own ``load_lora_adapter`` refuses; POLICY rejections are
Lorry's own rules. Deliberate policy choices stricter than vLLM:

- ranks must agree: vLLM would copy a lora_B narrower than its lora_A into zero-filled buffers
  and serve it silently (PEFT itself cannot load such a file);
- ``modules_to_save`` must be empty: vLLM only accepts ``classifier``/``score`` for
  classification models, and Lorry serves causal LMs only.
- Embedding LoRA (``lora_embedding_A``/``B`` on ``embed_tokens``/``lm_head``) is refused: Lorry
  checks every tensor's shape, and only the seven Llama-family projections are supported.

The safetensors header is parsed here (8-byte little-endian length, then a JSON header): the
declared data offsets must tile the data region exactly — no gap, no overlap, nothing missing
(truncation) and nothing after it. Only the header is read; tensors never enter memory.

Base model configs (the "known" base model of DESIGN §4) come from :class:`BaseModelConfigs`.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorry.errors import InvalidRequest

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEPT_FILES = (CONFIG_FILE, WEIGHTS_FILE)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

MAX_CONFIG_BYTES = 1 << 20
"""adapter_config.json is ~1.2 KB from PEFT; anything near a MiB is not a PEFT config."""
MAX_HEADER_BYTES = 16 << 20
"""A safetensors header for an 80-layer model with every projection is ~200 KB."""
MAX_TENSORS = 100_000

SUPPORTED_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
"""Llama-family linear layers (Llama, Mistral, Qwen2/3); vLLM's packed qkv_proj/gate_up_proj expand
to these, so an adapter names the unpacked ones."""

# Bytes per element of every safetensors dtype; LoRA weights must be floating point.
_DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})

# PEFT features vLLM refuses (vllm/lora/peft_helper.py `_validate_features`).
_SUPPORTED_INITS = frozenset({"gaussian", "eva", "orthogonal", "mica", "lora_ga"})
_LORA_TENSOR = re.compile(r"base_model\.model\.(?P<module>[A-Za-z0-9_.]+)\.(?P<part>lora_A|lora_B)\.weight")
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_LITERAL_PATTERN = re.compile(r"[A-Za-z0-9_.]+")


class AdapterRejected(InvalidRequest):
    """400 with a specific code; the message names the file or tensor at fault."""

    code = "invalid_adapter"
    default_message = "Invalid adapter"


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    """What Lorry records about a valid adapter."""

    rank: int
    """``max(r, *rank_pattern.values())``: what an engine's ``--max-lora-rank`` must cover."""
    alpha: float
    target_modules: tuple[str, ...]
    """Sorted module names that actually carry LoRA tensors (vLLM's source of truth)."""
    base_model: str | None
    """``base_model_name_or_path`` as the adapter declares it."""
    tensor_count: int
    weights_bytes: int


# --------------------------------------------------------------------------- file policy


def is_pickled(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def check_file_policy(names: Iterable[str], where: str) -> None:
    """The files of one adapter directory (names only, no sub-paths): are the kept two there?

    Other files (README.md, training_args.bin, optimizer.pt next to a safetensors file…) are
    ignored; pickled weights *instead of* safetensors are refused, never unpickled.
    """
    present = set(names)
    if WEIGHTS_FILE not in present:
        pickled = sorted(name for name in present if is_pickled(name))
        if pickled:
            raise AdapterRejected(
                f"{where}: pickled weights ({', '.join(pickled[:3])}) are not accepted; "
                f"save the adapter with safe_serialization=True to get {WEIGHTS_FILE}",
                code="unsafe_weights",
            )
        raise AdapterRejected(f"{where}: {WEIGHTS_FILE} is missing")
    if CONFIG_FILE not in present:
        raise AdapterRejected(f"{where}: {CONFIG_FILE} is missing")


# --------------------------------------------------------------------------- safetensors


def read_safetensors_header(path: Path, *, max_header_bytes: int = MAX_HEADER_BYTES) -> list[TensorInfo]:
    """Parse and fully check the header of ``path`` without reading tensor data.

    Checks what the safetensors library checks when it opens a file: the header length fits
    the file, the header is a JSON object of ``{dtype, shape, data_offsets}`` entries (plus an
    optional ``__metadata__`` of strings), each entry's byte length matches its dtype and shape,
    and the entries tile the data region exactly, so a truncated or padded file is refused.
    """
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise AdapterRejected(f"{WEIGHTS_FILE} is truncated (no header)", code="invalid_safetensors")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > max_header_bytes:
                raise AdapterRejected(
                    f"{WEIGHTS_FILE} header is {header_len} bytes (limit {max_header_bytes})",
                    code="invalid_safetensors",
                )
            if 8 + header_len > size:
                raise AdapterRejected(f"{WEIGHTS_FILE} is truncated (header)", code="invalid_safetensors")
            raw = handle.read(header_len)
    except OSError as exc:
        raise AdapterRejected(f"{WEIGHTS_FILE} could not be read", code="invalid_safetensors") from exc
    header = _parse_header_json(raw)
    data_len = size - 8 - header_len
    tensors = [_tensor_info(name, entry) for name, entry in header.items() if name != "__metadata__"]
    metadata = header.get("__metadata__")
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise _bad_weights("__metadata__ must map strings to strings")
    if len(tensors) > MAX_TENSORS:
        raise _bad_weights(f"has more than {MAX_TENSORS} tensors")
    position = 0
    for tensor in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if tensor.begin != position:
            raise AdapterRejected(
                f"{WEIGHTS_FILE}: tensor '{tensor.name}' data offsets overlap or leave a gap",
                code="invalid_safetensors",
            )
        position = tensor.end
    if position > data_len:
        raise _bad_weights(f"is truncated: its header declares {position} data bytes, it holds {data_len}")
    if position < data_len:
        raise _bad_weights(f"has {data_len - position} bytes after the last tensor")
    return tensors


def _bad_weights(why: str) -> AdapterRejected:
    return AdapterRejected(f"{WEIGHTS_FILE} {why}", code="invalid_safetensors")


def _parse_header_json(raw: bytes) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise ValueError(f"duplicate key {key!r}")
            result[key] = value
        return result

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AdapterRejected(f"{WEIGHTS_FILE} header is not valid JSON", code="invalid_safetensors") from exc
    if not isinstance(header, dict):
        raise AdapterRejected(f"{WEIGHTS_FILE} header is not a JSON object", code="invalid_safetensors")
    return header


def _tensor_info(name: str, entry: Any) -> TensorInfo:
    def bad(why: str) -> AdapterRejected:
        return AdapterRejected(f"{WEIGHTS_FILE}: tensor '{name[:200]}' {why}", code="invalid_safetensors")

    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise bad("must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPE_SIZES:
        raise bad(f"has an unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape) or len(shape) > 8:
        raise bad("has an invalid shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise bad("has invalid data_offsets")
    begin, end = offsets
    if end < begin or end - begin != math.prod(shape) * _DTYPE_SIZES[dtype]:
        raise bad("data_offsets do not match its dtype and shape")
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- adapter_config.json


@dataclass(frozen=True, slots=True)
class LoraConfig:
    r: int
    alpha: float
    rank_pattern: dict[str, int]
    base_model: str | None

    @property
    def max_rank(self) -> int:
        return max([self.r, *self.rank_pattern.values()])

    def rank_for(self, module: str) -> int | None:
        """PEFT's rule (`get_pattern_key`): the first key that is a dot-bounded suffix of the
        module name. Keys that are not plain names are regexes; they are not evaluated here
        (a hostile regex would stall the server) and the module's rank is then only bounded."""
        for key, rank in self.rank_pattern.items():
            if not _LITERAL_PATTERN.fullmatch(key):
                return None
            if module == key or module.endswith("." + key):
                return rank
        return self.r


def read_config(path: Path) -> dict[str, Any]:
    try:
        # O_NONBLOCK: a FIFO in an import directory must not hang the reader.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise AdapterRejected(f"{CONFIG_FILE} is missing") from exc
    except OSError as exc:
        raise AdapterRejected(f"{CONFIG_FILE} could not be opened") from exc
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise AdapterRejected(f"{CONFIG_FILE} is not a regular file")
        if info.st_size > MAX_CONFIG_BYTES:
            raise AdapterRejected(
                f"{CONFIG_FILE} is {info.st_size} bytes (limit {MAX_CONFIG_BYTES})", code="adapter_too_large"
            )
        raw = handle.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterRejected(f"{CONFIG_FILE} exceeds {MAX_CONFIG_BYTES} bytes", code="adapter_too_large")
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AdapterRejected(f"{CONFIG_FILE} is not valid JSON") from exc
    if not isinstance(config, dict):
        raise AdapterRejected(f"{CONFIG_FILE} must be a JSON object")
    return config


MAX_MODEL_ID = 300


def usable_model_id(value: Any) -> str | None:
    """A declared base model name Lorry can store (the column holds 300 characters), or None."""
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_MODEL_ID or "\x00" in value:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value.strip()


def declared_base_model(path: Path) -> str | None:
    """``base_model_name_or_path`` of a config, or None; never raises (validation comes later)."""
    try:
        config = read_config(path)
    except AdapterRejected:
        return None
    return usable_model_id(config.get("base_model_name_or_path"))


def check_config(config: Mapping[str, Any], *, max_rank: int) -> LoraConfig:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterRejected(
            f'peft_type must be "LORA", got {json.dumps(peft_type)[:40]}', code="unsupported_peft_type"
        )
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise AdapterRejected(f"{CONFIG_FILE} lacks the required key '{key}'")
    r = config["r"]
    if not _is_int(r) or r < 1:
        raise AdapterRejected(f"r must be a positive integer, got {json.dumps(r)[:40]}")
    alpha = config["lora_alpha"]
    if not _is_number(alpha):
        raise AdapterRejected("lora_alpha must be a finite number")
    targets = config["target_modules"]
    if not isinstance(targets, str | list) or (
        isinstance(targets, list) and not all(isinstance(t, str) for t in targets)
    ):
        raise AdapterRejected("target_modules must be a string or a list of strings")
    rank_pattern = config.get("rank_pattern") or {}
    if not isinstance(rank_pattern, dict) or not all(_is_int(v) and v >= 1 for v in rank_pattern.values()):
        raise AdapterRejected("rank_pattern must map module names to positive integers")
    alpha_pattern = config.get("alpha_pattern") or {}
    if not isinstance(alpha_pattern, dict) or not all(_is_number(v) for v in alpha_pattern.values()):
        raise AdapterRejected("alpha_pattern must map module names to numbers")
    if not isinstance(config.get("use_rslora", False), bool):
        raise AdapterRejected("use_rslora must be a boolean")
    base_model = config.get("base_model_name_or_path")
    if base_model is not None and not isinstance(base_model, str):
        raise AdapterRejected("base_model_name_or_path must be a string")

    _check_features(config)
    lora = LoraConfig(
        r=r, alpha=float(alpha), rank_pattern=dict(rank_pattern), base_model=usable_model_id(base_model)
    )
    if lora.max_rank > max_rank:
        raise AdapterRejected(
            f"adapter rank {lora.max_rank} exceeds this server's limit of {max_rank} (LORRY_MAX_LORA_RANK)",
            code="rank_too_large",
        )
    return lora


def _check_features(config: Mapping[str, Any]) -> None:
    problems = []
    if config.get("use_dora"):
        problems.append("DoRA (use_dora) is not supported")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        problems.append(f'bias must be "none", got {json.dumps(bias)[:40]}')
    if config.get("lora_bias"):
        problems.append("LoRA bias (lora_bias) is not supported")
    modules_to_save = config.get("modules_to_save")
    if modules_to_save:
        shown = modules_to_save if isinstance(modules_to_save, list) else [modules_to_save]
        problems.append(
            f"modules_to_save must be empty, got {json.dumps(shown)[:80]} "
            "(Lorry serves no full-module weights)"
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _SUPPORTED_INITS:
        problems.append(f"init_lora_weights={init[:40]!r} modifies the base model and is not supported")
    for key, feature in (
        ("alora_invocation_tokens", "Activated LoRA (aLoRA)"),
        ("layer_replication", "layer_replication"),
        ("use_bdlora", "block-diagonal LoRA (BD-LoRA)"),
        ("use_qalora", "QALoRA"),
    ):
        if config.get(key):
            problems.append(f"{feature} is not supported")
    if problems:
        raise AdapterRejected("; ".join(problems), code="unsupported_adapter_feature")


# --------------------------------------------------------------------------- tensors


@dataclass(frozen=True, slots=True)
class BaseDims:
    """The projection sizes of a Llama-family base model, from its HF ``config.json``."""

    hidden: int
    intermediate: int
    layers: int
    q_out: int
    kv_out: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> BaseDims | None:
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            kv_heads = int(config.get("num_key_value_heads") or heads)
            head_dim = int(config.get("head_dim") or hidden // heads)
            return cls(
                hidden=hidden,
                intermediate=int(config["intermediate_size"]),
                layers=int(config["num_hidden_layers"]),
                q_out=heads * head_dim,
                kv_out=kv_heads * head_dim,
            )
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            return None

    def in_out(self, module: str) -> tuple[int, int]:
        return {
            "q_proj": (self.hidden, self.q_out),
            "k_proj": (self.hidden, self.kv_out),
            "v_proj": (self.hidden, self.kv_out),
            "o_proj": (self.q_out, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }[module]


def _unsupported_tensor(name: str) -> AdapterRejected:
    shown = name[:200]
    if "lora_magnitude_vector" in name:
        return AdapterRejected(
            f"tensor '{shown}' is a DoRA magnitude vector", code="unsupported_adapter_feature"
        )
    if re.search(r"\.lora_[AB]\.bias$", name):
        return AdapterRejected(f"tensor '{shown}' is a LoRA bias", code="unsupported_adapter_feature")
    return AdapterRejected(
        f"tensor '{shown}' is not a lora_A/lora_B weight of a supported module "
        f"({', '.join(sorted(SUPPORTED_MODULES))})",
        code="unsupported_target_module",
    )


def check_tensors(tensors: list[TensorInfo], lora: LoraConfig, base: BaseDims | None) -> tuple[str, ...]:
    """Names, dtypes and shapes; returns the sorted module names carrying LoRA weights."""
    modules: dict[str, dict[str, TensorInfo]] = {}
    for tensor in tensors:
        match = _LORA_TENSOR.fullmatch(tensor.name)
        if match is None:
            raise _unsupported_tensor(tensor.name)
        module_path = match["module"]
        if module_path.rsplit(".", 1)[-1] not in SUPPORTED_MODULES:
            raise _unsupported_tensor(tensor.name)
        if tensor.dtype not in FLOAT_DTYPES:
            raise AdapterRejected(f"tensor '{tensor.name}' has dtype {tensor.dtype}; LoRA weights are floats")
        if len(tensor.shape) != 2:
            raise AdapterRejected(
                f"tensor '{tensor.name}' has shape {list(tensor.shape)}; LoRA weights are 2-D",
                code="tensor_shape_mismatch",
            )
        modules.setdefault(module_path, {})[match["part"]] = tensor
    if not modules:
        raise AdapterRejected(f"{WEIGHTS_FILE} holds no LoRA tensors")

    names = set()
    for module_path, parts in sorted(modules.items()):
        if set(parts) != {"lora_A", "lora_B"}:
            missing = "lora_B" if "lora_A" in parts else "lora_A"
            raise AdapterRejected(f"module '{module_path}' has no {missing} weight")
        a_rank, a_in = parts["lora_A"].shape
        b_out, b_rank = parts["lora_B"].shape
        short = module_path.rsplit(".", 1)[-1]
        names.add(short)

        def mismatch(why: str, path: str = module_path) -> AdapterRejected:
            return AdapterRejected(f"module '{path}': {why}", code="tensor_shape_mismatch")

        if a_rank != b_rank:
            raise mismatch(f"lora_A has rank {a_rank} but lora_B has rank {b_rank}")
        expected_rank = lora.rank_for(module_path)
        if expected_rank is not None and a_rank != expected_rank:
            raise mismatch(f"rank {a_rank} differs from the configured rank {expected_rank}")
        if a_rank < 1 or a_rank > lora.max_rank:
            raise mismatch(f"rank {a_rank} is outside 1..{lora.max_rank}")
        if base is not None:
            want_in, want_out = base.in_out(short)
            if (a_in, b_out) != (want_in, want_out):
                raise mismatch(
                    f"maps {a_in} -> {b_out} features, the base model's {short} {want_in} -> {want_out}"
                )
            layer = _LAYER_INDEX.search(module_path)
            if layer is not None and int(layer[1]) >= base.layers:
                raise mismatch(f"layer {layer[1]} does not exist (the base model has {base.layers} layers)")
    return tuple(sorted(names))


# --------------------------------------------------------------------------- entry point


def validate_adapter(
    directory: Path, *, max_rank: int, base_config: Mapping[str, Any] | None = None
) -> AdapterInfo:
    """Validate the two kept files in ``directory`` (a staged copy: nothing else is looked at)."""
    lora = check_config(read_config(directory / CONFIG_FILE), max_rank=max_rank)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterRejected(f"{WEIGHTS_FILE} is missing")
    tensors = read_safetensors_header(weights)
    base = BaseDims.from_config(base_config) if base_config is not None else None
    target_modules = check_tensors(tensors, lora, base)
    return AdapterInfo(
        rank=lora.max_rank,
        alpha=lora.alpha,
        target_modules=target_modules,
        base_model=lora.base_model,
        tensor_count=len(tensors),
        weights_bytes=weights.stat().st_size,
    )


# --------------------------------------------------------------------------- base model configs

_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*")


class BaseModelConfigs:
    """Where the control plane learns a base model's dimensions, to check adapter shapes.

    A base model is "known" when its Hugging Face ``config.json`` is at
    ``<LORRY_CACHE_DIR>/models/<model id with "/" replaced by "--">/config.json`` — e.g.
    ``~/.cache/lorry/models/lorry--tiny-llama/config.json`` for ``lorry/tiny-llama``. The
    operator (or ``lorry demo-model``) puts it there; the control plane never downloads one.
    Unknown models get the checks that need no base model (names, ranks, 2-D shapes).
    """

    def __init__(self, cache_dir: Path) -> None:
        self.root = Path(cache_dir) / "models"

    def path_for(self, model_id: str) -> Path | None:
        if not _MODEL_ID.fullmatch(model_id) or ".." in model_id or len(model_id) > 300:
            return None
        return self.root / model_id.replace("/", "--") / "config.json"

    def get(self, model_id: str | None) -> dict[str, Any] | None:
        if not model_id:
            return None
        path = self.path_for(model_id)
        if path is None:
            return None
        try:
            if path.stat().st_size > MAX_CONFIG_BYTES:
                return None
            config = json.loads(path.read_bytes())
        except (OSError, ValueError, RecursionError):
            return None
        return config if isinstance(config, dict) else None
