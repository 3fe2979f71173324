"""Layer 3: masks, masked layers, score/rate initialisation, the hardware cost model and dense export.

Works on any nn.Module: it swaps nn.Conv2d / nn.Linear for masked versions and never asks which
architecture it is wrapping.
"""
