"""Prefect tasks: thin wrappers that call the glp library and do the I/O.

Retries and cache policies sit on the decorators; fine-tune and evaluation results are
small JSON records that point at checkpoint directories, never tensors.
"""
