"""Every reach past vLLM's public plugin APIs, one module per patched site.

Installed as ``vllm_align.patches``. Each patch names the vLLM version it was
written for and refuses to patch any other, loudly (``version.py``);
``apply.apply_patches()`` applies them all, in order. This package module
imports nothing, so that importing one patch never imports the others.
"""
