"""Training configuration: one documented dataclass, YAML recipes and dotted command-line overrides.

A run is described by a YAML recipe (see `recipes/`) plus `key=value` overrides:

    tinylm train recipes/pretrain.yaml lr=3e-4 data.train=x.jsonl max_steps=10 model=tiny

Values are parsed as YAML (so `3e-4` is a float, `true` a bool, `[a, b]` a list). Unknown keys
stop the run with the close matches listed. The fully resolved config is written next to the
checkpoints as `out_dir/config.yaml`, so every run can be repeated from its own directory.

Adding a sub-section for a new stage is three lines: a dataclass with documented fields, a field
`name: NewConfig = field(default_factory=NewConfig)` on `TrainConfig`, done (parsing, overrides,
validation of unknown keys and saving all work from the dataclass fields).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STAGES = ("pretrain", "sft", "dpo", "distill", "reason", "grpo", "reward", "ppo", "vlm")


@dataclass
class DataConfig:
    """Where the training data lives.

    Args:
        train: Training file(s): `.jsonl` / `.json` / `.txt` (tokenized on first use and cached), or a
            directory prepared by `tinylm data prepare`. Relative paths are relative to the current directory.
        val: Validation file or prepared directory; empty = no validation loss.
        packing: Pack several chat conversations into one row (SFT only; pretraining is always packed);
            positions restart and attention stays inside each conversation, so the loss is unchanged.
        skip_invalid: Skip malformed records (and report how many) instead of stopping with an error.
        allow_special_tokens: Special-token strings (`<|im_end|>`, `<think>`, ...) inside the data are
            encoded as plain text, so only the chat template makes control tokens. For trusted,
            pre-formatted data: true keeps them all as control tokens, or a list names those that may
            stay (e.g. ["<answer>", "</answer>"]).
    """

    train: str = ""
    val: str = ""
    packing: bool = False
    skip_invalid: bool = False
    allow_special_tokens: bool | list[str] = False


@dataclass
class LoraConfig:
    """LoRA / QLoRA adapters (Hu et al. 2021; Dettmers et al. 2023). Applies to any stage.

    Args:
        enabled: Train adapters on a frozen model instead of all weights (full fine-tuning).
        r: Adapter rank.
        alpha: Scaling numerator: the update is (alpha / r) * B @ A.
        dropout: Dropout on the adapter input.
        target_modules: Module names to adapt (a name matches itself or any `...name`; default: all
            attention and MLP projections); "all-linear" = every linear layer except lm_head.
        init: Initialisation of A: "kaiming" (uniform, as PEFT) or "gaussian" (std 1/r); B starts at 0.
        quantize: "none" or "nf4" (QLoRA: frozen base weights stored in 4-bit NormalFloat, block 64).
        double_quant: Also quantise the NF4 block scales to 8 bits (QLoRA double quantisation).
        use_bnb: With quantize=nf4 on CUDA, use bitsandbytes' Linear4bit kernels instead of tinylm's.
    """

    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    init: str = "kaiming"
    quantize: str = "none"
    double_quant: bool = False
    use_bnb: bool = False


@dataclass
class DPOConfig:
    """Direct Preference Optimization (stage `dpo`).

    Args:
        beta: Strength of the implicit KL penalty to the reference model.
        loss_type: "sigmoid" (DPO), "ipo" or "hinge".
        label_smoothing: Conservative-DPO smoothing epsilon (sigmoid loss only).
        ref_model: Reference model directory; empty = a frozen copy of the starting model.
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    ref_model: str = ""


@dataclass
class DistillConfig:
    """Knowledge distillation from a teacher (stage `distill`; Hinton et al. 2015).

    Args:
        teacher: Teacher model directory (must share the student's vocabulary).
        alpha: Weight of the hard-label CE; 1 - alpha goes to the KL term.
        temperature: Softmax temperature for the KL term.
    """

    teacher: str = ""
    alpha: float = 0.5
    temperature: float = 1.0


