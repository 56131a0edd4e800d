"""The S3 fixture itself: a real server that enforces credentials, and a clean teardown."""

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError


def _client(server, secret):
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=secret,
        region_name=server.region,
        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
    )


def test_server_enforces_signatures(s3_server):
    good = _client(s3_server, s3_server.secret_key)
    good.put_object(Bucket=s3_server.bucket, Key="fixture/x", Body=b"1")
    assert good.get_object(Bucket=s3_server.bucket, Key="fixture/x")["Body"].read() == b"1"
    with pytest.raises(ClientError):
        _client(s3_server, "wrong-secret").get_object(Bucket=s3_server.bucket, Key="fixture/x")
    good.delete_object(Bucket=s3_server.bucket, Key="fixture/x")
    assert s3_server.start_seconds < 15
