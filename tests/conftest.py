"""Test-wide settings: fp32 on CPU under `dtype: auto`, so loss comparisons are exact on every CPU.

Set as an environment variable (not a monkeypatch) so the DDP test's worker processes inherit it.
Tests that need bf16 ask for it explicitly (`dtype="bf16"`).
"""

import os

os.environ["TINYLM_CPU_FP32"] = "1"
