"""The families the HF engine prunes and the plugin does not yet (LLaVA-NeXT, LLaVA-OneVision, Qwen3-VL): the plugin
registers vLLM's own classes for them behind a check that refuses a ``vlprune`` entry with the family and the reason,
instead of serving the model unpruned without a word; without the entry they are vLLM's classes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from vllm import ModelRegistry

from vlprune.errors import VlpruneError
from vlprune.vllm import UNSERVED_ARCHITECTURES, register
from vlprune.vllm.unserved import RefusesPruning


@pytest.mark.parametrize("architecture", sorted(UNSERVED_ARCHITECTURES))
def test_each_unserved_architecture_resolves_to_a_refusing_multimodal_class(architecture: str) -> None:
    register()
    model_class = ModelRegistry._try_load_model_cls(architecture)
    module, name = UNSERVED_ARCHITECTURES[architecture].split(":")
    assert (model_class.__module__, model_class.__name__) == (module, name)
    assert issubclass(model_class, RefusesPruning)
    assert model_class.__mro__[2].__name__ == architecture  # right after the check: vLLM's own class
    info = ModelRegistry._try_inspect_model_cls(architecture)  # what vLLM reads of the class when it starts
    assert info is not None and info.supports_multimodal


def engine_config(**hf_config: object) -> SimpleNamespace:
    return SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace(**hf_config)))


class Built:
    """Stands for a vLLM model class: records how it was built."""

    def __init__(self, *, vllm_config: object, prefix: str = "") -> None:
        self.built_from = (vllm_config, prefix)


class RefusingNext(RefusesPruning, Built):
    vlprune_family = "LLaVA-NeXT"


def test_a_vlprune_entry_is_refused_before_the_model_is_built_naming_the_family_and_the_reason() -> None:
    config = engine_config(vlprune={"method": "divprune", "keep": 64})
    with pytest.raises(VlpruneError, match=r"does not prune LLaVA-NeXT models yet \(an image is a base view") as error:
        RefusingNext(vllm_config=config)
    assert "remove the 'vlprune' entry to serve the model unpruned" in str(error.value)


def test_without_a_vlprune_entry_the_class_is_built_as_vllm_builds_it() -> None:
    config = engine_config(model_type="llava_next")
    model = RefusingNext(vllm_config=config, prefix="model")
    assert model.built_from == (config, "model")
