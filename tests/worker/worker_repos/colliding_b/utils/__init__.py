NAME = "repo-b"
