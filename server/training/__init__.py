"""Training of adapters on CPU: the IAPT trainer."""
