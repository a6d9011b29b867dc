"""Checkpoint files: the safetensors header parser and validation every reader shares, the
packed layout (pack), re-quantization (requant) and shard byte I/O, the offline conversion
of the real-weights fixture (convert/).

Import what you need from its module (`flashmoe.checkpoints.requant.requant`) so one tool
never pulls in another's dependencies.
"""
