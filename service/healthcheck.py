"""``python -m service.healthcheck``: exit 0 when this machine's server answers ready.

The container's HEALTHCHECK: it reads the port from the same ``BNFOLD_*`` environment as the
server, and needs neither curl nor a shell in the image.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from service.settings import Settings


def main() -> int:
    port = Settings.from_env().port
    url = f"http://127.0.0.1:{port}/v2/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"not ready: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
