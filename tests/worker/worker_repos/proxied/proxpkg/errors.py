class RepoError(Exception):
    """An exception class that exists only inside this repository."""
