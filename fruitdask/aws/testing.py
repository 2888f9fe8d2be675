"""A fake AWS for tests: moto's server on a free loopback port, validation switched on.

Shared by ``tests/test_deploy_*.py`` (like :mod:`fruitdask.testing` for S3);
nothing in the product imports it. Needs ``moto[server]`` (``fruitdask[test]``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from fruitdask.testing import free_port

__all__ = ["FAKE_KEY_ID", "FAKE_SECRET", "REGION", "aws_env", "moto_server"]

# Distinctive fake credentials: a test can search user data for them.
FAKE_KEY_ID = "AKIAFRUITDASKFAKE001"
FAKE_SECRET = "fruitdask/fake+secret/never-leaves-the-client-0001"
REGION = "us-east-1"

# Without these, moto accepts any instance type, AMI and key pair, and a typo
# in what we send would pass (moto 5.2.1 ran RunInstances with InstanceType
# "c6i.notatype", ImageId "ami-12345678" and an unknown KeyName without a word).
_VALIDATION = {
    "MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION": "true",
    "MOTO_ENABLE_AMI_VALIDATION": "true",
    "MOTO_ENABLE_KEYPAIR_VALIDATION": "true",
}


def aws_env(endpoint_url: str) -> dict[str, str]:
    """Environment for a client of the fake: its endpoint, fake keys, nothing else.

    The instance metadata service (169.254.169.254) and the user's own AWS
    config files are switched off so nothing is dialled but the endpoint.
    """
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """Run moto's server on 127.0.0.1 with validation on; yield its endpoint URL.

    The process environment is set for the duration (:func:`aws_env`), so boto3,
    aiobotocore and subprocesses started inside all talk to the fake.
    """
    saved = {k: os.environ.get(k) for k in (*_VALIDATION, *aws_env(""))}
    os.environ.update(_VALIDATION)
    try:
        from moto import settings
        from moto.server import ThreadedMotoServer

        # moto reads these switches when it is first imported; it may have been already.
        settings.EC2_ENABLE_INSTANCE_TYPE_VALIDATION = True
        settings.ENABLE_AMI_VALIDATION = True
        settings.ENABLE_KEYPAIR_VALIDATION = True

        # One log line per request from werkzeug would drown the test output.
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update(aws_env(endpoint))
        try:
            yield endpoint
        finally:
            server.stop()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
