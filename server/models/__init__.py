"""The model store: models fetched from package registries, verified and converted once into the cache, and the
demo models built from them."""
