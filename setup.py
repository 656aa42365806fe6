# cffi API mode needs setup.py to wire the extension (the argon2-cffi-bindings pattern).
from setuptools import setup

setup(cffi_modules=["iceformer_llama/_native_build.py:ffibuilder"])
