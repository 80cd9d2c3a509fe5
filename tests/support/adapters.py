"""PEFT-format LoRA adapters written with numpy + safetensors (no torch), valid and invalid.

``write_adapter`` produces what ``peft_model.save_pretrained(dir, safe_serialization=True)``
produces for a Llama model (checked against ``lorry/engine_tools/demo_model.py``'s real PEFT
output): ``adapter_config.json`` with PEFT 0.21's keys (sorted, indented, as demo_model.py
rewrites it) and ``adapter_model.safetensors`` with ``{"format": "pt"}`` metadata and tensors
``base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight`` and
``base_model.model.model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight``, where
``lora_A`` is ``(r, in_features)`` and ``lora_B`` is ``(out_features, r)``.

Invalid adapters come in two lists, each ``name -> writer(dir)``:

- :data:`FORMAT_REJECTS`: outside the PEFT LoRA format vLLM serves (reference/vllm.md §6); a
  real engine's ``load_lora_adapter`` refuses them too.
- :data:`POLICY_REJECTS`: loadable by vLLM but refused by Lorry's own rules (pickled weights,
  rank over ``LORRY_MAX_LORA_RANK``, inconsistent lora_A/lora_B ranks).

:data:`EXPECTED_CODES` gives the 400 code Lorry answers for each.
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

BASE_MODEL = "lorry/tiny-llama"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR = ATTENTION + MLP

TINY_LLAMA_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "dtype": "bfloat16",
    "eos_token_id": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 128,
    "initializer_range": 0.1,
    "intermediate_size": 256,
    "max_position_embeddings": 4096,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "vocab_size": 512,
}
"""The HF config.json of the tiny demo model (DESIGN §10), as demo_model.py writes it."""

LORA_STD = 0.15


def peft_config(
    *,
    rank: int,
    alpha: float,
    target_modules: Iterable[str],
    base_model: str | None,
    **overrides: Any,
) -> dict[str, Any]:
    """adapter_config.json as PEFT 0.21 saves it for a plain LoRA."""
    config: dict[str, Any] = {
        "alora_invocation_tokens": None,
        "alpha_pattern": {},
        "arrow_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "kasa_config": None,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "monteclora_config": None,
        "peft_type": "LORA",
        "peft_version": "0.21.2",
        "qalora_group_size": 16,
        "r": rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(target_modules),
        "target_parameters": None,
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_dora": False,
        "use_qalora": False,
        "use_rslora": False,
        "velora_config": None,
    }
    config.update(overrides)
    return config


def module_dims(
    module: str, *, hidden: int, intermediate: int, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[int, int]:
    """(in_features, out_features) of a Llama projection."""
    q_out, kv_out = num_heads * head_dim, num_kv_heads * head_dim
    return {
        "q_proj": (hidden, q_out),
        "k_proj": (hidden, kv_out),
        "v_proj": (hidden, kv_out),
        "o_proj": (q_out, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }[module]


def tensor_name(layer: int, module: str, part: str) -> str:
    block = "self_attn" if module in ATTENTION else "mlp"
    return f"base_model.model.model.layers.{layer}.{block}.{module}.{part}.weight"


def lora_tensors(
    *,
    rank: int,
    target_modules: Iterable[str],
    hidden: int,
    intermediate: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    seed: int,
    dtype: str,
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for layer in range(num_layers):
        for module in sorted(target_modules):
            fan_in, fan_out = module_dims(
                module,
                hidden=hidden,
                intermediate=intermediate,
                num_heads=num_heads,
                num_kv_heads=num_kv_heads,
                head_dim=head_dim,
            )
            a = rng.standard_normal((rank, fan_in)) * LORA_STD
            b = rng.standard_normal((fan_out, rank)) * LORA_STD
            tensors[tensor_name(layer, module, "lora_A")] = a.astype(dtype)
            tensors[tensor_name(layer, module, "lora_B")] = b.astype(dtype)
    return tensors


def save_tensors(directory: Path, tensors: dict[str, np.ndarray]) -> None:
    save_file(
        {name: np.ascontiguousarray(t) for name, t in tensors.items()},
        str(directory / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )


def save_config(directory: Path, config: dict[str, Any]) -> None:
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_adapter(
    directory: Path,
    *,
    rank: int = 8,
    alpha: float = 16,
    target_modules: Iterable[str] = ("q_proj", "v_proj"),
    base_model: str | None = BASE_MODEL,
    hidden: int = 128,
    intermediate: int = 256,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    seed: int = 0,
    dtype: str = "float32",
    **config_overrides: Any,
) -> Path:
    """A valid PEFT LoRA adapter for the tiny Llama (unless the dims say otherwise)."""
    directory.mkdir(parents=True, exist_ok=True)
    targets = tuple(target_modules)
    save_config(
        directory,
        peft_config(
            rank=rank, alpha=alpha, target_modules=targets, base_model=base_model, **config_overrides
        ),
    )
    save_tensors(
        directory,
        lora_tensors(
            rank=rank,
            target_modules=targets,
            hidden=hidden,
            intermediate=intermediate,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            seed=seed,
            dtype=dtype,
        ),
    )
    return directory


def _edit_tensors(directory: Path, edit: Callable[[dict[str, np.ndarray]], None], **kwargs: Any) -> None:
    write_adapter(directory, **kwargs)
    from safetensors.numpy import load_file

    tensors = load_file(str(directory / "adapter_model.safetensors"))
    edit(tensors)
    save_tensors(directory, tensors)


# --------------------------------------------------------------------------- FORMAT rejects


def dora(directory: Path) -> None:
    """DoRA: ``use_dora`` plus the ``lora_magnitude_vector`` tensors PEFT saves with it."""

    def add_magnitudes(tensors: dict[str, np.ndarray]) -> None:
        for name in [n for n in tensors if n.endswith("lora_A.weight")]:
            tensors[name.replace("lora_A.weight", "lora_magnitude_vector")] = np.ones(128, np.float32)

    _edit_tensors(directory, add_magnitudes, use_dora=True)


def bias_all(directory: Path) -> None:
    write_adapter(directory, bias="all")


def lora_bias(directory: Path) -> None:
    """``lora_bias``: a bias on lora_B, saved as ``lora_B.bias``."""

    def add_bias(tensors: dict[str, np.ndarray]) -> None:
        for name in [n for n in tensors if n.endswith("lora_B.weight")]:
            tensors[name.replace(".weight", ".bias")] = np.zeros(tensors[name].shape[0], np.float32)

    _edit_tensors(directory, add_bias, lora_bias=True)


def modules_to_save_lm_head(directory: Path) -> None:
    """A full ``lm_head`` copy, as PEFT saves ``modules_to_save=["lm_head"]``."""

    def add_head(tensors: dict[str, np.ndarray]) -> None:
        tensors["base_model.model.lm_head.weight"] = np.zeros((512, 128), np.float32)

    _edit_tensors(directory, add_head, modules_to_save=["lm_head"])


def modules_to_save_embed_tokens(directory: Path) -> None:
    def add_embeddings(tensors: dict[str, np.ndarray]) -> None:
        tensors["base_model.model.model.embed_tokens.weight"] = np.zeros((512, 128), np.float32)

    _edit_tensors(directory, add_embeddings, modules_to_save=["embed_tokens"])


def unknown_target_module(directory: Path) -> None:
    """LoRA on a module the model does not have (``mlp.fc_in``)."""

    def rename(tensors: dict[str, np.ndarray]) -> None:
        for name in [n for n in tensors if ".v_proj." in n]:
            tensors[name.replace("self_attn.v_proj", "mlp.fc_in")] = tensors.pop(name)

    _edit_tensors(directory, rename)
    config = json.loads((directory / "adapter_config.json").read_text())
    config["target_modules"] = ["fc_in", "q_proj"]
    save_config(directory, config)


def tensor_shape_mismatch(directory: Path) -> None:
    """q_proj weights for a 256-wide model on the 128-wide tiny Llama (consistent in themselves)."""
    write_adapter(directory, hidden=256, target_modules=("q_proj",))


def inconsistent_rank(directory: Path) -> None:
    """lora_A of rank 8 with lora_B of rank 4 (detectable without the base model's config)."""

    def shrink(tensors: dict[str, np.ndarray]) -> None:
        name = tensor_name(0, "q_proj", "lora_B")
        tensors[name] = np.ascontiguousarray(tensors[name][:, :4])

    _edit_tensors(directory, shrink)


def truncated_safetensors(directory: Path) -> None:
    write_adapter(directory)
    weights = directory / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def non_lora_peft_type(directory: Path) -> None:
    """An IA3 adapter as PEFT saves it (no ``r``; ``ia3_l`` scaling vectors)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_config(
        directory,
        {
            "base_model_name_or_path": BASE_MODEL,
            "fan_in_fan_out": False,
            "feedforward_modules": ["down_proj"],
            "inference_mode": True,
            "init_ia3_weights": True,
            "modules_to_save": None,
            "peft_type": "IA3",
            "revision": None,
            "target_modules": ["k_proj", "v_proj", "down_proj"],
            "task_type": "CAUSAL_LM",
        },
    )
    tensors = {}
    for layer in range(2):
        tensors[f"base_model.model.model.layers.{layer}.self_attn.k_proj.ia3_l"] = np.ones(
            (128, 1), np.float32
        )
        tensors[f"base_model.model.model.layers.{layer}.self_attn.v_proj.ia3_l"] = np.ones(
            (128, 1), np.float32
        )
        tensors[f"base_model.model.model.layers.{layer}.mlp.down_proj.ia3_l"] = np.ones((1, 256), np.float32)
    save_tensors(directory, tensors)


def pissa_init(directory: Path) -> None:
    """PiSSA initialisation rewrites the base weights, which a served base model does not have."""
    write_adapter(directory, init_lora_weights="pissa")


def missing_config(directory: Path) -> None:
    write_adapter(directory)
    (directory / "adapter_config.json").unlink()


FORMAT_REJECTS: dict[str, Callable[[Path], None]] = {
    "dora": dora,
    "bias_all": bias_all,
    "lora_bias": lora_bias,
    "modules_to_save_lm_head": modules_to_save_lm_head,
    "modules_to_save_embed_tokens": modules_to_save_embed_tokens,
    "unknown_target_module": unknown_target_module,
    "tensor_shape_mismatch": tensor_shape_mismatch,
    "truncated_safetensors": truncated_safetensors,
    "non_lora_peft_type": non_lora_peft_type,
    "pissa_init": pissa_init,
    "missing_config": missing_config,
}
"""Outside the format vLLM serves; vLLM 0.32's ``load_lora_adapter`` refuses each (read from its
source: ``PEFTHelper.validate_legal``, ``check_unexpected_modules``, ``safe_open``, and for
``tensor_shape_mismatch`` the copy into the fixed-size LoRA buffers when ``add_lora`` activates
the adapter; ``missing_config`` is its 404). Lorry needs the base model's config.json to see
``tensor_shape_mismatch`` (:data:`NEEDS_BASE_CONFIG`)."""


# --------------------------------------------------------------------------- POLICY rejects


def _pickle_weights(directory: Path, filename: str) -> None:
    """Pickled weights only: a plain ``pickle`` of lists, never opened by Lorry. Not ``torch.save``'s
    format, so vLLM's ``torch.load(weights_only=True)`` would refuse this file; a real ``torch.save``
    file is served by vLLM (tests/test_adapter_vllm_agreement.py)."""
    write_adapter(directory)
    weights = directory / "adapter_model.safetensors"
    from safetensors.numpy import load_file

    tensors = load_file(str(weights))
    weights.unlink()
    with (directory / filename).open("wb") as handle:
        pickle.dump({name: t.tolist() for name, t in tensors.items()}, handle)


def pickled_bin(directory: Path) -> None:
    _pickle_weights(directory, "adapter_model.bin")


def pickled_pt(directory: Path) -> None:
    _pickle_weights(directory, "adapter_model.pt")


OVER_LIMIT_RANK = 128
"""Over the default ``LORRY_MAX_LORA_RANK`` (64); a valid vLLM rank (``--max-lora-rank 128``)."""


def rank_over_limit(directory: Path) -> None:
    write_adapter(directory, rank=OVER_LIMIT_RANK, alpha=2 * OVER_LIMIT_RANK, target_modules=("q_proj",))


POLICY_REJECTS: dict[str, Callable[[Path], None]] = {
    "pickled_bin": pickled_bin,
    "pickled_pt": pickled_pt,
    "rank_over_limit": rank_over_limit,
    "inconsistent_rank": inconsistent_rank,
}
"""Refused by Lorry, not by vLLM: pickled weights (vLLM would ``torch.load(weights_only=True)``
them), a rank over LORRY_MAX_LORA_RANK, and a lora_B narrower than its lora_A (PEFT cannot load
it; vLLM copies it into zero-filled buffers and serves it without complaint)."""

EXPECTED_CODES: dict[str, str] = {
    "dora": "unsupported_adapter_feature",
    "bias_all": "unsupported_adapter_feature",
    "lora_bias": "unsupported_adapter_feature",
    "modules_to_save_lm_head": "unsupported_adapter_feature",
    "modules_to_save_embed_tokens": "unsupported_adapter_feature",
    "unknown_target_module": "unsupported_target_module",
    "tensor_shape_mismatch": "tensor_shape_mismatch",
    "inconsistent_rank": "tensor_shape_mismatch",
    "truncated_safetensors": "invalid_safetensors",
    "non_lora_peft_type": "unsupported_peft_type",
    "pissa_init": "unsupported_adapter_feature",
    "missing_config": "invalid_adapter",
    "pickled_bin": "unsafe_weights",
    "pickled_pt": "unsafe_weights",
    "rank_over_limit": "rank_too_large",
}
NEEDS_BASE_CONFIG = frozenset({"tensor_shape_mismatch"})
"""Rejects detectable only when the base model's config.json is known to the control plane."""


def install_base_config(
    cache_dir: Path, model_id: str = BASE_MODEL, config: dict[str, Any] | None = None
) -> Path:
    """Make ``model_id`` a known base model (``BaseModelConfigs`` layout)."""
    path = cache_dir / "models" / model_id.replace("/", "--") / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config or TINY_LLAMA_CONFIG))
    return path


# --------------------------------------------------------------------------- archives


def _archive_entries(directory: Path, prefix: str) -> list[tuple[str, Path]]:
    entries = []
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            name = path.relative_to(directory).as_posix()
            entries.append((f"{prefix}/{name}" if prefix else name, path))
    return entries


def tar_gz(directory: Path, *, prefix: str = "") -> bytes:
    """A tar.gz of ``directory``'s files, at the root or under ``prefix/``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        if prefix:
            info = tarfile.TarInfo(prefix)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, path in _archive_entries(directory, prefix):
            tar.add(path, arcname=name)
    return buffer.getvalue()


def zip_bytes(directory: Path, *, prefix: str = "") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        for name, path in _archive_entries(directory, prefix):
            zipped.write(path, arcname=name)
    return buffer.getvalue()
