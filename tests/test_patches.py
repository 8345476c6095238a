"""The patch layer: version guard and originals kept."""

import pytest

from vllm_align import patches
from vllm_align.patches import version
from vllm_align.patches.apply import apply_patches
from vllm_align.patches.base import VllmPatch


def test_installed_vllm_is_the_supported_one():
    assert version.vllm_version().startswith(version.SUPPORTED_VLLM + ".")


def test_patch_for_another_vllm_version_fails_loudly():
    class Target:
        def f(self):
            return "original"

    class FuturePatch(VllmPatch):
        target = Target
        replaces = ("f",)
        written_for = "9.9"

        def f(self):
            return "patched"

    with pytest.raises(RuntimeError, match="written for vLLM 9.9"):
        FuturePatch.apply()
    assert Target().f() == "original"


def test_patch_keeps_and_calls_the_original():
    class Target:
        def f(self, x):
            return x + 1

    class AddOne(VllmPatch):
        target = Target
        replaces = ("f",)

        def f(self, x):
            return AddOne.original("f")(self, x) * 10

    AddOne.apply()
    AddOne.apply()  # idempotent
    assert Target().f(1) == 20


def test_missing_target_attribute_fails_loudly():
    class Target:
        pass

    class Missing(VllmPatch):
        target = Target
        replaces = ("gone",)

        def gone(self):
            pass

    with pytest.raises(RuntimeError, match="Target.gone not found"):
        Missing.apply()


def test_every_patched_site_is_applied():
    """Each module in patches/ patches one site, and is live."""
    import importlib
    import pkgutil

    apply_patches()
    sites = [m.name for m in pkgutil.iter_modules(patches.__path__) if m.name not in ("base", "version", "apply")]
    assert {"engine_args", "input_processor", "model_runner", "scheduler",
            "output_processor"} <= set(sites)
    for name in sites:
        module = importlib.import_module(f"vllm_align.patches.{name}")
        for cls in vars(module).values():
            if isinstance(cls, type) and issubclass(cls, VllmPatch) and cls is not VllmPatch:
                for attr in cls.replaces:
                    assert cls.target.__dict__[attr] is cls.__dict__[attr], (name, attr)