@dataclass
class GRPOConfig:
    """Group Relative Policy Optimization (stage `grpo`; Shao et al. 2024).

    Args:
        group_size: Completions sampled per prompt.
        max_new_tokens: Length limit of each completion.
        temperature: Sampling temperature for the rollouts.
        beta: KL penalty weight against the reference model (0 = no reference model).
        reward: Reward functions, comma separated: built-ins "format", "accuracy", "tag_count", or
            "module:function" paths to your own `f(prompts, completions, **columns) -> list[float]`.
        reward_weights: One weight per reward function (same order); the reward is the weighted
            sum. Empty = all 1.
        epsilon: PPO clip range: the ratio is clipped to [1 - epsilon, 1 + epsilon_high].
        epsilon_high: Upper clip (DAPO "clip-higher"); 0 = same as epsilon.
        loss_type: Token aggregation, as TRL: "dapo" (default; token mean over the optimizer step),
            "bnpo" (token mean per micro-batch) or "grpo" (per-completion mean, then mean).
        scale_rewards: Advantage scaling: "group" (divide by the group's reward std, the paper),
            "batch" or "none" (Dr. GRPO: only subtract the group mean).
        ref_model: Reference model dir for the KL term; empty = frozen copy of the start (or adapters off).
        eval_prompts: Held-out prompt file (same format as data.train); at every validation
            (`eval_every` and the last step) the mean reward on it is logged as `val_reward`.
        eval_samples: Completions sampled per held-out prompt (temperature `temperature`).
        tools: Bundled tools (tinylm/inference/tools.py) the rollouts may call; non-empty = agentic RL: multi-turn
            rollouts that run the tools, tool results masked out of the loss (tinylm/posttrain/agent_rl.py).
        max_turns: Model turns per tool rollout (each may call tools; the last must answer).
    """

    group_size: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    beta: float = 0.0
    reward: str = "format,accuracy"
    reward_weights: list[float] = field(default_factory=list)
    epsilon: float = 0.2
    epsilon_high: float = 0.0
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    ref_model: str = ""
    eval_prompts: str = ""
    eval_samples: int = 4
    tools: list[str] = field(default_factory=list)
    max_turns: int = 4


@dataclass
class RewardConfig:
    """Reward model on preference pairs (stage `reward`; Bradley-Terry loss, Ouyang et al. 2022).

    Args:
        val_fraction: Share of `data.train` held out for pairwise accuracy when `data.val` is empty.
        center_rewards_coefficient: Weight of (r_chosen + r_rejected)^2 (Eisenstein et al. 2023; 0 = off).
    """

    val_fraction: float = 0.1
    center_rewards_coefficient: float = 0.0


@dataclass
class PPOConfig:
    """Proximal Policy Optimization with a value function (stage `ppo`; Schulman et al. 2017, InstructGPT).

    Args:
        reward_model: Reward model directory (trained with stage `reward`); or empty and `reward` set.
        reward: Rule reward functions, as grpo.reward ("format,accuracy", "module:function").
        reward_weights: One weight per rule reward function; empty = all 1.
        value_model: "shared" (a value head on the policy's trunk) or "separate" (a critic network
            with its own AdamW, initialised from `critic_model` or a copy of the start policy).
        critic_model: Start weights of the separate critic; empty = a copy of the start policy.
        critic_lr: Learning rate of the separate critic (constant).
        rollout_size: Completions sampled per rollout (one per prompt).
        epochs: PPO epochs over each rollout; each micro-batch of `batch_size` completions is one update.
        gamma: Discount of the per-token rewards.
        lam: GAE lambda (Schulman et al. 2015).
        cliprange: Policy ratio clip epsilon.
        cliprange_value: Value prediction clip around the rollout's values.
        vf_coef: Weight of the value loss (shared trunk: added to the policy loss).
        kl_coef: Per-token KL penalty to the frozen reference, subtracted from the reward.
        kl_estimator: "k1" (logp - logp_ref) or "k3" ((r - 1) - log r, r = p_ref / p).
        whiten_rewards: Whiten the per-token rewards before GAE (advantages are always whitened).
        target_kl: Stop the epochs over a rollout when a minibatch's approx-KL exceeds this (0 = never).
        max_new_tokens: Length limit of each completion.
        temperature: Sampling temperature (log-probs are computed at the same temperature).
        ref_model: Reference model dir; empty = frozen copy of the start model (or adapters off).
        eval_prompts: Held-out prompts: mean reward logged as `val_reward` at every validation.
        eval_samples: Completions per held-out prompt.
    """

    reward_model: str = ""
    reward: str = ""
    reward_weights: list[float] = field(default_factory=list)
    value_model: str = "shared"
    critic_model: str = ""
    critic_lr: float = 1.0e-4
    rollout_size: int = 32
    epochs: int = 4
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    whiten_rewards: bool = False
    target_kl: float = 0.0
    max_new_tokens: int = 40
    temperature: float = 1.0
    ref_model: str = ""
    eval_prompts: str = ""
    eval_samples: int = 2


