"""Contracts: what every layer and every plugin shares. The registry, config validation, the
threat model, random streams, the Attack / Defense / Check bases with their context types, the
datasets and architectures. Imports nothing else of `bench`."""
