"""What one Ray task runs: ``unit`` reads a work unit's tensors (``reading``) and LoRA factors
(``terms``), merges them (``mergemath``, ``fp8``) and writes the result at its planned offsets
(``writer``), CRC-ing what it writes (``checksum``); ``checks`` is the task side of ``distmerge verify``.
"""