@dataclass
class ReasonConfig:
    """Reasoning SFT on <think>...</think><answer>...</answer> chats (stage `reason`).

    Args:
        tag_weight: Loss weight of the four tag tokens (1 = plain SFT; MiniMind uses 10).
    """

    tag_weight: float = 10.0


@dataclass
class FSDPConfig:
    """FSDP2 settings for `parallel: fsdp` (Zhao et al. 2023; ZeRO-2/3 of Rajbhandari et al. 2020).

    Args:
        reshard_after_forward: true = free the gathered weights after each layer's forward and gather
            them again for backward (ZeRO-3: least memory); false = keep them until the backward
            (ZeRO-2-like: less communication, full weights held during the step).
        mixed_precision: Compute in bf16 weights gathered from fp32 shards, reduce gradients in fp32.
        cpu_offload: Keep the parameter, gradient and optimizer shards in CPU memory (CUDA runs).
    """

    reshard_after_forward: bool = True
    mixed_precision: bool = False
    cpu_offload: bool = False


@dataclass
class DeepSpeedConfig:
    """DeepSpeed settings for `parallel: deepspeed` (tinylm/training/deepspeed_zero.py, docs/distributed.md).

    Args:
        stage: ZeRO stage: 1 (optimizer state sharded), 2 (+ gradients), 3 (+ weights).
        config: Extra DeepSpeed config keys passed through (e.g. {offload_optimizer: ...} inside
            zero_optimization); batch size, accumulation, clipping and the optimizer come from tinylm.
    """

    stage: int = 2
    config: dict = field(default_factory=dict)


@dataclass
class VisionConfig:
    """Vision-language model settings (stage `vlm`; tinylm/models/vision.py, docs/vision.md).

    Args:
        encoder: Vision tower directory (CLIP / SigLIP / SigLIP2, or the demo tower of
            `python -m tinylm.posttrain.clip_train`); unused when `model` is already a saved VLM directory.
        pool: Average-pool k x k patches into one image token (1 = one token per patch).
        feature_layer: Vision hidden state fed to the projector (-2 = penultimate, as LLaVA-1.5).
        projector_norm: LayerNorm before the projector MLP (false = exactly LLaVA's projector).
        train_lm: Which LM weights train: "none" (projector only: caption alignment), "all", or
            "layers:I,J" (those decoder layers).
        train_encoder: Also train the vision tower (frozen by default).
    """

    encoder: str = ""
    pool: int = 1
    feature_layer: int = -2
    projector_norm: bool = True
    train_lm: str = "none"
    train_encoder: bool = False


