"""Orchestrators and front ends: ``merge()`` (``api``), the checks before Ray (``preflight``),
``distmerge verify`` (``verify``), the CLI and job files, ``inspect``, the demo, the in-memory
compatibility API (``compat``), reports and progress.
"""
