"""Load a model and its tokenizer from a preset name or a local directory.

One entry point for every command (train, chat, serve, eval, export): a preset gives a freshly
initialised tinylm model with the bundled tokenizer; a directory may hold a tinylm model or any
Hugging Face causal LM (Llama, Qwen, SmolLM, ...), loaded with its own tokenizer. Nothing is
downloaded: paths are local (see `tinylm download`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None


def check_model_dir(path: Path) -> None:
    """Name the missing or broken file before transformers fails somewhere deep inside."""
    _read_json(path / "config.json")
    weights = [f for f in WEIGHT_FILES if (path / f).exists()]
    if not weights:
        raise FileNotFoundError(f"{path}: no weights ({' / '.join(WEIGHT_FILES[:3])}); "
                                "was the save interrupted, or is this only a config/tokenizer directory?")
    if weights[0].endswith(".index.json"):
        index = _read_json(path / weights[0])
        missing = sorted({f for f in index.get("weight_map", {}).values() if not (path / f).exists()})
        if missing:
            raise FileNotFoundError(f"{path / weights[0]}: shard file(s) missing: {', '.join(missing[:4])}")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (path / name).exists():
            _read_json(path / name)


def load_tokenizer_for(spec: str, tokenizer: str | None = None):
    """Tokenizer from `tokenizer` if given, else from the model dir, else the bundled one."""
    from transformers import AutoTokenizer

    from tinylm.text.tokenizer import load_tokenizer

    if tokenizer:
        return load_tokenizer(tokenizer)
    path = Path(spec)
    if path.is_dir() and any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (path / name).exists():
                _read_json(path / name)
        if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            raise FileNotFoundError(f"{path}: tokenizer_config.json but no tokenizer.json (or tokenizer.model / "
                                    "vocab.json): the tokenizer files are incomplete")
        try:
            return AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{path}: cannot load the tokenizer: {e}") from None
    if path.is_dir():
        raise FileNotFoundError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json); pass a tokenizer dir")
    return load_tokenizer(None)


def load_model(spec: str, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
               tokenizer: str | None = None, seed: int | None = None, **config_overrides):
    """(model, tokenizer) for a preset name or a local model directory."""
    from transformers import AutoModelForCausalLM

    import tinylm  # noqa: F401  (registers the Auto classes)
    from tinylm.models.config import PRESETS, preset_config
    from tinylm.models.model import TinyLMForCausalLM

    torch_dtype = resolve_dtype(dtype)
    path = Path(spec)
    if spec in PRESETS and not path.exists():
        tok = load_tokenizer_for(spec, tokenizer)
        overrides = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        overrides.update(config_overrides)
        if seed is not None:
            torch.manual_seed(seed)
        model = TinyLMForCausalLM(preset_config(spec, **overrides))
        if torch_dtype is not None:
            model = model.to(torch_dtype)
    elif path.is_dir():
        config_file = path / "config.json"
        if not config_file.exists() and (path / "adapter_config.json").exists():  # a LoRA run's final/
            return load_model_with_adapter(path, dtype=torch_dtype, device=device)
        if not config_file.exists():
            raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
        check_model_dir(path)
        tok = load_tokenizer_for(spec, tokenizer)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype or "auto")
        except OSError as e:
            raise ValueError(f"{path}: cannot load the model: {e}") from None
        except Exception as e:  # safetensors reports a truncated/corrupt file as its own error type
            if type(e).__name__ != "SafetensorError":
                raise
            files = ", ".join(f for f in WEIGHT_FILES if (path / f).exists())
            raise ValueError(f"{path}: corrupt or truncated weights ({files}): {e}") from None
        if torch_dtype is None and model.dtype == torch.float16 and (device is None or str(device) == "cpu"):
            model = model.float()  # fp16 matmuls are slow/unsupported on CPU
    else:
        raise FileNotFoundError(
            f"model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing directory")
    if device is not None:
        model = model.to(device)
    return model, tok


def load_model_with_adapter(adapter_dir: str | Path, base: str | None = None, merge: bool = True,
                            dtype: str | torch.dtype | None = None, device: str | torch.device | None = None):
    """(model, tokenizer): the adapter's base model (from adapter_config.json or `base`) + the adapter."""
    from tinylm.models.lora import ADAPTER_CONFIG, load_adapter, merge_lora, read_adapter_config

    cfg = read_adapter_config(adapter_dir)
    base = base or cfg.get("base_model_name_or_path") or ""
    if not base:
        raise ValueError(f"{adapter_dir}/{ADAPTER_CONFIG}: base_model_name_or_path is empty; pass the base model")
    tok_dir = Path(adapter_dir)
    has_tok = (tok_dir / "tokenizer.json").exists() or (tok_dir / "tokenizer_config.json").exists()
    model, tokenizer = load_model(base, dtype=dtype, device=device, tokenizer=str(tok_dir) if has_tok else None)
    load_adapter(model, adapter_dir)
    if merge:
        merge_lora(model)
        model.name_or_path = str(adapter_dir)  # what it now is: an adapter stacked on it checks this base
    return model, tokenizer
