"""Triton kernels of fastmsd, imported as ``fastmsd.kernels`` (setup.py maps this folder).

The engine runs the eager reference path of ``fastmsd.objective`` until the fused loss and
EMA kernels land here.
"""
