"""Small OneFlow models published through the example hub."""
