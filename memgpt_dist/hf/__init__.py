"""Hugging Face interop: export a trained run as a transformers model with remote code (`export.py`).

`remote/` holds the two files an export carries (`configuration_memgpt.py`, `modeling_memgpt.py`);
they import torch and transformers only, so the export loads where this project is not installed.
"""
