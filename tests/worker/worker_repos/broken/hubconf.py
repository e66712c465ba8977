"""Test repository whose hubconf cannot be imported."""
import flowhub_test_module_that_does_not_exist  # noqa: F401


def model():
    return None
