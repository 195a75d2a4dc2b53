"""moto's S3 server with credentials kept out of its log: what ``up.sh`` starts instead of ``moto_server``.

moto logs every request line (werkzeug's access log), and a request signed in its query string (a presigned URL,
SigV2 ``AWSAccessKeyId=``, SigV4 ``X-Amz-Credential=``) carries the access key id there. Every record moto or
werkzeug logs goes through one handler whose filter blanks those query values and anything shaped like an AWS
access key id; the rest of the line (method, path, status) stays, so the log still says what happened.

Usage (same arguments as ``moto_server``): ``python s3_server.py -H 127.0.0.1 -p PORT``
"""

from __future__ import annotations

import logging
import re
import sys

_SIGNED = re.compile(
    r"((?:X-Amz-Credential|X-Amz-Signature|X-Amz-Security-Token|AWSAccessKeyId|Signature)=)[^&\s\"']*",
    re.IGNORECASE,
)
_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")


def redact(text: str) -> str:
    """``text`` with signed query values and access key ids replaced by ``***``."""
    return _KEY_ID.sub("***", _SIGNED.sub(r"\1***", text))


class Redact(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def main(argv: list[str]) -> None:
    # configured before moto imports: werkzeug then logs through this handler instead of adding its own
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(Redact())
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler])
    from moto.server import main as moto_main

    moto_main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
