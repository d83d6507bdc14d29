"""The old home of vlprune-tiny's training, kept as a shim that only forwards: ``python -m vlprune.models.train_tiny``
(the command the shipped adapter's provenance names) and ``from vlprune.models import train_tiny`` go on working.
The code is :mod:`vlprune.training.train_tiny`; training sits above the library, so this module is the layering's
one recorded exception (``ignore_imports`` in pyproject.toml).
"""

import sys

from vlprune.training.train_tiny import (
    ADAPTER_DIR,
    CHECKPOINT,
    CHECKPOINT_STATE,
    LORA_TARGETS,
    Checkpoint,
    adapter_state,
    collate,
    encode_example,
    example_stream,
    load_adapter,
    load_checkpoint,
    main,
    save_checkpoint,
    side_questions,
    trainable_model,
    training_text,
)

__all__ = [
    "ADAPTER_DIR",
    "CHECKPOINT",
    "CHECKPOINT_STATE",
    "LORA_TARGETS",
    "Checkpoint",
    "adapter_state",
    "collate",
    "encode_example",
    "example_stream",
    "load_adapter",
    "load_checkpoint",
    "main",
    "save_checkpoint",
    "side_questions",
    "trainable_model",
    "training_text",
]

if __name__ == "__main__":
    sys.exit(main())
