"""The runtime: backend choice, models, the drop-in Llama, IceFormer settings, native bindings."""
