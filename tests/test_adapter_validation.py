"""Adapter validation on its own: no database, no server, no torch.

Rejections are marked FORMAT (outside the PEFT LoRA format vLLM serves; the same fixtures are
checked against a real engine elsewhere) or POLICY (Lorry's own rules).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from control_plane.jobs.validation import (
    AdapterRejected,
    BaseModelConfigs,
    check_file_policy,
    read_safetensors_header,
    validate_adapter,
)
from tests.support.adapters import (
    ALL_LINEAR,
    EXPECTED_CODES,
    FORMAT_REJECTS,
    NEEDS_BASE_CONFIG,
    OVER_LIMIT_RANK,
    POLICY_REJECTS,
    TINY_LLAMA_CONFIG,
    install_base_config,
    save_config,
    save_tensors,
    tensor_name,
    write_adapter,
)

MAX_RANK = 64


def rejection(
    directory: Path, *, base: dict[str, object] | None = TINY_LLAMA_CONFIG, max_rank: int = MAX_RANK
) -> AdapterRejected:
    with pytest.raises(AdapterRejected) as caught:
        validate_adapter(directory, max_rank=max_rank, base_config=base)
    assert caught.value.status_code == 400
    return caught.value


@pytest.mark.parametrize(
    ("rank", "targets", "dtype"),
    [
        (8, ("q_proj", "v_proj"), "float32"),
        (16, ALL_LINEAR, "float32"),
        (4, ("o_proj", "down_proj"), "float16"),
    ],
)
def test_valid_adapters_are_described(
    tmp_path: Path, rank: int, targets: tuple[str, ...], dtype: str
) -> None:
    write_adapter(tmp_path, rank=rank, alpha=2 * rank, target_modules=targets, dtype=dtype)
    for base in (TINY_LLAMA_CONFIG, None):
        info = validate_adapter(tmp_path, max_rank=MAX_RANK, base_config=base)
        assert info.rank == rank
        assert info.alpha == 2 * rank
        assert info.target_modules == tuple(sorted(targets))
        assert info.base_model == "lorry/tiny-llama"
        assert info.tensor_count == 2 * 2 * len(targets)


def test_writer_matches_peft_layout(tmp_path: Path) -> None:
    """Names, shapes, dtype and metadata as PEFT saves them (see demo_model.py's real output)."""
    write_adapter(tmp_path, rank=16, target_modules=ALL_LINEAR)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tensors[tensor_name(1, "q_proj", "lora_A")].shape == (16, 128)
    assert tensors[tensor_name(1, "q_proj", "lora_B")].shape == (128, 16)
    assert tensors[tensor_name(0, "down_proj", "lora_A")].shape == (16, 256)
    assert tensors[tensor_name(0, "gate_proj", "lora_B")].shape == (256, 16)
    assert "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight" in tensors
    assert "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight" in tensors
    assert len(tensors) == 28
    raw = (tmp_path / "adapter_model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    assert header["__metadata__"] == {"format": "pt"}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == sorted(ALL_LINEAR)
    # Both lora_A and lora_B are non-zero, so the adapter changes the model's output.
    assert all(np.abs(t).sum() > 0 for t in tensors.values())


@pytest.mark.parametrize("name", sorted(FORMAT_REJECTS))
def test_format_rejects(tmp_path: Path, name: str) -> None:
    """FORMAT: each is outside the PEFT LoRA format vLLM serves."""
    FORMAT_REJECTS[name](tmp_path)
    error = rejection(tmp_path)
    assert error.code == EXPECTED_CODES[name], error.message
    if name not in NEEDS_BASE_CONFIG:  # no base model needed to see these
        assert rejection(tmp_path, base=None).code == EXPECTED_CODES[name]


@pytest.mark.parametrize("name", sorted(POLICY_REJECTS))
def test_policy_rejects(tmp_path: Path, name: str) -> None:
    """POLICY: Lorry's own rules (pickled weights never unpickled; rank over LORRY_MAX_LORA_RANK)."""
    POLICY_REJECTS[name](tmp_path)
    with pytest.raises(AdapterRejected) as caught:
        check_file_policy([p.name for p in tmp_path.iterdir()], "adapter")
        validate_adapter(tmp_path, max_rank=MAX_RANK, base_config=TINY_LLAMA_CONFIG)
    assert caught.value.code == EXPECTED_CODES[name], caught.value.message


def test_rank_limit_is_the_setting(tmp_path: Path) -> None:
    """POLICY: the limit is LORRY_MAX_LORA_RANK, inclusive; rank_pattern counts too."""
    POLICY_REJECTS["rank_over_limit"](tmp_path)
    assert validate_adapter(tmp_path, max_rank=OVER_LIMIT_RANK).rank == OVER_LIMIT_RANK
    assert rejection(tmp_path, max_rank=OVER_LIMIT_RANK - 1).code == "rank_too_large"
    other = tmp_path / "pattern"
    write_adapter(other, rank=8, target_modules=("q_proj",), rank_pattern={"q_proj": 16})
    # rank_pattern says q_proj is rank 16, but the tensors are rank 8: inconsistent.
    assert rejection(other, max_rank=16).code == "tensor_shape_mismatch"
    assert rejection(other, max_rank=8).code == "rank_too_large"


def test_rank_pattern_sets_a_module_rank(tmp_path: Path) -> None:
    write_adapter(tmp_path, rank=8, target_modules=("q_proj", "v_proj"))
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    rng = np.random.default_rng(1)
    for layer in range(2):
        tensors[tensor_name(layer, "v_proj", "lora_A")] = rng.standard_normal((4, 128)).astype("float32")
        tensors[tensor_name(layer, "v_proj", "lora_B")] = rng.standard_normal((128, 4)).astype("float32")
    save_tensors(tmp_path, tensors)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    with pytest.raises(AdapterRejected, match="configured rank 8"):
        validate_adapter(tmp_path, max_rank=MAX_RANK)
    config["rank_pattern"] = {"v_proj": 4}
    save_config(tmp_path, config)
    info = validate_adapter(tmp_path, max_rank=MAX_RANK, base_config=TINY_LLAMA_CONFIG)
    assert info.rank == 8


def test_shapes_are_checked_against_the_base_model(tmp_path: Path) -> None:
    """FORMAT: a consistent adapter for another model; found only when the base config is known."""
    write_adapter(tmp_path, num_layers=3)
    assert validate_adapter(tmp_path, max_rank=MAX_RANK, base_config=None).rank == 8
    error = rejection(tmp_path)
    assert error.code == "tensor_shape_mismatch" and "layer 2" in error.message
    gqa = tmp_path / "gqa"
    write_adapter(gqa, num_kv_heads=1, target_modules=("k_proj",))  # k_proj out 64, not 128
    assert rejection(gqa).code == "tensor_shape_mismatch"
    assert validate_adapter(
        gqa, max_rank=MAX_RANK, base_config={**TINY_LLAMA_CONFIG, "num_key_value_heads": 1}
    )


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"r": 0}, "invalid_adapter"),
        ({"r": "8"}, "invalid_adapter"),
        ({"r": True}, "invalid_adapter"),
        ({"lora_alpha": None}, "invalid_adapter"),
        ({"target_modules": 3}, "invalid_adapter"),
        ({"peft_type": None}, "unsupported_peft_type"),
        ({"peft_type": "LOHA"}, "unsupported_peft_type"),
        ({"rank_pattern": {"q_proj": 0}}, "invalid_adapter"),
        ({"alora_invocation_tokens": [1, 2]}, "unsupported_adapter_feature"),
        ({"layer_replication": [[0, 2]]}, "unsupported_adapter_feature"),
        ({"use_qalora": True}, "unsupported_adapter_feature"),
        ({"modules_to_save": ["score"]}, "unsupported_adapter_feature"),
    ],
)
def test_config_fields(tmp_path: Path, overrides: dict[str, object], code: str) -> None:
    write_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    save_config(tmp_path, {**config, **overrides})
    assert rejection(tmp_path).code == code
    del config["r"]
    save_config(tmp_path, config)
    assert "'r'" in rejection(tmp_path).message


