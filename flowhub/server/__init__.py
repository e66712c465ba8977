"""A loopback GitHub look-alike serving local git repositories and files.

Used by flowhub's tests and offline demo, and by ``flowhub serve`` to mirror repositories
and weights to machines without internet. Standard library only (plus the ``git`` command).
"""
from flowhub.server.faults import Fault
from flowhub.server.log import RequestRecord
from flowhub.server.server import GitHubServer

__all__ = ["GitHubServer", "Fault", "RequestRecord"]
