"""The adapter pool: the registry of LoRA and IAPT adapters (validated at registration), the pool that turns them
into engine requests, and the demo adapters."""
