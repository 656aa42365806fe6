"""iceformer-llama: IceFormer sparse attention in a patched llama.cpp, for long prompts on CPUs."""

from .errors import IceformerError
from .runtime.backend import use_backend
from .runtime.settings import IceformerSettings

__version__ = "0.1.0"
__all__ = ["Llama", "IceformerSettings", "IceformerError", "use_backend", "__version__"]


def __getattr__(name):
    # Llama imports llama_cpp lazily, after the backend is chosen.
    if name == "Llama":
        from .runtime.llama import Llama
        return Llama
    raise AttributeError(name)
