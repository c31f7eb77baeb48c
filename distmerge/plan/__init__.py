"""Planning, plain data: output shards, the exact header and offset of every output tensor
(``layout``), fp8 layout decisions (``fp8``) and byte-balanced work units (``merge_plan``).
No torch, no I/O.
"""
