"""distill: teachers, losses and the trainer for per-identity fine-tuning.

Arrives with the distillation issue; may import `render`, `deform` and `reconstruct`.
"""
