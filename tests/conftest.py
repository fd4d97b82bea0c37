"""Test-wide settings: fp32 on CPU under `dtype: auto`, so loss comparisons are exact on every CPU.

Set as an environment variable (not a monkeypatch) so the DDP test's worker processes inherit it.
Tests that need bf16 ask for it explicitly (`dtype="bf16"`). Compiled decode steps
(tinylm/inference/compiled_decode.py) are looked up in a directory of this test session only, and
`tinylm chat|generate` do not build them unless a test asks (`auto`).
"""

import os
import tempfile

os.environ["TINYLM_CPU_FP32"] = "1"
os.environ["TINYLM_DECODE_CACHE"] = tempfile.mkdtemp(prefix="tinylm-decode-")
os.environ["TINYLM_COMPILE_DECODE"] = "auto"
