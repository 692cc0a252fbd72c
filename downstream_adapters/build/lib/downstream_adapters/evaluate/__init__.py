"""The evaluation harness: embeddings versus per-task baselines, k-fold CV, paper scenarios.

Needs the ``eval`` and ``torch`` extras. Run ``adapters-evaluate --help``.
"""
