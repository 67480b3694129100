"""Dense students: one MLP per MoE layer made of the user's own experts, distilled from the original."""

from uspx.student.run import student

__all__ = ["student"]
