"""``python -m flowhub.server ROOT [--host H] [--port P]``: serve ROOT until SIGINT/SIGTERM."""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import List, Optional

from flowhub.server.server import GitHubServer


def main(argv: Optional[List[str]] = None) -> int:
    """Run the server in the foreground; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m flowhub.server", description=__doc__)
    parser.add_argument("root", help="folder of <owner>/<repo>[.git] repositories and files")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (default 0: pick a free one)")
    parser.add_argument("--reject-tokens", action="store_true",
                        help="answer 401 to requests that carry an Authorization header")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)

    server = GitHubServer(args.root, host=args.host, port=args.port,
                          reject_tokens=args.reject_tokens, quiet=not args.verbose)
    try:
        server.start()
    except (OSError, RuntimeError) as exc:
        print(f"flowhub.server: cannot serve {args.root}: {exc}", file=sys.stderr)
        return 1
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(f"Serving {server.root} at {server.url} (API: {server.api_url})", flush=True)
    try:
        while not done.wait(1.0):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
