"""The GPU pod service: FastAPI app, A1111 request semantics, model store.

Importing this package must not import torch: the API models and settings are
used by code (CLI, tests, the dispatcher's type hints) that carries no torch.
Modules that need torch or diffusers import them themselves.
"""
