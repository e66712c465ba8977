"""Models of the proxy-mode test repository."""