def test_config_must_be_a_json_object(tmp_path: Path) -> None:
    write_adapter(tmp_path)
    for text in ("[]", "{", "\xff", ""):
        (tmp_path / "adapter_config.json").write_text(text, encoding="latin-1")
        assert rejection(tmp_path).code == "invalid_adapter"
    (tmp_path / "adapter_config.json").write_text(" " * (1 << 20) + "{}")
    assert rejection(tmp_path).code == "adapter_too_large"


def test_unusable_base_model_names_are_dropped(tmp_path: Path) -> None:
    """Recorded only when it fits the column: too long, NUL or lone surrogates read as unknown."""
    for name in ("x" * 301, "a\x00b", "\ud800", "   "):
        write_adapter(tmp_path, base_model=name)
        assert validate_adapter(tmp_path, max_rank=MAX_RANK).base_model is None
    write_adapter(tmp_path, base_model=" org/model ")
    assert validate_adapter(tmp_path, max_rank=MAX_RANK).base_model == "org/model"


def test_accepted_peft_variants(tmp_path: Path) -> None:
    """Inits that only set initial weights, rsLoRA, and a missing base model name are fine."""
    write_adapter(tmp_path, init_lora_weights="gaussian", use_rslora=True, base_model=None, bias=None)
    info = validate_adapter(tmp_path, max_rank=MAX_RANK, base_config=TINY_LLAMA_CONFIG)
    assert info.base_model is None


