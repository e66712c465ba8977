"""Test repository whose top-level ``models`` and ``utils`` packages collide with another one."""
from models import Net


def net():
    return Net()
