"""State that must survive restarts, in SQLite under the data directory: steering profiles and tenant settings."""
