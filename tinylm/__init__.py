"""tinylm: build a small chat LLM from zero — and see every algorithm.

Importing tinylm registers the `tinylm` model type with transformers' Auto classes, so
`AutoConfig` / `AutoModelForCausalLM.from_pretrained(dir)` load tinylm directories.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from tinylm.models.config import PRESETS, TinyLMConfig, count_parameters, preset_config
from tinylm.models.model import TinyLMForCausalLM

__version__ = "0.1.0"

AutoConfig.register("tinylm", TinyLMConfig, exist_ok=True)
AutoModelForCausalLM.register(TinyLMConfig, TinyLMForCausalLM, exist_ok=True)

__all__ = ["PRESETS", "TinyLMConfig", "TinyLMForCausalLM", "count_parameters", "preset_config", "__version__"]
