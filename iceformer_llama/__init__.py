"""iceformer-llama: IceFormer sparse attention in a patched llama.cpp, for long prompts on CPUs."""

from .backend import use_backend
from .errors import IceformerError
from .settings import IceformerSettings

__version__ = "0.1.0"
__all__ = ["Llama", "IceformerSettings", "IceformerError", "use_backend", "__version__"]


def __getattr__(name):
    # Llama imports llama_cpp lazily, after the backend is chosen.
    if name == "Llama":
        from .llama import Llama
        return Llama
    raise AttributeError(name)
