"""A toy model added the way docs/adding-a-model.md says: two model files and one spec (see tests/test_specs.py)."""
