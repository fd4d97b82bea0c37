"""One name that differs between transformers releases we support.

transformers 5.24 renamed the KV cache argument and output field `past_key_values` to `cache`
(model outputs, `forward` keyword, `generate`'s model inputs). tinylm's own model accepts both;
code that calls *other* models (any local HF causal LM) passes the cache by `CACHE_FIELD` and
reads it back with `output_cache`, so it runs without deprecation warnings on either side.
"""

from __future__ import annotations

from typing import Any

from transformers.utils import generic

# "cache" from transformers 5.24 on, "past_key_values" before.
CACHE_FIELD = "cache" if hasattr(generic, "_rename_kwargs_for_bc") else "past_key_values"


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """{CACHE_FIELD: cache}: the keyword a transformers model's forward takes its KV cache by."""
    return {CACHE_FIELD: cache}


def output_cache(out: Any) -> Any:
    """The KV cache a model returned (ModelOutput or any object with that attribute)."""
    return getattr(out, CACHE_FIELD)


def enable_checkpointing(model: Any, use_reentrant: bool = False) -> None:
    """Activation (gradient) checkpointing on every decoder layer; transformers 5.24 renamed
    `gradient_checkpointing_enable` to `activation_checkpointing_enable`."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
