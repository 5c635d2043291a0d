"""TLS and mutual TLS on the gRPC port, with certificates made for the test run."""

import dataclasses
import datetime
import ipaddress
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from jobs.v1 import jobs_pb2, jobs_pb2_grpc
from publisher.v1 import publisher_pb2, publisher_pb2_grpc

from services.jobs.service import JOBS
from services.publisher.service import publisher_definition
from tests.conftest import (
    as_profile,
    new_profile_id,
    publisher_config,
    running,
    settings_for,
)


@dataclass
class Issued:
    key_pem: bytes
    cert_pem: bytes
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _issue(name: str, issuer: Issued | None = None, *, ca: bool = False) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Issued(key_pem, cert.public_bytes(serialization.Encoding.PEM), key, cert)


@dataclass
class Pki:
    ca: Issued
    server: Issued
    client: Issued
    stranger: Issued  # a client certificate from another CA
    directory: Path

    def write(self, name: str, data: bytes) -> str:
        path = self.directory / name
        path.write_bytes(data)
        return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    ca = _issue("test CA", ca=True)
    other_ca = _issue("other CA", ca=True)
    return Pki(
        ca=ca,
        server=_issue("jobs", ca),
        client=_issue("publisher", ca),
        stranger=_issue("stranger", other_ca),
        directory=tmp_path_factory.mktemp("pki"),
    )


def _tls_settings(database_url: str, pki: Pki, mutual: bool):
    return settings_for(
        database_url,
        tls_cert=pki.write("server.pem", pki.server.cert_pem),
        tls_key=pki.write("server.key", pki.server.key_pem),
        tls_client_ca=pki.write("ca.pem", pki.ca.cert_pem) if mutual else "",
    )


async def _get_job(channel: grpc.aio.Channel) -> grpc.StatusCode:
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    try:
        await stub.GetJob(
            jobs_pb2.GetJobRequest(job_id=str(uuid.uuid4())),
            metadata=as_profile(new_profile_id()),
            timeout=5,
        )
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def _secure(port: int, pki: Pki, client: Issued | None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert_pem,
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None,
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


async def test_tls_port_serves_tls_clients_and_refuses_plaintext(database_url, pki):
    async with running(JOBS, _tls_settings(database_url, pki, mutual=False)) as service:
        async with _secure(service.port, pki, client=None) as channel:
            assert await _get_job(channel) == grpc.StatusCode.NOT_FOUND
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            assert await _get_job(channel) == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_port_serves_only_clients_with_a_certificate_from_its_ca(
    database_url, pki
):
    async with running(JOBS, _tls_settings(database_url, pki, mutual=True)) as service:
        async with _secure(service.port, pki, client=pki.client) as channel:
            assert await _get_job(channel) == grpc.StatusCode.NOT_FOUND
        async with _secure(service.port, pki, client=None) as channel:
            assert await _get_job(channel) == grpc.StatusCode.UNAVAILABLE
        async with _secure(service.port, pki, client=pki.stranger) as channel:
            assert await _get_job(channel) == grpc.StatusCode.UNAVAILABLE


async def test_publisher_calls_jobs_over_mutual_tls(database_url, pki, jobs_service):
    jobs_settings = _tls_settings(database_url, pki, mutual=True)
    async with running(JOBS, jobs_settings) as jobs:
        publisher_settings = dataclasses.replace(
            jobs_settings,
            tls_cert=pki.write("publisher.pem", pki.client.cert_pem),
            tls_key=pki.write("publisher.key", pki.client.key_pem),
            tls_server_ca=pki.write("ca.pem", pki.ca.cert_pem),
        )
        config = dataclasses.replace(
            publisher_config(jobs_service), jobs_target=f"localhost:{jobs.port}"
        )
        async with (
            running(publisher_definition(config), publisher_settings) as publisher,
            _secure(publisher.port, pki, client=pki.client) as channel,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await publisher_pb2_grpc.PublisherServiceStub(channel).PublishJob(
                    publisher_pb2.PublishJobRequest(
                        job_id=str(uuid.uuid4()), integration_ids=["i"], content="content"
                    ),
                    metadata=as_profile(new_profile_id()),
                )
    # NOT_FOUND comes from the Jobs service itself: the TLS handshake went through.
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND, raised.value.details()
    assert "JobService/GetJob answered NOT_FOUND" in raised.value.details()
