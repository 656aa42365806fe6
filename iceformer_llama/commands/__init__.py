"""The command line: `python -m iceformer_llama COMMAND` (setup, build, chat, generate, serve, ...)."""
