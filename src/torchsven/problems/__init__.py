"""Test problems with known solutions (used by tests and benchmarks)."""

from .mgh import PROBLEMS, Problem, get_problem

__all__ = ["PROBLEMS", "Problem", "get_problem"]
