"""CALM in plain PyTorch, one file per component: the tokenizer and the two chunk layouts
(``tokenizer``, ``chunking``), the chunk autoencoder (``autoencoder``), the backbone, energy heads and
CALM (``transformer``, ``heads``, ``calm_model``), the token baseline (``baseline``), the energy loss
and BrierLM (``energy``, ``brierlm``, ``evaluate``, ``agreement``), likelihood-free sampling and the
generation engine (``temperature``, ``sampling``, ``generate``, ``engine``, ``batching``, ``ragged``,
``stops``, ``rng``), configs, artifacts and checkpoints (``config``, ``artifacts``, ``checkpoint``),
and the official checkpoint format (``official``, ``parity``).

Nothing here imports Ray or DeepSpeed (tests/test_layering.py enforces it).
"""
