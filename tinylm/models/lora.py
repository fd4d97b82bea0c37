"""LoRA: fine-tune a frozen model through small low-rank adapters (Hu et al. 2021), and QLoRA.

For a frozen linear layer y = W x (W: out x in), LoRA learns

    y = W x + (alpha / r) * B A dropout(x)        A: r x in, B: out x r, r << min(in, out)

A starts random (Kaiming-uniform as in PEFT, or Gaussian std 1/r), B starts at zero, so training
starts from exactly the base model. Only A and B are trained: r * (in + out) numbers per layer
instead of in * out, and the optimizer state shrinks with them. After training the update can be
merged, W' = W + (alpha / r) B A, leaving a normal model with no inference cost.

QLoRA (Dettmers et al. 2023): the same adapters on top of base weights stored in 4-bit NF4
(tinylm/models/nf4.py), dequantised on the fly; adapters stay in fp32 (or the autocast dtype).

Files are PEFT's format (`adapter_config.json` + `adapter_model.safetensors`, keys such as
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), so
`peft.PeftModel.from_pretrained(base, dir)` loads adapters trained here and `load_adapter` loads
adapters trained with PEFT. Module names follow Llama, so the same adapter fits the tinylm model
and its transformers export.

    model = apply_lora(model, r=8, alpha=16)        # freeze everything, add adapters
    ... train (only lora_A / lora_B have requires_grad) ...
    save_adapter(model, "runs/lora/final", base_model_name_or_path="runs/sft/final")
    model = merge_lora(model)                       # plain model again
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    """A frozen linear layer (`base_layer`: nn.Linear, NF4Linear or bnb Linear4bit) plus a LoRA update."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 init: str = "kaiming") -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"lora r must be >= 1, got {r}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False)    # (r, in)
        self.lora_B = nn.Linear(r, self.out_features, bias=False)   # (out, r)
        self.disabled = False
        self.reset_lora(init)

    @torch.no_grad()
    def reset_lora(self, init: str = "kaiming") -> None:
        if init == "kaiming":   # PEFT's default: uniform with bound 1/sqrt(in)
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
        else:
            raise ValueError(f"lora init {init!r} not in kaiming|gaussian")
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) * B @ A, shape (out, in), fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)                                            # (..., out)
        if self.disabled:
            return y
        a = self.lora_A.weight
        h = self.lora_dropout(x.to(a.dtype) if not torch.is_autocast_enabled(x.device.type) else x)
        return y + (self.lora_B(self.lora_A(h)) * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


# -- applying --------------------------------------------------------------------------------------

def _setting(config: Any, name: str, default: Any) -> Any:
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a list matches names equal to or ending in `.target`; a string is a full regex."""
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def _is_linear(m: nn.Module) -> bool:
    from tinylm.models.nf4 import NF4Linear

    return isinstance(m, (nn.Linear, NF4Linear)) or type(m).__name__ == "Linear4bit"


def apply_lora(model: nn.Module, config: Any = None, **overrides: Any) -> nn.Module:
    """Freeze `model` and wrap its target linear layers in LoRALinear, in place; returns the model.

    config: any object or dict with r, alpha, dropout, target_modules, quantize ("none" | "nf4"),
    double_quant, use_bnb, init ("kaiming" | "gaussian") - e.g. `TrainConfig.lora`; keyword
    overrides win. With quantize="nf4" every nn.Linear except lm_head is first replaced by a frozen
    4-bit NF4 layer (QLoRA).
    """
    def get(name: str, default: Any) -> Any:
        return overrides.get(name, _setting(config, name, default))

    r, alpha = int(get("r", 8)), float(get("alpha", 16.0))
    dropout, init = float(get("dropout", 0.0)), str(get("init", "kaiming"))
    targets = get("target_modules", None) or DEFAULT_TARGETS
    if isinstance(targets, (list, tuple)) and list(targets) == ["all-linear"]:
        targets = "all-linear"
    quantize = str(get("quantize", "none") or "none")
    if quantize not in ("none", "nf4"):
        raise ValueError(f"lora.quantize={quantize!r} not in none|nf4")
    if any(True for _ in lora_modules(model)):
        raise ValueError("model already has LoRA adapters (merge_lora or load_adapter into a fresh model)")

    for p in model.parameters():
        p.requires_grad_(False)
    if quantize == "nf4":
        from tinylm.models.nf4 import quantize_linears

        quantize_linears(model, double_quant=bool(get("double_quant", False)), use_bnb=bool(get("use_bnb", False)))
    skip = {id(model.get_output_embeddings())} if hasattr(model, "get_output_embeddings") else set()
    found = [(n, m) for n, m in model.named_modules() if _is_linear(m) and matches(n, targets)
             and not (targets == "all-linear" and (id(m) in skip or n.endswith("lm_head")))]
    if not found:
        raise ValueError(f"lora.target_modules={targets!r} matched no linear layer of {type(model).__name__} "
                         f"(linear layers are named like {_example_names(model)})")
    for name, base in found:
        layer = LoRALinear(base, r, alpha, dropout, init)
        like = next(iter([*base.parameters(), *base.buffers()]), None)
        if like is not None:  # adapters on the base layer's device, in fp32
            layer.lora_A.to(like.device)
            layer.lora_B.to(like.device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    # Frozen embeddings give activations without requires_grad; reentrant activation checkpointing
    # then drops the adapters' gradients. HF's fix: make the embedding output require grad.
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    model.lora_settings = {"r": r, "alpha": alpha, "dropout": dropout, "quantize": quantize}
    return model


def _example_names(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:3]
    return ", ".join(names) or "(none)"


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (4-bit NF4 weights are buffers, not parameters: see size_summary)."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def size_summary(model: nn.Module) -> str:
    """One line for the training start: trainable / total parameters, and for QLoRA the 4-bit storage.

    e.g. `0.92M trainable / 134.52M params (0.68%) | NF4 weights 56.2 MB (fp32 406.5 MB)`. Total counts
    the quantised weights too (stored as NF4 buffers, not parameters).
    """
    from tinylm.models.nf4 import NF4Linear, nf4_bytes

    trainable, total = trainable_parameters(model)
    q = [m for m in model.modules() if isinstance(m, NF4Linear)]
    n_q = sum(m.in_features * m.out_features for m in q)
    total += n_q
    out = f"{trainable / 1e6:.2f}M trainable / {total / 1e6:.2f}M params ({100 * trainable / max(total, 1):.2f}%)"
    if q:
        out += f" | NF4 weights {nf4_bytes(model) / 1e6:.1f} MB (fp32 {4 * n_q / 1e6:.1f} MB)"
    return out


def check_base_model(spec: str) -> None:
    """Refuse LoRA on a preset name: the adapter would record `base_model_name_or_path = "tiny"`, and every
    later load (chat, serve, export, resume on another machine) rebuilds a *different* random base."""
    from tinylm.models.config import PRESETS

    if spec in PRESETS and not Path(spec).exists():
        raise ValueError(
            f"config: lora.enabled with model={spec!r}, a preset (random weights, drawn anew on every load): an "
            f"adapter is only meaningful on a saved base model directory. Train one (recipes/pretrain.yaml) or "
            f"save a fresh one (`tinylm init --preset {spec} --out DIR`), then pass model=DIR")


def _same_base(recorded: str, loaded: str) -> bool:
    """True when an adapter's recorded base and the loaded model's path name the same model.

    Local paths are compared resolved; a hub id (not a local path) matches a directory of the same name
    (`HuggingFaceTB/SmolLM2-135M-Instruct` ~ `models/SmolLM2-135M-Instruct`).
    """
    a, b = Path(recorded), Path(loaded)
    if a.exists() and b.exists():
        return a.resolve() == b.resolve()
    return a.name.lower() == b.resolve().name.lower() or recorded == loaded


def warn_if_other_base(model: nn.Module, adapter_cfg: dict[str, Any], adapter_dir: str | os.PathLike) -> bool:
    """Print a warning when the adapter was trained on another base than the model it is loaded into.

    Shapes are checked separately (an error); this catches same-shape bases with other weights, e.g.
    another checkpoint of the same run. Returns True when it warned.
    """
    import sys

    recorded = str(adapter_cfg.get("base_model_name_or_path") or "")
    loaded = str(getattr(model, "name_or_path", "") or "")
    if not recorded or not loaded or _same_base(recorded, loaded):
        return False
    print(f"warning: {adapter_dir}: the adapter was trained on base {recorded!r}, but it is being applied to "
          f"{loaded!r}; the output may be wrong unless that is the same model", file=sys.stderr)
    return True


@contextlib.contextmanager
def disable_lora(model: nn.Module) -> Iterator[None]:
    """Run the base model: adapters off inside the block (DPO/GRPO reference without a copy)."""
    layers = [m for _, m in lora_modules(model)]
    old = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m, o in zip(layers, old):
            m.disabled = o


# -- merging ---------------------------------------------------------------------------------------

@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += alpha/r * B A) and remove the wrappers, in place.

    NF4 base layers are dequantised first, so the result is a plain float model ready for
    save_pretrained / export. Returns the model.
    """
    from tinylm.models.nf4 import NF4Linear

    for name, layer in list(lora_modules(model)):
        base = layer.base_layer
        if isinstance(base, NF4Linear) or type(base).__name__ == "Linear4bit":
            base = dequantized_linear(base)
        base.weight += layer.delta_weight().to(base.weight.dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, base)
    for name, m in list(model.named_modules()):  # non-adapted 4-bit layers -> plain nn.Linear too
        if isinstance(m, NF4Linear) or type(m).__name__ == "Linear4bit":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, dequantized_linear(m))
    for hook in getattr(model, "_require_grads_hooks", []):
        hook.remove()
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    return model


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict `merge_lora(model)` would leave (W + alpha/r * B A under the plain names), without
    changing the model: a save in the middle of training (the VLM stage saves its LM merged). Float
    base layers only (merge_lora handles 4-bit ones)."""
    layers = dict(lora_modules(model))
    out = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner.endswith((".lora_A", ".lora_B")) and owner.rpartition(".")[0] in layers:
            continue
        if owner.endswith(".base_layer") and owner[:-len(".base_layer")] in layers:
            name = owner[:-len(".base_layer")]
            if not isinstance(layers[name].base_layer, nn.Linear):
                raise ValueError(f"merged_state_dict: {name} has a 4-bit base layer; use merge_lora")
            key = f"{name}.{leaf}"
            if leaf == "weight":
                value = value + layers[name].delta_weight().to(value.dtype)
        out[key] = value
    return out


def dequantized_linear(layer: nn.Module) -> nn.Linear:
    """A float32 nn.Linear with the weights of a 4-bit layer (ours or bitsandbytes')."""
    if hasattr(layer, "dequantize"):
        w = layer.dequantize(torch.float32)
    else:  # bitsandbytes Linear4bit
        import bitsandbytes.functional as bnbf

        w = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=w.device)
    out.weight.data.copy_(w)
    if layer.bias is not None:
        out.bias.data.copy_(layer.bias.float())
    out.requires_grad_(False)
    return out


