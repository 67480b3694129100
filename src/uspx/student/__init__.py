"""Dense students of an extract run: one MLP per MoE layer made of the user's own experts
(:func:`student`), or a dense model the user already has, of any family and tokenizer
(:func:`dense_student`); both distilled from the original."""

from uspx.student.dense import dense_student
from uspx.student.run import student

__all__ = ["dense_student", "student"]