@dataclass
class TrainConfig:
    """Everything one `tinylm train` run needs. Every field can be set in YAML or as `key=value`.

    Args:
        stage: What to optimise: "pretrain" (next-token loss on all tokens), "sft" (loss on assistant
            tokens only), or a post-training stage: "dpo", "distill", "reason", "grpo", "reward", "ppo".
        model: A preset name (`tiny`, `small`, `base`, `tiny-moe`, `small-moe`; random init) or a model
            directory (tinylm or any Hugging Face causal LM, e.g. `runs/pretrain/final`).
        tokenizer: Tokenizer directory; empty = the model directory's own, or the bundled one for presets.
        data: Data files, see `DataConfig`.
        seq_len: Tokens per row (longer rows are split when pretraining, truncated for chat data).
        batch_size: Rows per micro-batch, per process.
        grad_accum: Micro-batches per optimizer step. Global batch = batch_size * grad_accum * world size.
        lr: Peak learning rate (reached after warmup).
        min_lr: Final learning rate of the cosine decay; negative = lr / 10.
        warmup_steps: Linear warmup from 0 to `lr` over this many optimizer steps.
        weight_decay: AdamW decoupled weight decay, applied to matrices only (not norms, biases, embeddings).
        adam_beta1: AdamW beta1.
        adam_beta2: AdamW beta2.
        max_steps: Optimizer steps to run; 0 = derive from `epochs`, or run until `time_budget_min`.
        epochs: Passes over the training data (used when max_steps is 0).
        time_budget_min: Stop after this many minutes (0 = no limit), whatever the step count. With
            max_steps = 0 and epochs = 0 the run lasts exactly the budget and the cosine schedule
            follows elapsed time instead of steps.
        save_every: Save a checkpoint every N steps (0 = only at the end).
        keep_last: How many checkpoints to keep in `out_dir/checkpoints`.
        keep_best: Also keep the weights of the lowest validation loss so far in `out_dir/best`
            (HF format, with training_info.json naming the step), so an overfitting run loses nothing.
        eval_every: Validation loss every N steps (0 = only at the end).
        eval_batches: Validation micro-batches per evaluation (0 = the whole validation set).
        log_every: Progress line and metrics row every N steps.
        sample_every: Greedy sample generations every N steps (0 = never).
        sample_prompts: Prompts for the sample generations (chat-formatted for chat stages).
        sample_max_new_tokens: Length of each sample generation.
        out_dir: Run directory: config.yaml, metrics.jsonl, checkpoints/, final/.
        resume: false = start fresh (refuses to overwrite checkpoints), true = continue from the latest
            checkpoint in out_dir if any, or a checkpoint directory path.
        dtype: "auto" (bf16 autocast on CUDA if supported and on CPUs with native bf16 (AVX512-BF16 / AMX),
            else fp32), "fp32", "bf16" (autocast), or
            "fp16" (CUDA autocast with GradScaler). Master weights stay fp32.
        compile: Wrap the model in `torch.compile`.
        grad_checkpointing: Recompute activations in the backward pass (less memory, ~30% slower).
        grad_clip: Clip the global gradient norm to this value (0 = off).
        parallel: Multi-process training under torchrun (docs/distributed.md): "ddp" (every rank holds
            everything), "zero1" (DDP + optimizer state sharded, ZeroRedundancyOptimizer), "deepspeed"
            (DeepSpeed ZeRO `deepspeed.stage`; optional dependency) or "fsdp"
            (FSDP2: weights, gradients and optimizer state sharded; sharded checkpoints that resume at
            any world size). One process: the same loop, no sharding.
        fsdp: FSDP2 settings (ZeRO-2 vs ZeRO-3, bf16 mixed precision, CPU offload).
        deepspeed: `parallel: deepspeed` settings (ZeRO stage, config passthrough; tinylm/training/deepspeed_zero.py).
        dist_timeout_min: A collective that waits longer than this (a dead or hung rank) fails the run.
        seed: Seed for model init, data order and dropout.
        device: "auto", "cpu", "cuda", "cuda:1", "mps". Under torchrun each rank uses cuda:LOCAL_RANK.
        num_workers: Tokenizer processes used when a raw data file is prepared on first use (0 or 1 = one
            process); training itself reads memory-mapped token files and needs no loader workers.
        report_to: "none", "tensorboard" or "wandb" (used only if the package is installed).
        run_name: Name shown in TensorBoard / W&B; empty = the out_dir name.
        lora: LoRA / QLoRA adapter settings.
        dpo: DPO settings.
        distill: Distillation settings.
        grpo: GRPO settings.
        reason: Reasoning SFT settings.
        reward: Reward-model settings.
        ppo: PPO settings.
        vision: Vision-language settings (stage `vlm`).
    """

    stage: str = "pretrain"
    model: str = "tiny"
    tokenizer: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = -1.0
    warmup_steps: int = 20
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    max_steps: int = 0
    epochs: float = 1.0
    time_budget_min: float = 0.0
    save_every: int = 500
    keep_last: int = 2
    keep_best: bool = True
    eval_every: int = 200
    eval_batches: int = 20
    log_every: int = 10
    sample_every: int = 0
    sample_prompts: list[str] = field(default_factory=list)
    sample_max_new_tokens: int = 32
    out_dir: str = "runs/train"
    resume: bool | str = False
    dtype: str = "auto"
    compile: bool = False
    grad_checkpointing: bool = False
    grad_clip: float = 1.0
    parallel: str = "ddp"
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    dist_timeout_min: float = 10.0
    seed: int = 1337
    device: str = "auto"
    num_workers: int = 0
    report_to: str = "none"
    run_name: str = ""
    lora: LoraConfig = field(default_factory=LoraConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    reason: ReasonConfig = field(default_factory=ReasonConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)

    def validate(self) -> None:
        """Raise ValueError naming the field for values that cannot work."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"config: {msg}")

        need(self.stage in STAGES, f"stage={self.stage!r} is not one of {', '.join(STAGES)}")
        need(bool(self.model), "model is empty (a preset name or a model directory)")
        for name in ("seq_len", "batch_size", "grad_accum", "log_every"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "save_every", "eval_every", "eval_batches", "sample_every",
                     "num_workers", "time_budget_min", "epochs", "grad_clip", "weight_decay"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.keep_last >= 1, f"keep_last must be >= 1, got {self.keep_last}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.max_steps > 0 or self.epochs > 0 or self.time_budget_min > 0,
             "set one of max_steps, epochs or time_budget_min")
        need(self.parallel in ("ddp", "zero1", "fsdp", "deepspeed"),
             f"parallel={self.parallel!r} not in ddp|zero1|fsdp|deepspeed")
        need(self.deepspeed.stage in (1, 2, 3), f"deepspeed.stage must be 1, 2 or 3, got {self.deepspeed.stage}")
        need(isinstance(self.deepspeed.config, dict), "deepspeed.config must be a mapping")
        need(self.dist_timeout_min > 0, f"dist_timeout_min must be > 0, got {self.dist_timeout_min}")
        need(self.dtype in ("auto", "fp32", "bf16", "fp16"), f"dtype={self.dtype!r} not in auto|fp32|bf16|fp16")
        need(self.report_to in ("none", "tensorboard", "wandb"),
             f"report_to={self.report_to!r} not in none|tensorboard|wandb")
        need(bool(self.data.train) or self.stage == "grpo", "data.train is empty (a .jsonl/.txt file or prepared dir)")
        need(isinstance(self.sample_prompts, list), "sample_prompts must be a list of strings")
        need(self.lora.r >= 1, f"lora.r must be >= 1, got {self.lora.r}")
        need(self.lora.quantize in ("none", "nf4"), f"lora.quantize={self.lora.quantize!r} not in none|nf4")
        need(self.lora.init in ("kaiming", "gaussian"), f"lora.init={self.lora.init!r} not in kaiming|gaussian")
        need(self.lora.enabled or self.lora.quantize == "none",
             "lora.quantize=nf4 (QLoRA) trains adapters only: set lora.enabled=true")

    @property
    def final_min_lr(self) -> float:
        return self.lr / 10 if self.min_lr < 0 else self.min_lr


# -- parsing -------------------------------------------------------------------------------------

def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        t = _field_types(cls)[f.name]
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(t):
            keys += _all_keys(t, prefix + f.name + ".")
    return keys


def _unknown_key(key: str, where: str) -> ValueError:
    close = difflib.get_close_matches(key, _all_keys(TrainConfig), n=4, cutoff=0.5)
    hint = f"; did you mean: {', '.join(close)}?" if close else "; see docs/training.md for the list of keys"
    return ValueError(f"{where}: unknown config key {key!r}{hint}")


def _coerce(value: Any, typ: Any, key: str, where: str) -> Any:
    """Check/convert one value against the annotated type (ints may be given for floats, etc.)."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        for a in args:  # bool | str: keep a bool as bool, anything else as str
            if a is bool and isinstance(value, bool):
                return value
        for a in args:
            if a is not bool:
                try:
                    return _coerce(value, a, key, where)
                except ValueError:
                    pass
        raise ValueError(f"{where}: {key}={value!r} should be one of {typ}")
    if origin is list:
        if isinstance(value, str):  # `sample_prompts=hello` -> ["hello"]
            value = [value]
        if not isinstance(value, list):
            raise ValueError(f"{where}: {key}={value!r} should be a list")
        if typing.get_args(typ) == (float,):  # e.g. grpo.reward_weights
            return [_coerce(v, float, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return [str(v) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: {key}={value!r} should be true or false")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{where}: {key}={value!r} should be an integer")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ValueError(f"{where}: {key}={value!r} should be a number")
        return float(value)
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ValueError(f"{where}: {key}={value!r} should be a string")
        return str(value)
    return value


def _apply(obj: Any, values: dict[str, Any], prefix: str, where: str) -> None:
    hints = _field_types(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in values.items():
        key = prefix + str(k)
        if k not in names:
            raise _unknown_key(key, where)
        typ = hints[k]
        if dataclasses.is_dataclass(typ):
            if not isinstance(v, dict):
                raise ValueError(f"{where}: {key} is a section; give {key}.FIELD=VALUE or a mapping")
            _apply(getattr(obj, k), v, key + ".", where)
        else:
            setattr(obj, k, _coerce(v, typ, key, where))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`data.train=x.jsonl` -> (["data", "train"], "x.jsonl"); the value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value (e.g. lr=3e-4 or data.train=x.jsonl)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """TrainConfig from a YAML recipe (optional) plus dotted `key=value` overrides, validated."""
    cfg = TrainConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} not found")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark is not None else ""
            raise ValueError(f"{p}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{p}: top level must be a mapping of key: value")
        _apply(cfg, raw, "", str(p))
    for text in overrides or []:
        parts, value = parse_override(text)
        nested: Any = value
        for part in reversed(parts[1:]):
            nested = {part: nested}
        _apply(cfg, {parts[0]: nested}, "", f"override {text!r}")
    cfg.validate()
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    cfg = TrainConfig()
    _apply(cfg, values, "", "config")
    return cfg


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (tmp file + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
