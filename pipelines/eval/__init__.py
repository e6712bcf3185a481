"""Evaluation of trained artifacts; loads them with calm_core alone, never imports pipelines.train."""
