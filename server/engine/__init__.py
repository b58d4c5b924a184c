"""The engine side of steerserve: everything that runs inside vLLM or builds its engines.

The vLLM plugin (`plugin.py`), the steering logits processor (`processor.py`) and the hooks it feeds (the forward
hook, the attention backend, the MoE router hook, the IAPT layer hooks, the LoRA ops patch), fault reports, and the
server's `Engine` (`async_engine.py`). Kept empty on purpose: vLLM imports `plugin` in every process.
"""
