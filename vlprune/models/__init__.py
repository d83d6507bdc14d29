"""Real (non-random) small models that vlprune assembles offline from pinned wheels on PyPI, without a model hub.

See :mod:`vlprune.models.tiny` for ``vlprune-tiny``: DINOv2-S/14 + SmolLM2-135M-Instruct as a LLaVA model.
"""
