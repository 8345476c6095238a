"""Distinct torch-compiled classes for the reference model.

vLLM compiles per *class*, not per instance: the compiled-graph cache key is
the class's ``forward`` qualname and line, and with the bytecode hook the
compiled code is installed into ``type(module).forward.__code__``. Two
instances of one class would therefore share compiled code, and that code
bakes in the attention layer names (``aligned.*`` vs ``reference.*``): the
reference model would read and write the aligned model's KV cache.

``own_compiled_classes`` builds the reference model while the compiled classes
its architecture module refers to (e.g. ``llama.LlamaModel``) are replaced by
module-level subclasses with a forward of their own (own code object, own
qualname). ``ReferenceBuildPatch`` makes it the way the pair model builds its
reference (``AlignForCausalLM.build_reference``). Written for vLLM 0.32.
"""

from __future__ import annotations

import sys
import types
from contextlib import contextmanager

from vllm_align.engine.align_model import AlignForCausalLM
from vllm_align.patches.base import VllmPatch
from vllm_align.patches.version import check_version

WRITTEN_FOR = "0.32"


@contextmanager
def own_compiled_classes(model_cls: type, tag: str):
    """Within the block, the compiled classes used by ``model_cls`` are ``tag``-prefixed copies."""
    check_version(__name__, WRITTEN_FOR)
    from vllm.compilation.wrapper import TorchCompileWithNoGuardsWrapper

    swapped: list[tuple[object, str, type]] = []
    for klass in model_cls.__mro__:
        module = sys.modules.get(klass.__module__)
        if module is None or not klass.__module__.startswith("vllm."):
            continue
        for name, obj in list(vars(module).items()):
            if (isinstance(obj, type) and issubclass(obj, TorchCompileWithNoGuardsWrapper)
                    and not name.startswith(tag)):
                swapped.append((module, name, obj))
                setattr(module, name, _tagged_subclass(obj, tag))
    try:
        yield
    finally:
        for module, name, obj in reversed(swapped):
            setattr(module, name, obj)


def _tagged_subclass(base: type, tag: str) -> type:
    name = f"{tag}{base.__name__}"
    here = sys.modules[__name__]
    cls = getattr(here, name, None)
    if cls is not None:
        return cls

    # A copy of the compiled forward with a code object of its own: the
    # bytecode hook swaps code per function and matches frames by code-object
    # identity; the cache key reads the qualname.
    orig = base.forward
    forward = types.FunctionType(
        orig.__code__.replace(co_qualname=f"{name}.forward"), orig.__globals__,
        "forward", orig.__defaults__, orig.__closure__)
    forward.__kwdefaults__ = orig.__kwdefaults__
    forward.__annotations__ = dict(orig.__annotations__)
    forward.__qualname__ = f"{name}.forward"
    cls = type(name, (base,), {"forward": forward, "__module__": __name__,
                               "__qualname__": name})
    setattr(here, name, cls)  # module-level, so pickling finds it by name
    return cls


class ReferenceBuildPatch(VllmPatch):
    target = AlignForCausalLM
    replaces = ("build_reference",)

    @staticmethod
    def build_reference(model_cls: type, **kwargs):
        with own_compiled_classes(model_cls, tag="Reference"):
            return model_cls(**kwargs)
