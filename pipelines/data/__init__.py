"""Corpus -> what training reads: files, parsing, Ray Data ingest, chunks, the tokenizer, latents (docs/PIPELINE.md)."""
