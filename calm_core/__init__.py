"""CALM in plain PyTorch: tokenizer, chunking, the chunk autoencoder, configs and checkpoint I/O.

Nothing here imports Ray or DeepSpeed (tests/test_layering.py enforces it).
"""
