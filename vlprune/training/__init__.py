"""Training the small real models vlprune ships: :mod:`vlprune.training.train_tiny` trains vlprune-tiny's projector
and LoRA adapters on Shapes VQA (``python -m vlprune.training.train_tiny``).

It sits above the library (it reads the Shapes benchmark of :mod:`vlprune.eval.shapes` and assembles the base model
with :mod:`vlprune.models.tiny`), so nothing in the library imports it.
"""
