"""Instruction tuning (docs/pure-format.md §7): degradations, data building, pre-tokenization, fine-tuning, VQ training.

Needs the [train] extra (OpenCV, SciPy, torch, peft).
"""
