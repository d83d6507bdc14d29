"""The lmms-eval entry point (group ``lmms_eval.models``): tells lmms-eval that ``--model vlprune`` is
:class:`vlprune.eval.lmms_model.VLPruneLMMS`.

lmms-eval imports this module while its own ``lmms_eval.models`` package is still initialising, so it imports only
the manifest type and names the class by its path (loaded when a run asks for it).
"""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="vlprune", simple_class_path="vlprune.eval.lmms_model.VLPruneLMMS")
