"""Reading the inputs: safetensors headers, base checkpoints (file, sharded folder, model folder, HF
cache reference) and LoRA files (safetensors, torch pickles), without reading tensor data.

``dtypes`` is the safetensors dtype table (no torch); ``torch_dtypes`` maps it to torch; ``rawio``
holds the exact positioned reads and writes on file descriptors that every stage uses.
"""
