"""Frankenstein CSV -> Axolotl completion JSONL (see data_prep/prepare.py)."""