def _raw_safetensors(path: Path, header: dict[str, object], data: bytes, *, pad: bool = True) -> None:
    encoded = json.dumps(header).encode()
    if pad:
        encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def _entry(shape: list[int], begin: int, end: int, dtype: str = "F32") -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize(
    ("header", "data", "why"),
    [
        ({"a": _entry([2, 2], 0, 16)}, b"\0" * 8, "truncated"),
        ({"a": _entry([2, 2], 0, 16)}, b"\0" * 24, "after the last tensor"),
        ({"a": _entry([2, 2], 0, 16), "b": _entry([2], 8, 16)}, b"\0" * 16, "overlap"),
        ({"a": _entry([2, 2], 8, 24)}, b"\0" * 24, "gap"),
        ({"a": _entry([2, 2], 0, 12)}, b"\0" * 12, "do not match"),
        ({"a": _entry([2, 2], 0, 16, "F99")}, b"\0" * 16, "unknown dtype"),
        ({"a": _entry([-2, 2], 0, 16)}, b"\0" * 16, "invalid shape"),
        ({"__metadata__": {"format": 1}}, b"", "__metadata__"),
    ],
)
def test_safetensors_header_is_checked(
    tmp_path: Path, header: dict[str, object], data: bytes, why: str
) -> None:
    """FORMAT: the same files the safetensors library itself refuses (checked below)."""
    path = tmp_path / "adapter_model.safetensors"
    _raw_safetensors(path, header, data)
    with pytest.raises(AdapterRejected, match=why) as caught:
        read_safetensors_header(path)
    assert caught.value.code == "invalid_safetensors"
    with pytest.raises(SafetensorError):
        load_file(str(path))


def test_safetensors_framing(tmp_path: Path) -> None:
    path = tmp_path / "adapter_model.safetensors"
    # Stricter than the library, which ignores unknown keys in an entry.
    _raw_safetensors(path, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, b"\0" * 4)
    with pytest.raises(AdapterRejected, match="exactly"):
        read_safetensors_header(path)
    for raw in (b"", b"\x01\x02", struct.pack("<Q", 1 << 40) + b"{}", struct.pack("<Q", 100) + b"{}"):
        path.write_bytes(raw)
        with pytest.raises(AdapterRejected) as caught:
            read_safetensors_header(path)
        assert caught.value.code == "invalid_safetensors"
    for header in (b"[]", b'{"a": 1, "a": 2}', b"\xff\xfe"):
        path.write_bytes(struct.pack("<Q", len(header)) + header)
        with pytest.raises(AdapterRejected, match="header"):
            read_safetensors_header(path)


def test_header_parser_agrees_with_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    tensors: dict[str, np.ndarray] = {
        "b": np.zeros((3, 5), np.float16),
        "a": np.ones((7,), np.float64),
        "c": np.zeros((0, 4), np.float32),
    }
    save_file(tensors, str(path), metadata={"format": "pt"})
    parsed = {t.name: t for t in read_safetensors_header(path)}
    assert {name: (t.shape, t.dtype) for name, t in parsed.items()} == {
        "a": ((7,), "F64"),
        "b": ((3, 5), "F16"),
        "c": ((0, 4), "F32"),
    }
    assert sum(t.end - t.begin for t in parsed.values()) == 7 * 8 + 15 * 2


def test_non_float_and_non_2d_tensors(tmp_path: Path) -> None:
    write_adapter(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    name = tensor_name(0, "q_proj", "lora_A")
    tensors[name] = tensors[name].astype(np.int32)
    save_tensors(tmp_path, tensors)
    assert rejection(tmp_path).code == "invalid_adapter"
    tensors[name] = np.zeros((8, 128, 1), np.float32)
    save_tensors(tmp_path, tensors)
    assert rejection(tmp_path).code == "tensor_shape_mismatch"
    del tensors[name]
    save_tensors(tmp_path, tensors)
    error = rejection(tmp_path)
    assert error.code == "invalid_adapter" and "lora_A" in error.message


def test_embedding_lora_is_refused(tmp_path: Path) -> None:
    """POLICY: vLLM can load embedding LoRA for Llama; Lorry supports the seven projections only."""
    write_adapter(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = np.zeros((8, 512), np.float32)
    tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = np.zeros((128, 8), np.float32)
    save_tensors(tmp_path, tensors)
    assert rejection(tmp_path).code == "unsupported_target_module"


def test_file_policy() -> None:
    """POLICY: the two kept files must be there; pickles instead of safetensors are refused."""
    check_file_policy(["adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "README.md"], "x")
    for names, code in (
        (["adapter_config.json", "adapter_model.bin"], "unsafe_weights"),
        (["adapter_config.json", "adapter_model.pth", "notes.txt"], "unsafe_weights"),
        (["adapter_config.json", "weights.pkl"], "unsafe_weights"),
        (["adapter_config.json"], "invalid_adapter"),
        (["adapter_model.safetensors"], "invalid_adapter"),
        ([], "invalid_adapter"),
    ):
        with pytest.raises(AdapterRejected) as caught:
            check_file_policy(names, "x")
        assert caught.value.code == code, names


def test_base_model_configs(tmp_path: Path) -> None:
    configs = BaseModelConfigs(tmp_path)
    assert configs.get("lorry/tiny-llama") is None
    path = install_base_config(tmp_path)
    assert path == tmp_path / "models" / "lorry--tiny-llama" / "config.json"
    assert configs.get("lorry/tiny-llama") == TINY_LLAMA_CONFIG
    for hostile in ("../etc", "/etc/passwd", "a/../../b", "a\\b", "", None):
        assert configs.get(hostile) is None
    path.write_text("not json")
    assert configs.get("lorry/tiny-llama") is None