# -- PEFT-format files -----------------------------------------------------------------------------

def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT key -> tensor for every adapter (fp32, CPU)."""
    out = {}
    for name, layer in lora_modules(model):
        for part in ("lora_A", "lora_B"):
            out[f"{PEFT_PREFIX}{name}.{part}.weight"] = getattr(layer, part).weight.detach().float().cpu().contiguous()
    return out


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str = "") -> Path:
    """Write adapter_config.json + adapter_model.safetensors (PEFT's format) into out_dir, atomically."""
    from safetensors.torch import save_file

    layers = list(lora_modules(model))
    if not layers:
        raise ValueError("model has no LoRA adapters to save (apply_lora first)")
    r, alpha = layers[0][1].r, layers[0][1].alpha
    if any(m.r != r or m.alpha != alpha for _, m in layers):
        raise ValueError("save_adapter: all adapters must share r and alpha")
    dropout = layers[0][1].lora_dropout.p if isinstance(layers[0][1].lora_dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "bias": "none",
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name, _ in layers}),
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "use_rslora": False, "use_dora": False,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
        "revision": None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=out, prefix=".tmp_adapter_")
    try:
        save_file(adapter_state_dict(model), os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        for fname in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            os.replace(os.path.join(tmp, fname), out / fname)
    finally:
        for f in Path(tmp).glob("*"):
            f.unlink()
        os.rmdir(tmp)
    return out


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type={cfg.get('peft_type')!r}; only LORA adapters are supported")
    for key in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save"):
        if cfg.get(key):
            raise ValueError(f"{path}: {key}={cfg[key]!r} is not supported by tinylm's LoRA")
    return cfg


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, quantize: str = "none",
                 double_quant: bool = False) -> nn.Module:
    """Add the adapters stored in adapter_dir (ours or PEFT's) to `model`; returns the model.

    Raises ValueError naming the first tensor whose module is missing or whose shape differs
    (an adapter made for another base model); prints a warning when the adapter's recorded
    base_model_name_or_path is not the model's own path (same shapes, maybe other weights).
    """
    from safetensors.torch import load_file

    cfg = read_adapter_config(adapter_dir)
    warn_if_other_base(model, cfg, adapter_dir)
    weights_path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} (adapter_model.bin is not read: "
                                "re-save it with safetensors)")
    weights = load_file(str(weights_path))
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    if cfg.get("use_rslora"):  # rsLoRA scales by alpha / sqrt(r): the same as alpha' / r with alpha' = alpha sqrt(r)
        alpha = alpha * math.sqrt(r)
    # Which modules carry adapters: read them from the tensor names (exact, whatever the config says).
    names = {}
    for key in weights:
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.default)?\.weight", key)
        if m is None:
            raise ValueError(f"{weights_path}: unexpected tensor {key!r} (only lora_A / lora_B weights are supported)")
        names.setdefault(m.group(1), {})[m.group(2)] = weights[key]
    modules = dict(model.named_modules())
    for name, parts in sorted(names.items()):  # check everything before changing the model
        module = modules.get(name)
        if isinstance(module, LoRALinear):
            module = module.base_layer
        if module is None or not _is_linear(module):
            raise ValueError(f"{weights_path}: adapter tensor for {name!r} but the model has no linear layer "
                             f"with that name (adapter made for a different base model?)")
        want = {"lora_A": (r, module.in_features), "lora_B": (module.out_features, r)}
        for part, t in sorted(parts.items()):
            if tuple(t.shape) != want[part]:
                raise ValueError(f"{weights_path}: {PEFT_PREFIX}{name}.{part}.weight has shape {tuple(t.shape)}, "
                                 f"model expects {want[part]} (adapter made for a different base model?)")
    if not any(True for _ in lora_modules(model)):
        apply_lora(model, r=r, alpha=alpha, dropout=float(cfg.get("lora_dropout", 0.0)),
                   target_modules="|".join(re.escape(n) for n in names),
                   quantize=quantize, double_quant=double_quant)
    layers = dict(lora_modules(model))
    with torch.no_grad():
        for name, parts in names.items():
            if name not in layers:
                raise ValueError(f"{weights_path}: model has no adapter on {name!r}")
            layer = layers[name]
            for part, t in parts.items():
                param = getattr(layer, part).weight
                if param.shape != t.shape:
                    raise ValueError(f"{weights_path}: {PEFT_PREFIX}{name}.{part}.weight has shape {tuple(t.shape)}, "
                                     f"model expects {tuple(param.shape)} (adapter made for a different base model?)")
                param.copy_(t.to(param.dtype))
    return model


disable_adapters = disable_lora  # name used by the DPO / GRPO reference-model code
