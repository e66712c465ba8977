NAME = "repo-a"
