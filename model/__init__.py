"""Model package shared by serving and training (see docs/ARCHITECTURE.md, "Model contract").

Submodules are imported explicitly (``from osteogate.model.inference import Classifier``); nothing is imported here so
that the torch-free serving path (card, checkpoint, pixels, preprocess, inference) stays torch-free.
"""
